"""Values no schema types, checked before any data or model is loaded.

The root file's keys and the trainer's are passed to Lightning or read by the code as they are;
left unchecked, a wrong one fails late (a precision at the trainer's construction, once data and
model are loaded; a chunk size of 0 at the first step) or never (`optimizer.lr=inf` trains one
step at an infinite rate, then stops on NaN). Each check raises ConfigError naming the key.
"""

from __future__ import annotations

import difflib
import logging
import math
import typing
from typing import Any

import torch
from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT
from omegaconf import DictConfig, OmegaConf

from kto_lightning.core import metrics
from kto_lightning.core.health import COUNTERS
from kto_lightning.errors import ConfigError
from kto_lightning.training import online, sft

log = logging.getLogger("kto_lightning")


def _precisions() -> list[str]:
    """The values Lightning takes for `trainer.precision`, as text."""
    values: list[str] = []
    for literal in typing.get_args(_PRECISION_INPUT):
        values += [str(v) for v in typing.get_args(literal)]
    return values


def check_integer(key: str, value: Any, minimum: int) -> None:
    """ConfigError naming `key` unless `value` is an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


def check_trainer(trainer: DictConfig) -> None:
    """The trainer keys Lightning would refuse with a traceback only once it is built."""
    check_integer("trainer.accumulate_grad_batches", trainer.get("accumulate_grad_batches", 1), 1)
    precision = str(trainer.get("precision", "32-true"))
    if precision not in _precisions():
        raise ConfigError(
            f"trainer.precision={precision!r} is not a precision; use one of "
            f"{', '.join(p for p in _precisions() if not p.isdigit())} (bf16-mixed on a recent "
            "GPU, 32-true on a CPU)"
        )
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise ConfigError(
            f"trainer.accelerator={accelerator} (trainer=gpu), but torch ({torch.__version__}, "
            f"{build}) sees no CUDA GPU; use trainer=cpu, or trainer.accelerator=auto to take a "
            "GPU when there is one (README, 'Real models', says how to install a CUDA build)"
        )


def check_numbers(group: str, node: DictConfig | None) -> None:
    """Every number under `group` (optimizer, scheduler) finite; a learning rate above 0."""
    if node is None:
        return
    values = OmegaConf.to_container(node, resolve=True)
    assert isinstance(values, dict)
    for key, value in values.items():
        numbers = value if isinstance(value, list) else [value]
        for number in numbers:
            if isinstance(number, float) and not math.isfinite(number):
                raise ConfigError(f"{group}.{key!s} must be a finite number, got {number!r}")
        if key == "lr" and isinstance(value, int | float) and value <= 0:
            raise ConfigError(f"{group}.lr must be above 0, got {value!r}")


def check_chunk_size(value: Any) -> None:
    """`logprob_chunk_size`: auto, or a number of completion positions >= 1."""
    if value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"logprob_chunk_size must be auto or an integer >= 1 (completion positions per LM-head "
            f"chunk), got {value!r}"
        )


def check_values(cfg: DictConfig) -> None:
    """The run's untyped values: the root file's, the trainer's, the optimizer's numbers."""
    check_integer("seed", cfg.seed, 0)
    check_chunk_size(cfg.get("logprob_chunk_size", "auto"))
    check_trainer(cfg.trainer)
    check_numbers("optimizer", cfg.get("optimizer"))
    check_numbers("scheduler", cfg.get("scheduler"))


def logged_metrics(sft_stage: bool) -> list[str]:
    """The metrics a KTO (or, with `sft_stage`, an SFT) run logs: `train/...` and `val/...`,
    and the short names of the progress bar's validation value."""
    if sft_stage:
        names, extra = list(sft.sft_metrics(torch.zeros(len(sft.FIELDS)))), ["val_ppl"]
    else:
        names = list(metrics.metrics_from_sums(torch.zeros(len(metrics.FIELDS))))
        extra = ["val/rewards/auroc", "val_auroc"]  # over the whole validation set only
        # The run health counts, of training batches only (kto_lightning.core.health).
        health = ["kl_clamped", "saturated/desirable", "saturated/undesirable"]
        extra += [f"train/health/{name}" for name in health]
        extra += [f"train/health/run/{counter}" for counter in COUNTERS]
        # An online run's (online=step): its draws, and the held-out rewards.
        extra += [f"train/online/{name}" for name in online.TRAIN_METRICS]
        extra += list(online.VAL_METRICS)
    return [f"{stage}/{name}" for stage in ("val", "train") for name in names] + extra


def check_objective(name: str | None, sft_stage: bool) -> None:
    """`objective` names a metric the run logs: checked before training, so that a misspelt one
    does not fail after a full run (after every trial of a sweep).

    A name outside `train/` and `val/` that no logged metric resembles may be logged by a
    callback of the user's: it is let through with a warning.
    """
    if not name:
        return
    logged = logged_metrics(sft_stage)
    if name in logged:
        return
    close = difflib.get_close_matches(name, logged, n=1, cutoff=0.7)
    stage = "loss=sft" if sft_stage else "this loss"
    if close or name.startswith(("val/", "train/")):
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(
            f"objective={name!r} is not a metric {stage} logs{hint}; validation metrics: "
            f"{', '.join(m for m in logged if m.startswith('val/'))}"
        )
    log.warning(
        "objective=%s is not one of the metrics %s logs; unless a callback of yours logs it, the "
        "run will end without an objective",
        name,
        stage,
    )
