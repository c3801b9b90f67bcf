"""Shared fixtures: composing the real Hydra config with test overrides."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from kto_lightning.cli.config_files import config_dir

# Tests start the entry point in about 30 subprocesses (and DDP ranks in more). With
# PYTHONDONTWRITEBYTECODE set, as on the CI machines, each one compiles torch, transformers and
# Lightning from source again: about 3 s a start. Let them cache bytecode (git ignores it).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

# The suite runs in parallel (pyproject's `-n auto`): one test process a core, at most
# MAX_WORKERS. Each then computes on its share of the cores, and so does every process it starts
# (OMP_NUM_THREADS is inherited): two processes of two threads each on two cores run slower than
# one alone, as their threads wait on each other.
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    import torch

    torch.set_num_threads(_threads)

# A few steps on a small slice of the toy task: seconds on a CPU.
FAST = [
    "data.source.toy_rows=160",
    "data.batching.batch_size=8",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    # The tiny model's random init, where the suite's runs have always started; the default's
    # bundled weights are tested where they are the subject (integration/test_default_model.py).
    "model.weights=null",
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Tests never touch the network or the user's caches.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose conf/train.yaml with overrides, writing into a temporary run directory."""

    def _make(*overrides: str, fast: bool = True) -> DictConfig:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            # Another model file has no model.weights key: FAST's random init is model=tiny's.
            chosen = any(o.startswith("model=") for o in overrides)
            fast_overrides = [o for o in FAST if not (chosen and o.startswith("model."))]
            return compose(
                "train",
                overrides=[
                    *(fast_overrides if fast else []),
                    f"paths.output_dir={tmp_path}",
                    *overrides,
                ],
            )

    return _make


@pytest.fixture(autouse=True)
def _datasets_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # `datasets` reads HF_HOME once, at import; point its cache at this test's folder directly so
    # no test writes to (or reads a stale tokenization from) the user's cache.
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
