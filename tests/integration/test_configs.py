"""Every file of every config group composes, resolves, and builds what its `_target_` names."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hydra.utils import get_object, instantiate
from omegaconf import OmegaConf

from kto_lightning.cli.config_files import config_dir
from kto_lightning.cli.run_build import build
from kto_lightning.cli.run_fit import train
from kto_lightning.cli.schemas import BUILDS, check
from kto_lightning.core.losses import KTOLossConfig
from kto_lightning.models import FromRun, Pretrained, TinyLlama
from kto_lightning.training.online import OnlineKTOModule
from kto_lightning.training.online_round import RoundKTOModule
from kto_lightning.training.sft import SFTLoss

GROUPS = sorted(p.name for p in config_dir().iterdir() if p.is_dir())
# hydra/ configures Hydra itself and is part of every composition below, so it needs no case.
FILES = [
    (g, f.stem) for g in GROUPS if g != "hydra" for f in sorted((config_dir() / g).glob("*.yaml"))
]


def test_every_group_of_the_design_is_present() -> None:
    expected = {"model", "data", "loss", "optimizer", "scheduler", "trainer", "strategy", "logger"}
    expected |= {"callbacks", "paths", "hydra", "experiment", "debug"}
    assert expected <= set(GROUPS)
    assert {"auto", "ddp"} <= {name for g, name in FILES if g == "strategy"}
    assert {"csv", "wandb"} <= {name for g, name in FILES if g == "logger"}
    assert {"tiny", "scratch", "llama1b", "local"} <= {name for g, name in FILES if g == "model"}


@pytest.mark.parametrize(("group", "name"), FILES, ids=[f"{g}={n}" for g, n in FILES])
def test_group_file_composes_and_resolves(make_config, group: str, name: str) -> None:
    cfg = make_config(f"{group}={name}", fast=False)
    # Resolve everything; mandatory `???` values (a path the user must give) may stay missing.
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    check(cfg)  # every key is an argument of what its node builds
    section = cfg.get(group)
    if group in ("paths", "debug", "experiment") or section is None:
        return
    if group == "strategy" and "DeepSpeed" in section.get("_target_", ""):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            assert section.stage in (2, 3)  # composed and resolved; building needs the extra
            return
    if group == "trainer" and section.accelerator == "gpu" and not torch.cuda.is_available():
        assert section.precision == "bf16-mixed"  # composed and resolved; building needs a GPU
        return
    if group in ("callbacks", "logger"):
        built = [instantiate(entry) for entry in section.values()]
        assert all(b is not None for b in built)
    elif group == "data" and OmegaConf.is_missing(section.source, "path"):
        assert section._target_ == "kto_lightning.data.KTODataModule"
    elif group == "data":
        from kto_lightning.models.byte_tokenizer import byte_level_tokenizer

        assert instantiate(section, tokenizer=byte_level_tokenizer()) is not None
    elif group == "reward" and any(OmegaConf.is_missing(section, k) for k in section):
        # A key the user gives (a pattern, a model, an import path): built with one in
        # integration/test_online_cli.py.
        assert get_object(section._target_) is not None
    elif group == "online":
        assert section.loop == name
        assert set(section) == {"loop", "sampling", "labelling", *(["round"] * (name == "round"))}
        _train_online(make_config, name)
    elif group == "model" and OmegaConf.is_missing(section, "name_or_path"):
        assert section._target_ == "kto_lightning.models.Pretrained"
    elif group == "model" and OmegaConf.is_missing(section, "run_dir"):
        assert section._target_ == "kto_lightning.models.FromRun"  # built in test_sft.py
    else:
        built = instantiate(section)
        assert built is not None
        if group == "loss":
            assert isinstance(built, KTOLossConfig | SFTLoss)
        if group == "model":
            assert isinstance(built, TinyLlama | Pretrained | FromRun)


SCHEMA_FILES = [(g, n) for g, n in FILES if g in {build.group for build in BUILDS}]


@pytest.mark.parametrize(("group", "name"), SCHEMA_FILES, ids=[f"{g}={n}" for g, n in SCHEMA_FILES])
def test_file_extends_the_schema_of_what_it_builds(make_config, group: str, name: str) -> None:
    section = make_config(f"{group}={name}", fast=False)[group]
    schema = OmegaConf.get_type(section)
    assert dataclasses.is_dataclass(schema), f"conf/{group}/{name}.yaml extends no schema"
    assert schema.__name__ == get_object(section._target_).__name__


def test_defaults_are_the_embedded_default(make_config) -> None:
    cfg = make_config(fast=False)
    assert cfg.model._target_ == "kto_lightning.models.TinyLlama"
    assert cfg.data.source.path == "toy"
    assert cfg.loss.beta == 0.1
    assert cfg.loss.estimator == "mismatched"
    assert cfg.strategy._args_ == ["auto"]


def test_a_required_data_key_stays_open_under_the_schema(make_config) -> None:
    # A schema default must not fill a `???` of the file: data=local needs a path.
    assert OmegaConf.is_missing(make_config("data=local", fast=False).data.source, "path")
    assert make_config("data=toy", fast=False).data.source.path == "toy"


def test_groups_set_top_level_keys(make_config) -> None:
    # train.yaml's own keys are the base: debug and experiment files change them, and the command
    # line changes them again.
    assert make_config(fast=False).validate_before_training is True
    assert make_config("debug=fast", fast=False).validate_before_training is False
    assert make_config("experiment=toy_apo", fast=False).task_name == "toy_apo"
    assert make_config("experiment=toy_apo", "task_name=mine", fast=False).task_name == "mine"
    assert make_config("debug=fast", "validate_before_training=true", fast=False)[
        "validate_before_training"
    ]


def test_model_file_sets_its_learning_rate(make_config) -> None:
    assert make_config("model=llama1b", fast=False).optimizer.lr == pytest.approx(1e-6)
    assert make_config("model=tiny", fast=False).optimizer.lr == pytest.approx(3e-4)
    # a command-line override still wins over the model file
    assert make_config("model=llama1b", "optimizer.lr=5e-7").optimizer.lr == pytest.approx(5e-7)


def test_config_folder_is_packaged_with_the_wheel() -> None:
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"conf" = "kto_lightning/conf"' in pyproject


def _train_online(make_config, name: str) -> None:
    """An online loop's file runs: built with the consistency task and its verifier, its own
    module trains two steps (the command line runs it in test_online_cli.py,
    test_online_round.py and test_online_ddp.py)."""
    cfg = make_config(
        f"online={name}", "reward=consistency", "data=toy_consistency",
        "data.source.toy_rows=40", "data.batching.batch_size=2", "online.sampling.k=2",
        "online.sampling.max_new_tokens=8", *(["online.round.prompts=2"] * (name == "round")),
        "online.labelling.rule=threshold",  # a random model's replies all score 0: keep them
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "validate_before_training=false", "callbacks=none", "~callbacks.model_checkpoint",
        "export.enabled=false",
    )  # fmt: skip
    run = build(cfg)
    assert type(run.module) is (RoundKTOModule if name == "round" else OnlineKTOModule)
    train(cfg, run=run)
    assert run.trainer.global_step == 2 and run.module._skipped == 0
