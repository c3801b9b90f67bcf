"""resume=auto resumes only the same run; a resume is checked before data and model load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kto_lightning import train as train_module
from kto_lightning.errors import ConfigError
from kto_lightning.train import train

NO_PRE_VALIDATION = "validate_before_training=false"


def _run_dir(tmp_path: Path, name: str) -> str:
    return f"paths.output_dir={tmp_path / 'kto' / 'runs' / name}"


def _no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_build(cfg):
        raise AssertionError("data and model were loaded")

    monkeypatch.setattr(train_module, "build", must_not_build)


@pytest.fixture
def finished(make_config, tmp_path) -> Path:
    """A finished run (beta 0.1) under <tmp>/kto/runs/first."""
    train(make_config(_run_dir(tmp_path, "first"), NO_PRE_VALIDATION))
    return tmp_path / "kto" / "runs" / "first"


def test_auto_does_not_resume_a_run_with_other_settings(
    make_config, tmp_path, finished, caplog
) -> None:
    cfg = make_config(_run_dir(tmp_path, "second"), "loss.beta=0.2", "resume=auto")
    with caplog.at_level("INFO", logger="kto_lightning"):
        train(cfg)
    assert "loss.beta: 0.1 -> 0.2" in caplog.text and "Starting from scratch" in caplog.text
    last = tmp_path / "kto" / "runs" / "second" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 6, "trained from step 0"


def test_auto_on_a_finished_run_says_so_and_returns_its_objective(
    make_config, tmp_path, finished, caplog, monkeypatch
) -> None:
    _no_build(monkeypatch)
    cfg = make_config(_run_dir(tmp_path, "again"), NO_PRE_VALIDATION, "resume=auto")
    with caplog.at_level("INFO", logger="kto_lightning"):
        value = train(cfg)
    assert f"the run in {finished} already finished (step 6, epoch 1)" in caplog.text
    assert value == json.loads((finished / "objective.json").read_text())["value"]


def test_a_changed_learning_rate_on_resume_is_refused_by_name(
    make_config, tmp_path, finished, monkeypatch
) -> None:
    _no_build(monkeypatch)
    last = finished / "checkpoints" / "last.ckpt"
    cfg = make_config(_run_dir(tmp_path, "again"), "optimizer.lr=0.01", f"resume={last}")
    with pytest.raises(ConfigError, match=r"optimizer\.lr: 0\.0003 -> 0\.01"):
        train(cfg)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", b"PK\x03\x04truncated"])
def test_an_unreadable_checkpoint_is_named_before_anything_loads(
    make_config, tmp_path, monkeypatch, content: bytes
) -> None:
    _no_build(monkeypatch)
    path = tmp_path / "broken.ckpt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"resume='{path}': not a readable checkpoint"):
        train(make_config(f"resume={path}"))


def test_a_file_that_is_no_training_checkpoint_is_named(make_config, tmp_path, monkeypatch) -> None:
    _no_build(monkeypatch)
    path = tmp_path / "weights.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    with pytest.raises(ConfigError, match="not a kto_lightning training checkpoint"):
        train(make_config(f"resume={path}"))


def test_a_relaunched_sweep_job_finds_its_own_job(
    make_config, tmp_path, caplog, monkeypatch
) -> None:
    sweep = tmp_path / "kto" / "multiruns"
    betas = ("0.1", "0.2")
    jobs = {beta: sweep / "first" / f"{n}_beta{beta}" for n, beta in enumerate(betas)}
    for beta, job in jobs.items():
        train(make_config(f"paths.output_dir={job}", f"loss.beta={beta}", NO_PRE_VALIDATION))
    _no_build(monkeypatch)
    for n, beta in enumerate(betas):
        again = sweep / "second" / f"{n}_beta{beta}"
        caplog.clear()
        with caplog.at_level("INFO", logger="kto_lightning"):
            train(make_config(f"paths.output_dir={again}", f"loss.beta={beta}", "resume=auto"))
        assert f"the run in {jobs[beta]} already finished" in caplog.text
