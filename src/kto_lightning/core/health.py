"""Run-health counts of KTO training, kept on the device: no function here reads a value on the
host, so counting every step adds no wait to it.

Two facts per training batch feed the run health report (kto_lightning.reporting.health):
- the KL reference point was 0 although the estimator had log-ratios to average: their mean was
  <= 0, and the loss clamped z_ref to 0 (`kl_clamped`, from the batch's sums over all ranks);
- a row is *saturated* when its sigmoid is flat: ``|x| > SATURATION_LOGIT`` (4.585) for
  ``x = beta * (log-ratio - z_ref)``, where the gradient weight ``sigmoid(x) * (1 - sigmoid(x))``
  is below 0.01, under 4% of its largest value (0.25, at x = 0): such a row hardly trains.

`saturation_sums` counts saturated rows of a batch by class; `update_counters` adds a batch's sums
over all ranks (`kto_lightning.core.metrics.FIELDS`, then `SATURATION_FIELDS`) to the run's
counters (`COUNTERS`): totals, and streaks of consecutive batches in a bad state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kto_lightning.core.metrics import FIELDS, field, kl_clamped

# sigmoid'(x) = sigmoid(x) * (1 - sigmoid(x)) = 1 / (4 cosh(x/2)^2) < 0.01  <=>  |x| > 2 acosh(5).
SATURATION_LOGIT = 2 * math.acosh(5.0)  # 4.585
# The two sums `saturation_sums` appends to a batch's metric sums.
SATURATION_FIELDS = ("saturated_desirable", "saturated_undesirable")
# The run's counters, in order: each over all ranks, counted in training batches.
COUNTERS = (
    "batches",  # training batches seen
    "kl_clamped",  # ... whose z_ref was clamped to 0
    "kl_clamped_streak",  # consecutive such batches, up to the last one
    "kl_clamped_longest",  # the longest such streak
    "saturated_streak",  # consecutive batches in which every row was saturated
    "saturated_longest",  # the longest such streak
    "desirable",  # desirable rows seen
    "undesirable",  # undesirable rows seen
    "saturated_desirable",  # ... of them saturated
    "saturated_undesirable",
)


def saturation_sums(rewards: Tensor, labels: Tensor, threshold: Tensor | float) -> Tensor:
    """Saturated rows of a batch, ``(desirable, undesirable)`` as a float32 (2,) vector.

    Args:
        rewards: (B,) implied rewards ``beta * (policy - reference log-probs)``.
        labels: (B,) bool, True = desirable.
        threshold: () the loss's decision boundary ``beta * z_ref`` (0 for APO-zero), so that
            ``rewards - threshold`` is the sigmoid's argument.
    """
    saturated = (rewards.detach().float() - threshold).abs() > SATURATION_LOGIT
    desirable = labels.to(torch.bool)
    return torch.stack([(saturated & desirable).sum(), (saturated & ~desirable).sum()]).float()


def saturation_metrics(sums: Tensor) -> dict[str, Tensor]:
    """This batch's health metrics from its sums (`FIELDS` then `SATURATION_FIELDS`).

    ``health/kl_clamped`` is 1 when z_ref was clamped to 0; the saturated shares are NaN for a
    class with no row.
    """
    base, saturated = sums[: len(FIELDS)], sums[len(FIELDS) :]
    desirable, undesirable = field(base, "desirable"), field(base, "undesirable")
    return {
        "health/kl_clamped": kl_clamped(base),
        "health/saturated/desirable": _share(saturated[0], desirable),
        "health/saturated/undesirable": _share(saturated[1], undesirable),
    }


def _share(count: Tensor, total: Tensor) -> Tensor:
    return torch.where(total > 0, count / total.clamp(min=1), torch.nan)


def update_counters(counters: Tensor | None, step_sums: Tensor) -> Tensor:
    """The run's `COUNTERS` after one more training batch.

    Args:
        counters: (len(COUNTERS),) the counters so far; None before the first batch.
        step_sums: the batch's sums over all ranks: `FIELDS`, then `SATURATION_FIELDS`.
    """
    base, saturated = step_sums[: len(FIELDS)].float(), step_sums[len(FIELDS) :].float()
    if counters is None:
        counters = base.new_zeros(len(COUNTERS))
    rows = field(base, "rows")
    clamped = kl_clamped(base)
    all_saturated = ((saturated.sum() >= rows) & (rows > 0)).float()
    # A streak is (streak + 1) while the state holds and 0 once it does not; the longest streak
    # is kept too, so a streak that ends between two reads of the counters is still seen.
    clamped_streak = (counters[2] + 1) * clamped
    saturated_streak = (counters[4] + 1) * all_saturated
    return torch.stack(
        [
            counters[0] + 1,
            counters[1] + clamped,
            clamped_streak,
            torch.maximum(counters[3], clamped_streak),
            saturated_streak,
            torch.maximum(counters[5], saturated_streak),
            counters[6] + field(base, "desirable"),
            counters[7] + field(base, "undesirable"),
            counters[8] + saturated[0],
            counters[9] + saturated[1],
        ]
    )


def counter_metrics(counters: Tensor) -> dict[str, Tensor]:
    """The counters by name, as ``health/run/<counter>``, for logging."""
    return {f"health/run/{name}": counters[i] for i, name in enumerate(COUNTERS)}
