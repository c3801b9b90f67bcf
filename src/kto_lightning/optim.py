"""Optimizer parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from kto_lightning.errors import ConfigError

DECAYS = ("linear", "cosine", "constant")


def parameter_groups(model: nn.Module) -> list[dict]:
    """Trainable parameters, with biases and norm weights (1-D tensors) exempt from weight decay."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim >= 2]},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


def warmup_schedule(
    optimizer: Optimizer,
    total_steps: int,
    warmup_steps: int | None = None,
    warmup_ratio: float = 0.1,
    decay: str = "linear",
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup to the peak, then `decay` down to `min_lr_ratio` x the peak at `total_steps`.

    Step s of w warmup steps runs at (s + 1) / (w + 1) of the peak, so no step has a zero rate.

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

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if decay == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape

    return LambdaLR(optimizer, factor)
