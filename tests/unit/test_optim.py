"""Tests for training/optim.py: weight-decay groups and the warmup schedule, hand-computed."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch import nn
from torch.testing import assert_close

from kto_lightning.errors import ConfigError
from kto_lightning.training.optim import (
    build_optimizer,
    clip_gradients,
    parameter_groups,
    warmup_schedule,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.embed = nn.Embedding(5, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def ids(params) -> set[int]:
    return {id(p) for p in params}


def test_parameter_groups_exempt_1d_params_from_decay():
    net = Net()
    decay, no_decay = parameter_groups(net)
    assert ids(decay["params"]) == ids([net.linear.weight, net.embed.weight])
    assert ids(no_decay["params"]) == ids([net.linear.bias, net.norm.weight, net.norm.bias])
    assert "weight_decay" not in decay
    assert no_decay["weight_decay"] == 0.0


def test_parameter_groups_leave_out_frozen_params():
    net = Net()
    grouped = ids(p for group in parameter_groups(net) for p in group["params"])
    assert grouped.isdisjoint(ids(net.frozen.parameters()))


def test_adamw_decays_only_the_matrices():
    net = Net()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    optimizer = torch.optim.AdamW(parameter_groups(net), lr=0.1, weight_decay=0.5)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    # With zero gradients AdamW's only change is the decoupled decay: p *= 1 - lr * wd = 0.95.
    for name, p in net.named_parameters():
        expected = (
            before[name] * 0.95 if name in ("linear.weight", "embed.weight") else before[name]
        )
        assert_close(p.detach(), expected, msg=name)


# ------------------------------------------------------------------------------------ schedule


def lr_factors(steps: int, **kwargs) -> list[float]:
    """The learning rate (peak 1.0) at steps 0..steps-1, read from the optimizer."""
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = warmup_schedule(optimizer, **kwargs)
    factors = []
    for _ in range(steps):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return factors


def test_linear_warmup_then_linear_decay():
    factors = lr_factors(13, total_steps=10, warmup_steps=2, decay="linear")
    # Warmup: (step + 1) / 3; then 1 - (step - 2) / 8, reaching 0 at step 10 and staying there.
    expected = [1 / 3, 2 / 3, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0, 0.0, 0.0]
    assert_close(torch.tensor(factors), torch.tensor(expected))


def test_linear_decay_to_a_floor():
    factors = lr_factors(11, total_steps=10, warmup_steps=2, decay="linear", min_lr_ratio=0.2)
    assert_close(factors[2], 1.0)
    assert_close(factors[6], 0.2 + 0.8 * 0.5)
    assert_close(factors[10], 0.2)


def test_cosine_decay():
    factors = lr_factors(11, total_steps=10, warmup_steps=2, decay="cosine")
    assert_close(factors[0], 1 / 3)
    assert_close(factors[2], 1.0)
    assert_close(factors[4], 0.5 * (1 + math.cos(math.pi / 4)))  # 0.8536
    assert_close(factors[6], 0.5)
    assert_close(factors[10], 0.0)


def test_cosine_decay_to_a_floor():
    factors = lr_factors(11, total_steps=10, warmup_steps=2, decay="cosine", min_lr_ratio=0.1)
    assert_close(factors[6], 0.1 + 0.9 * 0.5)
    assert_close(factors[10], 0.1)


def test_constant_after_warmup():
    factors = lr_factors(30, total_steps=10, warmup_steps=3, decay="constant")
    assert_close(factors[:4], [0.25, 0.5, 0.75, 1.0])
    assert factors[4:] == [1.0] * 26


def test_warmup_ratio_sets_the_warmup_length():
    # 25% of 20 steps = 5 warmup steps: 1/6 ... 5/6, then 1.0.
    factors = lr_factors(7, total_steps=20, warmup_ratio=0.25, decay="constant")
    assert_close(factors, [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0, 1.0])


def test_warmup_steps_override_the_ratio():
    factors = lr_factors(3, total_steps=10, warmup_steps=0, warmup_ratio=0.5, decay="linear")
    assert_close(factors, [1.0, 0.9, 0.8])


def test_no_warmup_with_ratio_zero():
    factors = lr_factors(2, total_steps=4, warmup_ratio=0.0, decay="linear")
    assert_close(factors, [1.0, 0.75])


def test_zero_total_steps_is_treated_as_one():
    factors = lr_factors(2, total_steps=0, decay="linear")
    assert_close(factors, [1.0, 0.0])


def hand_written_factor(
    step: int, total: int, warmup: int, decay: str, min_lr_ratio: float
) -> float:
    """The schedule as this repository wrote it before it came from torch and transformers."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


@pytest.mark.parametrize("decay", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1, 1.0])
@pytest.mark.parametrize(("total", "warmup"), [(1, 0), (10, 0), (10, 3), (37, 5), (4, 4), (3, 7)])
def test_library_schedule_equals_the_hand_written_one(total, warmup, decay, min_lr_ratio):
    # Past the last step too: the rate then stays at the floor (cosine does not climb back).
    factors = lr_factors(
        total + 10, total_steps=total, warmup_steps=warmup, decay=decay, min_lr_ratio=min_lr_ratio
    )
    expected = [
        hand_written_factor(s, total, warmup, decay, min_lr_ratio) for s in range(total + 10)
    ]
    assert_close(factors, expected, rtol=1e-12, atol=1e-12)


def test_schedule_resumes_from_its_state_dict():
    """A checkpoint holds the schedule's state; reloaded, it continues with the same rates."""

    def make():
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        kwargs = {"warmup_steps": 3, "decay": "cosine", "min_lr_ratio": 0.1}
        return optimizer, warmup_schedule(optimizer, total_steps=12, **kwargs)

    optimizer, scheduler = make()
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    state = copy.deepcopy(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    )
    expected = []
    for _ in range(10):
        optimizer.step()
        scheduler.step()
        expected.append(optimizer.param_groups[0]["lr"])

    resumed_optimizer, resumed = make()
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed.load_state_dict(state["scheduler"])
    rates = []
    for _ in range(10):
        resumed_optimizer.step()
        resumed.step()
        rates.append(resumed_optimizer.param_groups[0]["lr"])
    assert rates == expected


def test_a_schedule_state_loads_into_a_longer_run():
    # Resuming with more epochs: the checkpoint's schedule had no warmup (int(0.1 * 6) = 0).
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    short = warmup_schedule(optimizer, total_steps=6)
    for _ in range(6):
        optimizer.step()
        short.step()
    longer = warmup_schedule(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), 12)
    longer.load_state_dict(short.state_dict())
    assert longer.last_epoch == 6


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"decay": "exponential"}, "scheduler.decay"),
        ({"warmup_ratio": 1.0}, "scheduler.warmup_ratio"),
        ({"warmup_ratio": -0.1}, "scheduler.warmup_ratio"),
        ({"min_lr_ratio": 1.5}, "scheduler.min_lr_ratio"),
        ({"min_lr_ratio": -0.1}, "scheduler.min_lr_ratio"),
        ({"warmup_steps": -1}, "scheduler.warmup_steps"),
    ],
)
def test_schedule_errors_name_the_key(kwargs, key):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError, match=key):
        warmup_schedule(optimizer, total_steps=10, **kwargs)


# ------------------------------------------------------------------ clipping in every precision
PRECISIONS = {
    "32-true": Precision,
    "bf16-mixed": lambda: MixedPrecision("bf16-mixed", "cpu"),
    "16-mixed": lambda: MixedPrecision("16-mixed", "cpu"),  # with a GradScaler
}
FUSED_ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3, fused=True)


def fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(optimizer.param_groups[0]["fused"])


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_fused_optimizer_is_kept_where_clipping_allows(precision) -> None:
    plugin = PRECISIONS[precision]()
    groups = parameter_groups(Net())
    with_clip = build_optimizer(FUSED_ADAMW, groups, plugin, clip_val=1.0)
    # fp16's GradScaler leaves gradients scaled until a fused step: clipping needs them unfused.
    assert fused(with_clip) == (precision != "16-mixed")
    assert fused(build_optimizer(FUSED_ADAMW, groups, plugin, clip_val=None))
    assert fused(build_optimizer(FUSED_ADAMW, groups, plugin, clip_val=0.0))


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradients_are_clipped_with_a_fused_optimizer_in_every_precision(
    precision, algorithm
) -> None:
    net = Net()
    plugin = PRECISIONS[precision]()
    optimizer = build_optimizer(FUSED_ADAMW, parameter_groups(net), plugin, clip_val=0.05)
    trainable = [p for p in net.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.grad = torch.full_like(parameter, 3.0)
    clip_gradients(plugin, optimizer, 0.05, algorithm)
    if algorithm == "norm":
        total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable]))
        assert_close(total, torch.tensor(0.05), rtol=1e-5, atol=0)
    else:
        assert all((p.grad.abs() <= 0.05).all() for p in trainable)


def test_no_clip_value_leaves_gradients_alone() -> None:
    net = Net()
    plugin = PRECISIONS["bf16-mixed"]()
    optimizer = build_optimizer(FUSED_ADAMW, parameter_groups(net), plugin, clip_val=None)
    net.linear.weight.grad = torch.full_like(net.linear.weight, 3.0)
    clip_gradients(plugin, optimizer, None, None)
    assert (net.linear.weight.grad == 3.0).all()
