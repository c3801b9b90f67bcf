"""Labelling: the rewards of sampled completions become KTO's binary labels.

Two rules, one float per completion in:
- `threshold_labels`: a reward at or above a fixed threshold is desirable; every row trains.
- `group_labels`: the k completions of one prompt are compared with each other. Above the group's
  mean reward is desirable, below it undesirable; a reward at the mean (a tie) and a group whose
  rewards are all equal carry no preference, and are dropped or kept as the options say.

Both return `Labels` (which rows are desirable, which are kept), and `class_weights` turns the
kept rows' counts into the loss's class weights as offline `auto` does (paper eq. 8).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kto_lightning.core.class_weights import resolve_class_weights
from kto_lightning.errors import ConfigError, DataError, check_number

DROP, KEEP = "drop", "keep"
TIE_OPTIONS = (DROP, KEEP)
# A reward this close to its group's mean, relative to the group's largest |reward|, is a tie: a
# mean of floats is rarely exact (the float32 rewards 0.1, 0.2 and 0.3 have a mean 2.5e-9 away
# from the middle one), and a float32 reward is itself only good to ~1e-7 of its size.
TIE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Labels:
    """The labels of N sampled completions, one entry per completion, on the CPU.

    Args:
        desirable: (N,) bool, True where a completion is desirable.
        keep: (N,) bool, True where a completion trains; a dropped row's `desirable` means nothing.
    """

    desirable: Tensor
    keep: Tensor

    def __post_init__(self) -> None:
        for name in ("desirable", "keep"):
            value = getattr(self, name)
            if value.dtype != torch.bool or value.dim() != 1:
                kind = f"{value.dtype} {tuple(value.shape)}"
                raise ValueError(f"Labels.{name} must be a 1-D bool tensor, got {kind}")
        if self.desirable.shape != self.keep.shape:
            raise ValueError(
                f"Labels.desirable has {self.desirable.numel()} rows, keep {self.keep.numel()}"
            )

    def __len__(self) -> int:
        return self.keep.numel()

    @property
    def kept_index(self) -> Tensor:
        """(M,) long: the positions of the kept rows, in order."""
        return self.keep.nonzero().squeeze(1)

    @property
    def kept_desirable(self) -> Tensor:
        """(M,) bool: the labels of the kept rows, in order (a batch's `labels`)."""
        return self.desirable[self.keep]

    @property
    def n_desirable(self) -> int:
        """Kept rows labelled desirable."""
        return int((self.desirable & self.keep).sum())

    @property
    def n_undesirable(self) -> int:
        """Kept rows labelled undesirable."""
        return int((~self.desirable & self.keep).sum())

    @property
    def n_kept(self) -> int:
        """Rows that train."""
        return int(self.keep.sum())

    @property
    def n_dropped(self) -> int:
        """Rows that do not train."""
        return int((~self.keep).sum())


def _rewards(rewards: Tensor | Sequence[float]) -> Tensor:
    """`rewards` as a 1-D float64 CPU tensor; DataError naming the first one that is not finite.

    Float64: the group means below are then exact to far below `TIE_TOLERANCE` for any k.
    """
    values = torch.as_tensor(rewards).detach().to("cpu", torch.float64)
    if values.dim() != 1:
        shape = tuple(values.shape)
        raise ValueError(f"rewards must be 1-D (one per completion), got shape {shape}")
    bad = (~torch.isfinite(values)).nonzero()
    if bad.numel():
        row = int(bad[0])
        raise DataError(
            f"the reward of completion {row} is {values[row].item()}: the reward function must "
            "return a finite number for every completion"
        )
    return values


def _check_option(key: str, value: str) -> str:
    if value not in TIE_OPTIONS:
        raise ConfigError(f"{key} must be one of {', '.join(TIE_OPTIONS)}, got {value!r}")
    return value


def _check_group_options(ties: str, equal_groups: str) -> None:
    """ConfigError for an option outside {drop, keep}, or for equal_groups=keep with ties=drop
    (the group's rows are all ties, which that rule drops: the setting would do nothing)."""
    _check_option("online.labelling.ties", ties)
    _check_option("online.labelling.equal_groups", equal_groups)
    if equal_groups == KEEP and ties == DROP:
        raise ConfigError(
            "online.labelling.equal_groups=keep keeps an all-equal group's rows as ties, which "
            "online.labelling.ties=drop drops; set ties=keep to train on them as undesirable, "
            "or equal_groups=drop"
        )


def threshold_labels(rewards: Tensor | Sequence[float], threshold: float) -> Labels:
    """A reward >= `threshold` is desirable, any other undesirable; every row is kept.

    Args:
        rewards: (N,) one reward per completion.
        threshold: `online.labelling.threshold`.
    """
    threshold = check_number("online.labelling.threshold", threshold)
    values = _rewards(rewards)
    return Labels(desirable=values >= threshold, keep=torch.ones_like(values, dtype=torch.bool))


def group_labels(
    rewards: Tensor | Sequence[float], k: int, ties: str = DROP, equal_groups: str = DROP
) -> Labels:
    """Each completion labelled against the other completions of its prompt.

    Among a prompt's k rewards, one above the group's mean is desirable and one below it is
    undesirable. One within `TIE_TOLERANCE` (relative to the group's largest |reward|) of the
    mean is a tie, as is every reward of a group whose rewards are all equal (within the same
    tolerance). Such a group carries no preference: `equal_groups` drops all of it or keeps it,
    its rows then following the tie rule. With k = 1 every group is such a group.

    Args:
        rewards: (n_prompts * k,) one reward per completion, the k completions of a prompt
            contiguous (prompt 0's k, then prompt 1's, ...: the order a `Sampler` returns).
        k: completions per prompt.
        ties: `online.labelling.ties`: "drop" a tie, or "keep" it as undesirable (it is not
            above the mean).
        equal_groups: `online.labelling.equal_groups`: "drop" every row of an all-equal group,
            or "keep" them as ties (undesirable, which needs ties=keep).

    Raises:
        ConfigError: an option outside {drop, keep}, or equal_groups=keep with ties=drop (the
            group's rows are all ties, which that rule drops: the setting would do nothing).
        ValueError: k < 1, or a number of rewards that is not a multiple of k.
        DataError: a reward that is not a finite number.
    """
    _check_group_options(ties, equal_groups)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (completions per prompt) must be an integer >= 1, got {k!r}")
    values = _rewards(rewards)
    if values.numel() % k:
        raise ValueError(
            f"{values.numel()} rewards do not split into groups of k={k} completions per prompt"
        )
    groups = values.view(-1, k)  # (n_prompts, k)
    mean = groups.mean(dim=1, keepdim=True)
    scale = groups.abs().amax(dim=1, keepdim=True)
    tie = (groups - mean).abs() <= TIE_TOLERANCE * scale
    desirable = (groups > mean) & ~tie
    keep = ~tie if ties == DROP else torch.ones_like(tie)
    if equal_groups == DROP:
        keep &= ~tie.all(dim=1, keepdim=True)
    return Labels(desirable=desirable.flatten(), keep=keep.flatten())


def class_weights(
    labels: Labels, desirable_weight: float | str, undesirable_weight: float | str
) -> tuple[float, float, list[str]]:
    """The loss's class weights (lambda_D, lambda_U) for the kept rows of one draw.

    As offline (`kto_lightning.core.class_weights.resolve_class_weights`), counted over the rows
    that train: an "auto" side makes lambda_D * n_D / (lambda_U * n_U) = 1 (paper eq. 8) for the
    desirable and undesirable rows this draw kept; numeric weights come back as they are, with a
    warning when the ratio is outside [1, 4/3].

    Args:
        labels: the draw's labels.
        desirable_weight: `loss.desirable_weight`, a number >= 0 or "auto".
        undesirable_weight: `loss.undesirable_weight`, a number >= 0 or "auto".

    Returns:
        `(lambda_D, lambda_U, warnings)`; the warnings are messages for the caller to log.

    Raises:
        DataError: the draw kept no row (check `labels.n_kept` first to skip such a draw).
    """
    n_desirable, n_undesirable = labels.n_desirable, labels.n_undesirable
    if n_desirable + n_undesirable == 0:
        raise DataError(
            f"every one of the {len(labels)} sampled completions was dropped (ties or all-equal "
            "groups), so class weights cannot be resolved"
        )
    return resolve_class_weights(desirable_weight, undesirable_weight, n_desirable, n_undesirable)


THRESHOLD, GROUP = "threshold", "group"


@dataclass(frozen=True)
class Labelling:
    """How a draw's rewards become labels (`online.labelling`).

    Args:
        rule: "threshold" (`threshold_labels`) or "group" (`group_labels`).
        threshold: the threshold rule's bar: a reward at or above it is desirable.
        ties: the group rule's ties: "drop" or "keep" (as undesirable).
        equal_groups: the group rule's all-equal groups: "drop" or "keep" (as ties).
    """

    rule: str = THRESHOLD
    threshold: float = 0.5
    ties: str = DROP
    equal_groups: str = DROP

    def __post_init__(self) -> None:
        if self.rule not in (THRESHOLD, GROUP):
            raise ConfigError(
                f"online.labelling.rule must be {THRESHOLD} or {GROUP}, got {self.rule!r}"
            )
        check_number("online.labelling.threshold", self.threshold)
        _check_option("online.labelling.ties", self.ties)
        _check_option("online.labelling.equal_groups", self.equal_groups)
        if self.rule == GROUP:  # when the run is built, not at its first step
            _check_group_options(self.ties, self.equal_groups)

    def __call__(self, rewards: Tensor | Sequence[float], k: int) -> Labels:
        """The labels of one draw's rewards, the k completions of a prompt together."""
        if self.rule == THRESHOLD:
            return threshold_labels(rewards, self.threshold)
        return group_labels(rewards, k, self.ties, self.equal_groups)
