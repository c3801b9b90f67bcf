"""One KTO step as a pure function: log-probs in; the loss, z_ref and metric sums out.

The module calls `kto_step` with a `Reduction` over its ranks (an all-reduce sum and the world
size); tests call it with `LOCAL`, the identity. Nothing here knows of models or batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kto_lightning.core.losses import (
    KTOLoss,
    KTOLossOutput,
    kl_statistics,
    kto_loss,
    reference_point_from_statistics,
)
from kto_lightning.core.metrics import batch_sums


@dataclass(frozen=True)
class StepLogps:
    """The summed completion log-probs of one step.

    Attributes:
        policy: (B,) the policy on the rows, carrying the graph.
        reference: (B,) the reference on the rows, detached.
        kl_policy: (K,) the policy on the KL rows (detached), when the loss needs KL rows.
        kl_reference: (K,) the reference on the KL rows, likewise.
    """

    policy: Tensor
    reference: Tensor
    kl_policy: Tensor | None = None
    kl_reference: Tensor | None = None


def _identity(tensor: Tensor) -> Tensor:
    return tensor


@dataclass(frozen=True)
class Reduction:
    """How a step's ranks combine: `sum` adds a tensor over ranks; gradients are averaged over
    `world_size` ranks by the strategy."""

    sum: Callable[[Tensor], Tensor] = _identity
    world_size: int = 1


LOCAL = Reduction()


@dataclass(frozen=True)
class StepResult:
    """What `kto_step` computes.

    Attributes:
        loss: () the loss to backpropagate: the mean over every row of every rank, once the
            strategy has averaged gradients over ranks.
        output: the per-row losses, the rewards and z_ref (`KTOLossOutput`).
        metric_sums: this rank's metric sums, ordered as `kto_lightning.core.metrics.FIELDS`.
    """

    loss: Tensor
    output: KTOLossOutput
    metric_sums: Tensor


def kto_step(
    logps: StepLogps,
    labels: Tensor,
    loss: KTOLoss,
    reduction: Reduction = LOCAL,
    real_tokens: Tensor | float = 0.0,
    slot_tokens: Tensor | float = 0.0,
) -> StepResult:
    """The KTO loss of one step, with z_ref and the normaliser taken over all ranks.

    labels (B,) bool; `real_tokens` and `slot_tokens` count the batch's non-pad tokens and all
    its token slots, for the padding metric.
    """
    kl_sum, kl_count = kl_statistics(
        loss.reference_estimator, logps.policy, logps.reference, logps.kl_policy, logps.kl_reference
    )
    rows = kl_sum.new_full((), float(len(labels)))  # a device fill, not a host copy that waits
    # One reduction for the reference point and the global row count: every rank then uses the
    # same z_ref, and the loss is normalised by the global number of rows.
    global_kl_sum, global_kl_count, global_rows = reduction.sum(
        torch.stack([kl_sum, kl_count, rows])
    )
    z_ref = reference_point_from_statistics(global_kl_sum, global_kl_count)
    output = kto_loss(logps.policy, logps.reference, labels, z_ref, loss)
    # Gradient averaging across ranks divides by the world size; multiplying it back makes the
    # result the exact mean over all rows of all ranks, even when ranks hold unequal batches.
    total = output.losses.sum() * reduction.world_size / global_rows
    sums = batch_sums(
        output.losses,
        output.rewards,
        logps.policy,
        labels,
        kl_sum,
        kl_count,
        threshold=loss.beta * output.reference_point,
        real_tokens=real_tokens,
        slot_tokens=slot_tokens,
    )
    return StepResult(loss=total, output=output, metric_sums=sums)
