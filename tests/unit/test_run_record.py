"""kto_lightning.runs.run_record: every way of naming a run resolves to the same record."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from kto_lightning.errors import ConfigError
from kto_lightning.runs.checkpointing import RUN_CONFIG_KEY
from kto_lightning.runs.run_record import hydra_config, newest_checkpoint, resolve_run

MODEL = {"_target_": "kto_lightning.models.TinyLlama"}
HYDRA_CONFIG = """\
seed: 5
task_name: kto
paths:
  output_dir: ${hydra:runtime.output_dir}
model:
  _target_: kto_lightning.models.TinyLlama
data:
  source: {path: sums.jsonl, val_fraction: 0.2}
  seed: ${seed}
"""


def _checkpoint(path: Path, step: int, val_fraction: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {"seed": 5, "model": MODEL, "data": {"source": {"val_fraction": val_fraction}}}
    torch.save({RUN_CONFIG_KEY: config, "global_step": step}, path)
    return path


def _run(root: Path) -> Path:
    """A run directory: .hydra, last and two best checkpoints, hf_model, objective.json."""
    (root / ".hydra").mkdir(parents=True)
    (root / ".hydra" / "config.yaml").write_text(HYDRA_CONFIG)
    _checkpoint(root / "checkpoints" / "last.ckpt", 9, 0.2)
    _checkpoint(root / "checkpoints" / "best-step4.ckpt", 4, 0.2)
    _checkpoint(root / "checkpoints" / "best-step12.ckpt", 12, 0.2)
    (root / "hf_model").mkdir()
    (root / "hf_model" / "config.json").write_text("{}")
    (root / "objective.json").write_text('{"objective": "val/rewards/auroc", "value": 0.8}')
    return root


def test_a_run_dir_its_checkpoint_and_its_hf_model_give_one_record(tmp_path: Path) -> None:
    run = _run(tmp_path / "multiruns" / "t" / "0_loss.beta=0.1")  # a sweep's job directory
    checkpoints = run / "checkpoints"
    records = [resolve_run(p) for p in (run, checkpoints / "last.ckpt", run / "hf_model")]

    for record in records:
        assert record.run_dir == run
        assert (record.last, record.best) == (
            checkpoints / "last.ckpt",
            checkpoints / "best-step12.ckpt",
        )
        assert record.hf_model == run / "hf_model"
        assert record.objective == ("val/rewards/auroc", 0.8)
        assert record.config is not None and record.config["data"]["source"]["val_fraction"] == 0.2
    assert [r.kind for r in records] == ["checkpoint", "checkpoint", "hf_model"]
    assert records[0].named == checkpoints / "last.ckpt" and records[0].checkpoint is not None
    assert records[2].checkpoint is None  # its config is last.ckpt's


def test_a_named_checkpoint_brings_its_own_config(tmp_path: Path) -> None:
    run = _run(tmp_path / "run")
    _checkpoint(run / "checkpoints" / "best-step12.ckpt", 12, 0.3)

    record = resolve_run(run / "checkpoints" / "best-step12.ckpt")

    assert record.config is not None and record.config["data"]["source"]["val_fraction"] == 0.3
    assert record.run_dir == run


def test_without_checkpoints_the_hydra_record_is_read_resolved(tmp_path: Path) -> None:
    run = _run(tmp_path / "run")
    for checkpoint in (run / "checkpoints").iterdir():
        checkpoint.unlink()

    record = resolve_run(run / "hf_model")

    assert record.config == hydra_config(run)
    assert record.config is not None and record.config["data"]["seed"] == 5  # ${seed} resolved
    # Hydra's runtime is not there to resolve it: kept as written.
    assert record.config["paths"]["output_dir"] == "${hydra:runtime.output_dir}"
    assert (record.last, record.best) == (None, None)


def test_an_hf_folder_of_no_run_has_no_config(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")

    record = resolve_run(tmp_path / "model")

    assert (record.run_dir, record.config, record.kind) == (None, None, "hf_model")


def test_a_sweep_folder_names_its_jobs(tmp_path: Path) -> None:
    _run(tmp_path / "sweep" / "0_a=1")
    _run(tmp_path / "sweep" / "1_a=2")

    with pytest.raises(ConfigError, match=r"is a sweep's folder; pass one of .*: 0_a=1, 1_a=2"):
        resolve_run(tmp_path / "sweep")
    with pytest.raises(ConfigError, match="no such file or folder"):
        resolve_run(tmp_path / "nothing")


def test_the_newest_checkpoint_is_the_one_written_last(tmp_path: Path) -> None:
    run = _run(tmp_path / "run")
    best = run / "checkpoints" / "best-step4.ckpt"
    os.utime(best, (time.time() + 60, time.time() + 60))

    assert newest_checkpoint(run) == best
    assert newest_checkpoint(tmp_path / "no run") is None


def test_a_reference_saved_as_copy_is_the_same_run_as_auto_without_lora() -> None:
    # Checkpoints written before `reference: auto` became the default say `copy`: resuming one
    # under the default must not be refused as another run; with LoRA, auto is the adapters.
    from kto_lightning.runs.run_identity import differences

    def config(kind: str, lora: dict | None = None) -> dict:
        return {"reference": {"kind": kind}, "model": {"lora": lora}}

    assert differences(config("auto"), config("copy"), ("reference",)) == []
    assert differences(config("auto", {"r": 4}), config("adapter", {"r": 4}), ("reference",)) == []
    assert differences(config("auto", {"r": 4}), config("copy", {"r": 4}), ("reference",)) == [
        "reference.kind: 'copy' -> 'adapter'"
    ]
