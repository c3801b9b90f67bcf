"""KTO metrics as sums and counts, so that ranks and steps combine count-weighted.

A batch yields one vector of sums (`batch_sums`); vectors add across steps and ranks;
`metrics_from_sums` turns the total into means. Averaging per-rank averages would weight a rank
with 3 desirable rows the same as one with 30; adding sums and counts does not.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Order of the entries in a sums vector.
FIELDS = (
    "loss_sum",
    "rows",
    "loss_desirable_sum",
    "desirable",
    "loss_undesirable_sum",
    "undesirable",
    "reward_desirable_sum",
    "reward_undesirable_sum",
    "logp_desirable_sum",
    "logp_undesirable_sum",
    "correct",
    "kl_sum",
    "kl_count",
    "real_tokens",
    "slot_tokens",
)
_INDEX = {name: i for i, name in enumerate(FIELDS)}


def batch_sums(
    losses: Tensor,
    rewards: Tensor,
    policy_logps: Tensor,
    labels: Tensor,
    kl_sum: Tensor,
    kl_count: Tensor,
    threshold: Tensor | float = 0.0,
    real_tokens: Tensor | float = 0.0,
    slot_tokens: Tensor | float = 0.0,
) -> Tensor:
    """One batch's sums, a float32 vector ordered as FIELDS. Inputs are (B,); the rest scalars.

    A row counts as correct when its implied reward lies on the side of `threshold` that its
    label asks for (desirable: above, undesirable: below; ties are wrong). The module passes the
    loss's own decision boundary, beta * z_ref, as the threshold. `real_tokens` and
    `slot_tokens` count the batch's non-pad tokens and all its token slots (padding included).
    """
    d = labels.float()
    u = 1.0 - d

    def scalar(value: Tensor | float) -> Tensor:
        # new_full fills on the device; new_tensor would copy from the host and wait for it.
        return value.float() if torch.is_tensor(value) else d.new_full((), float(value))

    losses, rewards, policy_logps = (t.detach().float() for t in (losses, rewards, policy_logps))
    correct = torch.where(labels, rewards > threshold, rewards < threshold).float()
    return torch.stack(
        [
            losses.sum(),
            scalar(len(labels)),
            (losses * d).sum(),
            d.sum(),
            (losses * u).sum(),
            u.sum(),
            (rewards * d).sum(),
            (rewards * u).sum(),
            (policy_logps * d).sum(),
            (policy_logps * u).sum(),
            correct.sum(),
            kl_sum.detach().float().reshape(()),
            kl_count.detach().float().reshape(()),
            scalar(real_tokens),
            scalar(slot_tokens),
        ]
    )


def field(sums: Tensor, name: str) -> Tensor:
    """The entry `name` (one of FIELDS) of a sums vector."""
    return sums[_INDEX[name]]


def kl_clamped(sums: Tensor) -> Tensor:
    """1.0 when the KL rows' mean log-ratio is <= 0, so the loss clamped z_ref to 0; else 0.0.

    Meant for one step's sums over all ranks (each step has its own z_ref). 0.0 without KL rows
    (loss.estimator=zero, APO-zero): there z_ref is 0 by choice, not clamped.
    """
    count = sums[_INDEX["kl_count"]]
    return ((count > 0) & (sums[_INDEX["kl_sum"]] <= 0)).float()


def _ratio(sums: Tensor, num: str, den: str) -> Tensor:
    # NaN, not 0, when a batch has no row of a class: a dashboard then shows a gap, not a lie.
    count = sums[_INDEX[den]]
    return torch.where(count > 0, sums[_INDEX[num]] / count.clamp(min=1), torch.nan)


def metrics_from_sums(sums: Tensor) -> dict[str, Tensor]:
    """Means from a (possibly reduced, possibly accumulated) sums vector."""
    chosen = _ratio(sums, "reward_desirable_sum", "desirable")
    rejected = _ratio(sums, "reward_undesirable_sum", "undesirable")
    kl = _ratio(sums, "kl_sum", "kl_count")
    return {
        "loss": _ratio(sums, "loss_sum", "rows"),
        "loss/desirable": _ratio(sums, "loss_desirable_sum", "desirable"),
        "loss/undesirable": _ratio(sums, "loss_undesirable_sum", "undesirable"),
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracy": _ratio(sums, "correct", "rows"),
        # The reference point as the loss uses it: clamped at zero; 0 when no KL rows were seen.
        "kl": torch.nan_to_num(kl, nan=0.0).clamp(min=0.0),
        "logps/chosen": _ratio(sums, "logp_desirable_sum", "desirable"),
        "logps/rejected": _ratio(sums, "logp_undesirable_sum", "undesirable"),
        "count/desirable": sums[_INDEX["desirable"]],
        "count/undesirable": sums[_INDEX["undesirable"]],
        # Share of the batch's token slots that are padding (main and KL rows).
        "padding": 1.0 - _ratio(sums, "real_tokens", "slot_tokens"),
    }


def reward_auroc(rewards: Tensor, labels: Tensor) -> Tensor:
    """AUROC of the implied reward as a score for the label; 0.5 when all rewards tie.

    NaN when only one class is present (AUROC is undefined then), and NaN when any reward is NaN
    or infinite: a diverged policy must not show a perfect score (torch.unique sorts NaN last,
    which would rank it above every finite reward).
    """
    if labels.all() or not labels.any() or not torch.isfinite(rewards).all():
        return torch.tensor(torch.nan)
    # Mann-Whitney U with average ranks for ties, in float64. torchmetrics' binary_auroc would
    # squash scores outside [0, 1] through a float32 sigmoid, which ties every reward above ~17.
    scores = rewards.detach().double().flatten().cpu()
    positive = labels.detach().flatten().cpu().bool()
    _, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # 1-based rank of the last member of each tie group
    average_rank = (ends - (counts.double() - 1) / 2)[inverse]
    n_pos = positive.sum().double()
    n_neg = positive.numel() - n_pos
    u = average_rank[positive].sum() - n_pos * (n_pos + 1) / 2
    return (u / (n_pos * n_neg)).float()
