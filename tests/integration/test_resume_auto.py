"""resume=auto resumes only the same run; a resume is checked before data and model load."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from cli import offline_env, train_in_process
from conftest import FAST
from kto_lightning.cli import run_fit as train_module
from kto_lightning.cli.config_files import config_dir
from kto_lightning.cli.run_fit import train
from kto_lightning.errors import ConfigError

NO_PRE_VALIDATION = "validate_before_training=false"


def _run_dir(tmp_path: Path, name: str) -> str:
    return f"paths.output_dir={tmp_path / 'kto' / 'runs' / name}"


def _no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_build(cfg):
        raise AssertionError("data and model were loaded")

    monkeypatch.setattr(train_module, "build", must_not_build)


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One finished run (beta 0.1) for the module; each test gets its own copy."""
    folder = tmp_path_factory.mktemp("finished")
    with offline_env(folder), initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("train", [*FAST, _run_dir(folder, "first"), NO_PRE_VALIDATION])
    with offline_env(folder):
        train(cfg)
    return folder / "kto" / "runs" / "first"


@pytest.fixture
def finished(trained_once: Path, tmp_path) -> Path:
    """A finished run (beta 0.1) under <tmp>/kto/runs/first."""
    return Path(shutil.copytree(trained_once, tmp_path / "kto" / "runs" / "first"))


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
    assert f"the run of {finished}/checkpoints/" in caplog.text
    assert "already finished (step 6, epoch 1)" in caplog.text
    assert value == json.loads((finished / "objective.json").read_text())["value"]
    assert cfg.paths.output_dir == str(finished), "a resumed run goes on in its own directory"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("model.hidden_size=32", r"another model.*model\.hidden_size: 64 -> 32"),
        ("optimizer.lr=0.01", r"schedule.*optimizer\.lr: 0\.0003 -> 0\.01"),
    ],
)
def test_resuming_a_path_with_another_model_or_learning_rate_is_refused_by_name(
    make_config, tmp_path, finished, monkeypatch, change: str, message: str
) -> None:
    _no_build(monkeypatch)
    last = finished / "checkpoints" / "last.ckpt"
    cfg = make_config(_run_dir(tmp_path, "again"), change, f"resume={last}")
    with pytest.raises(ConfigError, match=message):
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


def test_an_interrupted_sweep_relaunched_with_resume_auto_finishes(tmp_path) -> None:
    """Job 0 finishes, job 1 is stopped by SIGTERM (the whole sweep stops, exit 143); the same
    command with resume=auto skips job 0, resumes job 1 in its own directory and finishes it."""
    sweep = [
        "-m", "loss.beta=0.1,0.2", *FAST, "trainer.limit_train_batches=12",
        "callbacks.last_checkpoint.every_n_train_steps=2", NO_PRE_VALIDATION,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    first, second = tmp_path / "kto" / "multiruns" / "first", tmp_path / "kto" / "multiruns" / "2"
    process = subprocess.Popen(
        [sys.executable, "-m", "kto_lightning.train", *sweep, f"hydra.sweep.dir={first}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(first.glob("1_*/checkpoints/last.ckpt")):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "job 1 wrote no checkpoint"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    before = _results(first)
    assert [row["status"] for row in before] == ["completed", "interrupted"]

    again = train_in_process(*sweep, f"hydra.sweep.dir={second}", "resume=auto", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    after = _results(second)
    assert [row["status"] for row in after] == ["completed", "completed"]
    assert [row["run_dir"] for row in after] == [row["run_dir"] for row in before]
    assert after[0]["value"] == before[0]["value"], "job 0 was not trained again"
    job_1 = Path(after[1]["run_dir"])
    assert torch.load(job_1 / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    assert json.loads((job_1 / "objective.json").read_text())["value"] == float(after[1]["value"])


def _results(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "sweep_results.csv", newline="") as file:
        return list(csv.DictReader(file))
