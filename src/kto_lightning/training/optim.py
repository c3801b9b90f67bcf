"""Optimizer construction, gradient clipping across precisions, and the learning-rate schedule."""

from __future__ import annotations

import logging
from collections.abc import Callable

from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LinearLR, LRScheduler, SequentialLR
from transformers import get_constant_schedule, get_wsd_schedule

from kto_lightning.errors import ConfigError

log = logging.getLogger(__name__)

DECAYS = ("linear", "cosine", "constant")


def parameter_groups(model: nn.Module) -> list[dict]:
    """Trainable parameters, with biases and norm weights (1-D tensors) exempt from weight decay."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim >= 2]},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


def _unscales_in_step(optimizer: Optimizer) -> bool:
    # Fused AdamW/Adam/SGD take a GradScaler's scale into their kernel instead of unscaling first.
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def build_optimizer(
    factory: Callable[..., Optimizer],
    groups: list[dict],
    precision: Precision,
    clip_val: float | None,
) -> Optimizer:
    """`factory(groups)`, unfused where a fused kernel cannot be clipped: fp16 with a GradScaler.

    Under a GradScaler the gradients stay scaled until a fused optimizer's step unscales them
    inside its kernel, so clipping before the step would clip the scaled values; Lightning then
    refuses to clip at all. bf16 and fp32 have no scaler and keep the fused kernel (see
    `clip_gradients`).
    """
    # Copies: torch writes every default (`fused` included) into the group dicts it is given.
    optimizer = factory([dict(group) for group in groups])
    scaled = isinstance(precision, MixedPrecision) and precision.scaler is not None
    if scaled and clip_val and _unscales_in_step(optimizer):
        log.warning(
            "optimizer: %s runs unfused: gradient clipping (trainer.gradient_clip_val=%s) under "
            "fp16 loss scaling needs the gradients unscaled before the step",
            type(optimizer).__name__,
            clip_val,
        )
        optimizer = factory([dict(group) for group in groups], fused=False)
    return optimizer


def clip_gradients(
    precision: Precision,
    optimizer: Optimizer,
    clip_val: float | None,
    algorithm: str | None,
) -> None:
    """Clip as `trainer.gradient_clip_val` / `gradient_clip_algorithm` ask, in every precision.

    Lightning's MixedPrecision refuses to clip with any optimizer that unscales inside its step,
    even under bf16, where no scaler exists and the gradients are the true ones. There the base
    Precision's clipping is exact, so it is called directly; every other plugin clips its own way
    (DeepSpeed, for one, clips inside its engine).
    """
    if not clip_val:
        return
    kind = GradClipAlgorithmType(algorithm or "norm")
    if isinstance(precision, MixedPrecision) and precision.scaler is None:
        Precision.clip_gradients(precision, optimizer, clip_val, kind)
    else:
        precision.clip_gradients(optimizer, clip_val, kind)


def warmup_schedule(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float = 0.1,
    decay: str = "linear",
    min_lr_ratio: float = 0.0,
) -> LRScheduler:
    """Linear warmup to the peak, then `decay` down to `min_lr_ratio` x the peak at `total_steps`.

    Step s of w warmup steps runs at (s + 1) / (w + 1) of the peak, so no step has a zero rate.
    After `total_steps` the rate stays at the floor.

    Args:
        optimizer: the optimizer whose learning rate is scheduled.
        total_steps: optimizer steps of the whole run (the module passes Lightning's estimate).
        warmup_steps: steps of warmup; None derives it from `warmup_ratio`.
        warmup_ratio: share of `total_steps` spent warming up when `warmup_steps` is None.
        decay: "linear", "cosine" or "constant" after warmup.
        min_lr_ratio: the floor, as a fraction of the peak learning rate.
    """
    if decay not in DECAYS:
        raise ConfigError(f"scheduler.decay must be one of {list(DECAYS)}, got {decay!r}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ConfigError(f"scheduler.warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    total = max(1, int(total_steps))
    warmup = int(total * warmup_ratio) if warmup_steps is None else warmup_steps
    if warmup < 0:
        raise ConfigError(f"scheduler.warmup_steps must be >= 0, got {warmup}")

    if decay == "constant":
        after = get_constant_schedule(optimizer)
    else:
        # transformers' warmup-stable-decay schedule with no warmup and no stable phase: the
        # decay to `min_lr_ratio`, held there after the last step. Its warmup-with-decay
        # siblings do not fit: `get_linear_schedule_with_warmup` has no floor, and
        # `get_cosine_with_min_lr_schedule_with_warmup` climbs back up after `total_steps`.
        after = get_wsd_schedule(
            optimizer,
            num_warmup_steps=0,
            num_stable_steps=0,
            num_decay_steps=max(1, total - warmup),
            decay_type=decay,
            min_lr_ratio=min_lr_ratio,
        )
    # The warmup is torch's LinearLR, not transformers': theirs runs step s at s / w of the peak,
    # so the first step trains at a rate of 0; from 1 / (w + 1) the ramp reaches (s + 1) / (w + 1).
    # With no warmup it does nothing, but stays: every schedule then has the same state layout, and
    # a checkpoint loads into a run whose total_steps, and so warmup, differ (more epochs).
    ramp = LinearLR(optimizer, start_factor=1 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [ramp, after], milestones=[warmup])
