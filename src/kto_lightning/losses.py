"""KTO loss (Ethayarajh et al. 2024, eq. 7-8) and the unpaired APO-zero variant.

Everything here is a pure function of local tensors. The reference point z_ref is a mean over
the whole global batch, so the caller computes local ``(sum, count)`` with `kl_statistics`,
all-reduces both, turns them into z_ref with `reference_point_from_statistics` and passes it to
`kto_loss`. No function here reduces across ranks, calls ``.item()`` or branches on tensor values,
so none of them forces a device sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from kto_lightning.errors import ConfigError, DataError

ESTIMATORS = ("mismatched", "batch", "zero")
LOSS_TYPES = ("kto", "apo_zero_unpaired")


def _check_number(key: str, value: object) -> float:
    # bool is an int subclass; `beta: true` in a YAML file is a typo, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class KTOLossConfig:
    """Hyperparameters of the loss; validated on construction (raises `ConfigError`)."""

    beta: float = 0.1
    # A number >= 0, or "auto" (on one side at most): set from the class counts by
    # `with_class_counts` so that lambda_D * n_D / (lambda_U * n_U) = 1 (paper eq. 8).
    desirable_weight: float | str = 1.0
    undesirable_weight: float | str = 1.0
    estimator: str = "mismatched"
    loss_type: str = "kto"

    def __post_init__(self) -> None:
        beta = _check_number("loss.beta", self.beta)
        if beta <= 0:
            raise ConfigError(f"loss.beta must be > 0, got {self.beta!r}")
        weights = [
            _parse_weight(f"loss.{key}", getattr(self, key))
            for key in ("desirable_weight", "undesirable_weight")
        ]
        if weights == [AUTO, AUTO]:
            raise ConfigError(
                "loss.desirable_weight and loss.undesirable_weight are both 'auto'; at most one "
                "may be 'auto' (set the other to a number, e.g. 1.0)"
            )
        if weights == [0, 0]:
            raise ConfigError(
                "loss.desirable_weight and loss.undesirable_weight are both 0; "
                "at least one must be > 0"
            )
        if self.estimator not in ESTIMATORS:
            raise ConfigError(
                f"loss.estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}"
            )
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(
                f"loss.loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}"
            )

    @property
    def needs_kl_rows(self) -> bool:
        """Whether the batch must carry (prompt, unrelated completion) KL rows."""
        return self.loss_type == "kto" and self.estimator == "mismatched"

    @property
    def weights_resolved(self) -> bool:
        """False while a class weight is still "auto"."""
        return all(not isinstance(w, str) for w in (self.desirable_weight, self.undesirable_weight))

    def with_class_counts(
        self, n_desirable: int, n_undesirable: int
    ) -> tuple[KTOLossConfig, list[str]]:
        """This config with "auto" weights set from the class counts, and warnings to log."""
        desirable, undesirable, warnings = resolve_class_weights(
            self.desirable_weight, self.undesirable_weight, n_desirable, n_undesirable
        )
        return replace(self, desirable_weight=desirable, undesirable_weight=undesirable), warnings


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
    device = policy_logps.device
    if estimator == "zero":
        zero = torch.zeros((), dtype=torch.float32, device=device)
        return zero, zero.clone()
    if estimator == "batch":
        ratios = policy_logps.detach().float() - reference_logps.detach().float()
    elif estimator == "mismatched":
        if kl_policy_logps is None or kl_reference_logps is None:
            raise ValueError(
                "estimator 'mismatched' needs kl_policy_logps and kl_reference_logps "
                "(the batch has no KL rows)"
            )
        ratios = kl_policy_logps.detach().float() - kl_reference_logps.detach().float()
    else:
        raise ConfigError(
            f"loss.estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}"
        )
    count = torch.tensor(float(ratios.numel()), dtype=torch.float32, device=device)
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
    config: KTOLossConfig,
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


def kto_loss_single_process(
    policy_logps: Tensor,
    reference_logps: Tensor,
    labels: Tensor,
    config: KTOLossConfig,
    kl_policy_logps: Tensor | None = None,
    kl_reference_logps: Tensor | None = None,
) -> KTOLossOutput:
    """`kl_statistics` -> `reference_point_from_statistics` -> `kto_loss`, with no reduction.

    Shapes as in `kto_loss`; ``kl_*`` are (K,) and needed only when ``config.needs_kl_rows``.
    """
    # apo_zero_unpaired ignores z_ref, so it must not demand KL rows whatever the estimator.
    estimator = config.estimator if config.loss_type == "kto" else "zero"
    total, count = kl_statistics(
        estimator, policy_logps, reference_logps, kl_policy_logps, kl_reference_logps
    )
    reference_point = reference_point_from_statistics(total, count)
    return kto_loss(policy_logps, reference_logps, labels, reference_point, config)


# ------------------------------------------------------------------------------- class weights

AUTO = "auto"
# Paper eq. 8: lambda_D * n_D / (lambda_U * n_U) should lie in [1, 4/3].
RECOMMENDED_RATIO = (1.0, 4.0 / 3.0)


def _parse_weight(key: str, value: float | str) -> float | str:
    if isinstance(value, str):
        if value.strip().lower() == AUTO:
            return AUTO
        raise ConfigError(f"{key} must be a number >= 0 or {AUTO!r}, got {value!r}")
    weight = _check_number(key, value)
    if weight < 0:
        raise ConfigError(f"{key} must be >= 0, got {value!r}")
    return weight


def resolve_class_weights(
    desirable_weight: float | str,
    undesirable_weight: float | str,
    n_desirable: int,
    n_undesirable: int,
) -> tuple[float, float, list[str]]:
    """Turn an ``"auto"`` weight into a number from the class counts (paper eq. 8).

    - One side ``"auto"`` (case-insensitive): it is set so that
      ``lambda_D * n_D / (lambda_U * n_U) == 1``, the low end of the recommended
      `RECOMMENDED_RATIO` range; the other side keeps its value.
    - Both numeric: returned unchanged, with a warning when the ratio is outside
      `RECOMMENDED_RATIO` that states the ratio, the counts and the weight that would make it 1.
    - A class with no rows: no ratio exists; an ``"auto"`` side becomes 1.0 and a warning names
      the missing class.

    Args:
        desirable_weight: ``loss.desirable_weight``, a number >= 0 or ``"auto"``.
        undesirable_weight: ``loss.undesirable_weight``, a number >= 0 or ``"auto"``.
        n_desirable: desirable rows in the training set.
        n_undesirable: undesirable rows in the training set.

    Returns:
        ``(lambda_D, lambda_U, warnings)``; the warnings are messages for the caller to log.

    Raises:
        ConfigError: both sides ``"auto"``, a value that is neither a number >= 0 nor
            ``"auto"``, or a numeric 0 opposite an ``"auto"`` side (that would make both 0).
        DataError: both counts are 0.
    """
    keys = ("loss.desirable_weight", "loss.undesirable_weight")
    w_d = _parse_weight(keys[0], desirable_weight)
    w_u = _parse_weight(keys[1], undesirable_weight)
    if n_desirable < 0 or n_undesirable < 0:
        raise ValueError(f"class counts must be >= 0, got {n_desirable} and {n_undesirable}")
    if w_d == AUTO and w_u == AUTO:
        raise ConfigError(
            f"{keys[0]} and {keys[1]} are both {AUTO!r}; at most one may be {AUTO!r} "
            "(set the other to a number, e.g. 1.0)"
        )
    if n_desirable + n_undesirable == 0:
        raise DataError("the training set has no rows, so class weights cannot be resolved")

    warnings: list[str] = []
    if n_desirable == 0 or n_undesirable == 0:
        missing = "desirable" if n_desirable == 0 else "undesirable"
        present = n_undesirable if n_desirable == 0 else n_desirable
        other = "undesirable" if n_desirable == 0 else "desirable"
        message = (
            f"the training data is single-class: 0 {missing} rows ({present} {other}), so "
            f"lambda_D*n_D/(lambda_U*n_U) has no value"
        )
        if AUTO in (w_d, w_u):
            message += f"; {keys[0] if w_d == AUTO else keys[1]}={AUTO} falls back to 1.0"
        warnings.append(message)
        return (
            1.0 if w_d == AUTO else float(w_d),
            1.0 if w_u == AUTO else float(w_u),
            warnings,
        )

    if w_d == AUTO or w_u == AUTO:
        auto_key, fixed_key = keys if w_d == AUTO else keys[::-1]
        fixed = w_u if w_d == AUTO else w_d
        assert isinstance(fixed, float)
        if fixed == 0:
            raise ConfigError(
                f"{fixed_key}=0 leaves nothing for {auto_key}={AUTO} to balance against "
                "(both weights would be 0); set it > 0"
            )
        if w_d == AUTO:
            return fixed * n_undesirable / n_desirable, fixed, warnings
        return fixed, fixed * n_desirable / n_undesirable, warnings

    assert isinstance(w_d, float) and isinstance(w_u, float)
    ratio = w_d * n_desirable / (w_u * n_undesirable) if w_u > 0 else math.inf
    low, high = RECOMMENDED_RATIO
    # A relative tolerance so that weights typed to a few decimals (e.g. 1.3333) are not flagged.
    if ratio < low * (1 - 1e-6) or ratio > high * (1 + 1e-6):
        if w_u > 0:
            fix = f"{keys[0]}={w_u * n_undesirable / n_desirable:.4g}"
        else:
            fix = f"{keys[1]}={w_d * n_desirable / n_undesirable:.4g}"
        warnings.append(
            f"{keys[0]}={w_d!r} and {keys[1]}={w_u!r} give lambda_D*n_D/(lambda_U*n_U) = "
            f"{ratio:.4g} with {n_desirable} desirable and {n_undesirable} undesirable rows, "
            f"outside the recommended [1, 4/3]; {fix} (or {AUTO} on that side) sets it to 1"
        )
    return w_d, w_u, warnings
