"""A checkpoint written before the modules moved into subpackages still reads and instantiates:
the one checkpoint reader names its run config's targets by where they are now."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from kto_lightning.core.losses import KTOLossConfig
from kto_lightning.models import TinyLlama
from kto_lightning.models.reference import ReferenceSpec
from kto_lightning.runs.checkpointing import RUN_CONFIG_KEY, LastCheckpoint, load_run_checkpoint
from kto_lightning.runs.moved_paths import MOVED_MODULES, current_path, current_paths
from kto_lightning.runs.resume import read_checkpoint
from kto_lightning.runs.run_identity import DEFINING, SHAPE, differences
from kto_lightning.runs.run_record import hydra_config, resolve_run

# A run config as a checkpoint of before the move stored it (from that version's conf/).
OLD_CONFIG = {
    "seed": 3,
    "model": {"_target_": "kto_lightning.models.TinyLlama", "hidden_size": 16, "num_layers": 1},
    "loss": {"_target_": "kto_lightning.losses.KTOLossConfig", "beta": 0.2},
    "reference": {"_target_": "kto_lightning.reference.ReferenceSpec", "kind": "copy"},
    "scheduler": {
        "_target_": "kto_lightning.optim.warmup_schedule",
        "_partial_": True,
        "warmup_ratio": 0.1,
        "decay": "cosine",
    },
    "callbacks": {
        "last_checkpoint": {
            "_target_": "kto_lightning.checkpointing.LastCheckpoint",
            "dirpath": "out/checkpoints",
        },
        "non_finite_guard": {"_target_": "kto_lightning.guards.NonFiniteGuard"},
    },
    "loggers": [{"_target_": "kto_lightning.csv_logger.ContinuingCSVLogger", "save_dir": "."}],
    "filters": {"redact": {"()": "kto_lightning.security.RedactingFilter"}},
    "data": {"_target_": "kto_lightning.data.KTODataModule", "note": "kto_lightning.losses"},
}
RUNS = "kto_lightning.runs"
NEW_TARGETS = {
    "loss": "kto_lightning.core.losses.KTOLossConfig",
    "reference": "kto_lightning.models.reference.ReferenceSpec",
    "scheduler": "kto_lightning.training.optim.warmup_schedule",
}


def _old_checkpoint(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({RUN_CONFIG_KEY: OLD_CONFIG, "global_step": 4, "epoch": 0}, path)
    return path


def _assert_current(config: dict) -> None:
    for group, target in NEW_TARGETS.items():
        assert config[group]["_target_"] == target
    callbacks, (logger,) = config["callbacks"], config["loggers"]
    assert callbacks["last_checkpoint"]["_target_"] == f"{RUNS}.checkpointing.LastCheckpoint"
    assert callbacks["non_finite_guard"]["_target_"] == "kto_lightning.cli.guards.NonFiniteGuard"
    assert logger["_target_"] == "kto_lightning.reporting.csv_logger.ContinuingCSVLogger"
    assert config["filters"]["redact"]["()"] == "kto_lightning.common.security.RedactingFilter"
    # Paths that did not move stay as they were (the model's, the data module's), as do numbers.
    assert config["model"] == OLD_CONFIG["model"]
    assert config["data"]["_target_"] == "kto_lightning.data.KTODataModule"
    assert config["seed"] == 3


def test_an_old_checkpoint_reads_back_with_current_paths_that_instantiate(tmp_path: Path) -> None:
    path = _old_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")

    config = load_run_checkpoint(path, "ckpt_path", "advice")[RUN_CONFIG_KEY]

    _assert_current(config)
    assert isinstance(instantiate(config["loss"]), KTOLossConfig)
    assert instantiate(config["loss"]).beta == 0.2
    assert isinstance(instantiate(config["reference"]), ReferenceSpec)
    assert isinstance(instantiate(config["model"]), TinyLlama)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = instantiate(config["scheduler"])(optimizer, total_steps=10)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    callback = instantiate(config["callbacks"]["last_checkpoint"])
    assert isinstance(callback, LastCheckpoint)
    # The run record (evaluate, generate, export) reads it through the same reader.
    assert resolve_run(tmp_path / "run").config == config


def test_an_old_runs_hydra_record_is_read_with_current_paths(tmp_path: Path) -> None:
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "loss:\n  _target_: kto_lightning.losses.KTOLossConfig\n  beta: 0.2\n"
    )

    config = hydra_config(tmp_path)

    assert config == {"loss": {"_target_": "kto_lightning.core.losses.KTOLossConfig", "beta": 0.2}}


def test_every_old_path_is_gone_and_its_new_one_imports() -> None:
    for old, new in MOVED_MODULES.items():
        with pytest.raises(ModuleNotFoundError):
            importlib.import_module(old)
        importlib.import_module(new)
    assert len(MOVED_MODULES) == 37  # every module that left the top level


@pytest.mark.parametrize(
    "path",
    ["kto_lightning.models.TinyLlama", "kto_lightning.core.losses.KTOLoss", "kto_lightning.train",
     "kto_lightning.lossesX.Y", "losses.KTOLoss", "kto_lightning"],
)  # fmt: skip
def test_a_path_that_did_not_move_is_kept(path: str) -> None:
    assert current_path(path) == path


def test_a_moved_module_and_a_name_in_it_are_rewritten() -> None:
    assert current_path("kto_lightning.reference") == "kto_lightning.models.reference"
    assert current_path("kto_lightning.sft.SFTLoss") == "kto_lightning.training.sft.SFTLoss"


def test_resume_takes_an_old_checkpoint_for_the_same_run(tmp_path: Path) -> None:
    """resume=<old checkpoint> and resume=auto compare the run's keys: the move changes none."""
    saved = read_checkpoint(_old_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    current = current_paths(OLD_CONFIG)

    assert differences(current, saved.config, (*SHAPE, *DEFINING)) == []
    # Unrewritten, the reference's target would differ, and resume refuse "another model".
    assert differences(current, OLD_CONFIG, SHAPE) != []
