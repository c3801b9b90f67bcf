"""Where the YAML config lives, and what must be in place before Hydra composes it.

Every entry point that composes `conf/train.yaml` (train, evaluate, the Python API) imports
`config_dir` from here rather than from another entry point. Importing this module registers
the structured-config schemas the YAML files extend and the resolvers conf/hydra uses, so
`from kto_lightning.cli.config_files import config_dir` is all a caller needs before composing.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from kto_lightning.cli import schemas
from kto_lightning.cli.config_location import config_dir
from kto_lightning.runs.sweeps import register_resolvers

__all__ = ["config_dir", "on_gpu", "prepare_composition"]


def prepare_composition() -> None:
    """Register what composing `train.yaml` needs; idempotent, so safe to call again.

    The YAML files' defaults name `schema/<group>` nodes of Hydra's ConfigStore, and conf/hydra
    names sweep jobs' folders with the `kto.job_dirname` resolver: without either, composing
    fails with a message about a missing config or resolver, not about the user's overrides.
    """
    schemas.register()
    register_resolvers()


def on_gpu(cfg: DictConfig) -> bool:
    """Whether the run's trainer will train on CUDA GPUs (`trainer.accelerator` gpu or cuda, or
    auto with one present)."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


# At import, before any entry point's `@hydra.main` can compose a config.
prepare_composition()
