"""KTO loss (Ethayarajh et al. 2024, eq. 7-8) and the unpaired APO-zero variant.

Everything here is a pure function of local tensors. The reference point z_ref is a mean over
the whole global batch, so the caller computes local ``(sum, count)`` with `kl_statistics`,
all-reduces both, turns them into z_ref with `reference_point_from_statistics` and passes it to
`kto_loss`. No function here reduces across ranks, calls ``.item()`` or branches on tensor values,
so none of them forces a device sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kto_lightning.core.class_weights import check_weights, resolve_class_weights
from kto_lightning.errors import ConfigError, check_number

ESTIMATORS = ("mismatched", "batch", "zero")
LOSS_TYPES = ("kto", "apo_zero_unpaired")


def _check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ConfigError(
            f"loss.estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}"
        )


@dataclass(frozen=True)
class _LossShape:
    """Which loss, and how its reference point is estimated: what decides the KL rows."""

    estimator: str = "mismatched"
    loss_type: str = "kto"

    @property
    def reference_estimator(self) -> str:
        """The estimator z_ref is computed with; APO-zero has no reference point at all."""
        return self.estimator if self.loss_type == "kto" else "zero"

    @property
    def needs_kl_rows(self) -> bool:
        """Whether each batch must carry (prompt, unrelated completion) KL rows."""
        return self.reference_estimator == "mismatched"


@dataclass(frozen=True)
class KTOLossConfig(_LossShape):
    """The `loss` config group as YAML gives it; validated on construction (raises ConfigError).

    A class weight may be "auto" (on one side at most): `with_class_counts` turns this into the
    `KTOLoss` the loss uses, with that side set so that lambda_D * n_D / (lambda_U * n_U) = 1
    (paper eq. 8).
    """

    beta: float = 0.1
    desirable_weight: float | str = 1.0
    undesirable_weight: float | str = 1.0

    def __post_init__(self) -> None:
        beta = check_number("loss.beta", self.beta)
        if beta <= 0:
            raise ConfigError(f"loss.beta must be > 0, got {self.beta!r}")
        check_weights(self.desirable_weight, self.undesirable_weight)
        _check_estimator(self.estimator)
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(
                f"loss.loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}"
            )

    def with_class_counts(self, n_desirable: int, n_undesirable: int) -> tuple[KTOLoss, list[str]]:
        """The `KTOLoss` for these class counts (an "auto" weight resolved), and warnings to log."""
        desirable, undesirable, warnings = resolve_class_weights(
            self.desirable_weight, self.undesirable_weight, n_desirable, n_undesirable
        )
        loss = KTOLoss(
            beta=float(self.beta),
            desirable_weight=desirable,
            undesirable_weight=undesirable,
            estimator=self.estimator,
            loss_type=self.loss_type,
        )
        return loss, warnings


@dataclass(frozen=True)
class KTOLoss(_LossShape):
    """The loss's hyperparameters as `kto_loss` uses them: numbers only.

    Built by `KTOLossConfig.with_class_counts`, which validates; tests may build one directly.
    """

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


@dataclass(frozen=True)
class KTOLossOutput:
    """Per-example results of `kto_loss`.

    Attributes:
        losses: (B,) weighted per-example losses, carrying the graph to ``policy_logps``.
        rewards: (B,) implied rewards ``beta * (policy_logps - reference_logps)``, detached.
        reference_point: () the z_ref used (not scaled by beta, >= 0), detached.
    """

    losses: Tensor
    rewards: Tensor
    reference_point: Tensor


def kl_statistics(
    estimator: str,
    policy_logps: Tensor,
    reference_logps: Tensor,
    kl_policy_logps: Tensor | None = None,
    kl_reference_logps: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Local ``(sum, count)`` of the log-ratios whose mean defines z_ref.

    Args:
        estimator: one of `ESTIMATORS`.
        policy_logps: (B,) summed completion log-probs under the policy.
        reference_logps: (B,) the same under the reference model.
        kl_policy_logps: (K,) policy log-probs of the KL (mismatched) rows; needed for
            ``mismatched``.
        kl_reference_logps: (K,) reference log-probs of the KL rows; needed for ``mismatched``.

    Returns:
        ``(total, count)``: detached float32 scalars on ``policy_logps.device``; ``(0, 0)`` for
        ``zero``. Summing these over ranks and then calling `reference_point_from_statistics`
        gives the global mean, which averaging per-rank means would not when ranks differ in size.
    """
    _check_estimator(estimator)
    device = policy_logps.device
    if estimator == "zero":
        zero = torch.zeros((), dtype=torch.float32, device=device)
        return zero, zero.clone()
    if estimator == "batch":
        ratios = policy_logps.detach().float() - reference_logps.detach().float()
    else:  # mismatched
        if kl_policy_logps is None or kl_reference_logps is None:
            raise ValueError(
                "estimator 'mismatched' needs kl_policy_logps and kl_reference_logps "
                "(the batch has no KL rows)"
            )
        ratios = kl_policy_logps.detach().float() - kl_reference_logps.detach().float()
    # A fill on the device: torch.tensor(..., device=) would copy from the host and wait for it.
    count = torch.full((), float(ratios.numel()), dtype=torch.float32, device=device)
    return ratios.sum(), count


def reference_point_from_statistics(total: Tensor, count: Tensor) -> Tensor:
    """z_ref = max(0, total / count), or 0 when ``count == 0``.

    Args:
        total: () summed log-ratios (already all-reduced by the caller if multi-rank).
        count: () number of log-ratios summed.

    Returns:
        () detached tensor, >= 0.
    """
    total, count = total.detach(), count.detach()
    has_rows = count > 0
    # Divide by a safe denominator so no NaN is ever produced, even in the discarded branch.
    mean = total / torch.where(has_rows, count, torch.ones_like(count))
    return torch.where(has_rows, mean, torch.zeros_like(mean)).clamp(min=0)


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    labels: Tensor,
    reference_point: Tensor,
    config: KTOLoss,
) -> KTOLossOutput:
    """Per-example KTO (or unpaired APO-zero) loss.

    Args:
        policy_logps: (B,) summed completion log-probs under the policy (with grad).
        reference_logps: (B,) the same under the frozen reference (expected detached).
        labels: (B,) bool, True = desirable.
        reference_point: () z_ref, already reduced across ranks; ignored for apo_zero_unpaired.
        config: loss hyperparameters.

    Returns:
        `KTOLossOutput`. Computes in float32 (float64 inputs stay float64).
    """
    if policy_logps.shape != reference_logps.shape or policy_logps.shape != labels.shape:
        raise ValueError(
            "policy_logps, reference_logps and labels must have the same (B,) shape, got "
            f"{tuple(policy_logps.shape)}, {tuple(reference_logps.shape)}, {tuple(labels.shape)}"
        )
    # Half-precision sigmoids of log-ratio differences lose the small values that matter here.
    dtype = torch.promote_types(policy_logps.dtype, torch.float32)
    beta = config.beta
    rewards = beta * (policy_logps.to(dtype) - reference_logps.to(dtype))
    desirable = labels.to(torch.bool)

    if config.loss_type == "kto":
        # z_ref is a baseline, not something to optimise: no gradient may flow through it.
        z_ref = reference_point.detach().to(device=rewards.device, dtype=dtype)
        margin = rewards - beta * z_ref
    else:  # apo_zero_unpaired: no reference point.
        z_ref = torch.zeros((), dtype=dtype, device=rewards.device)
        margin = rewards

    # 1 - sigmoid(x) == sigmoid(-x), and the latter keeps precision when sigmoid(x) is near 1.
    # Both branches are finite for every row, so torch.where cannot leak NaN into the gradient,
    # and all-desirable / all-undesirable batches need no special case.
    # Undesirable: 1 - sigmoid(beta * z_ref - r) == sigmoid(margin); for APO-zero, sigmoid(r).
    desirable_loss = config.desirable_weight * torch.sigmoid(-margin)
    undesirable_loss = config.undesirable_weight * torch.sigmoid(margin)
    losses = torch.where(desirable, desirable_loss, undesirable_loss)
    return KTOLossOutput(losses=losses, rewards=rewards.detach(), reference_point=z_ref)
