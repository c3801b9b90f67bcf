"""Tests for kto_lightning.online.labelling: rewards -> KTO labels (threshold and group rules) and
the class weights of the kept rows, each against labels worked out by hand."""

from __future__ import annotations

import pytest
import torch

from kto_lightning.errors import ConfigError, DataError
from kto_lightning.online.labelling import (
    Labelling,
    Labels,
    class_weights,
    group_labels,
    threshold_labels,
)

T, F = True, False
# Three prompts, k = 3: means 2, 1/3 and 5 (the last group all equal).
GROUPED = [1.0, 2.0, 3.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0]


def assert_labels(labels: Labels, desirable: list[bool], keep: list[bool]) -> None:
    assert labels.keep.tolist() == keep
    # A dropped row's label means nothing: compare the kept ones.
    assert [d for d, k in zip(labels.desirable.tolist(), keep, strict=True) if k] == [
        d for d, k in zip(desirable, keep, strict=True) if k
    ]


def test_threshold_labels_at_or_above_the_threshold_are_desirable_and_all_rows_kept() -> None:
    labels = threshold_labels(torch.tensor([0.5, 0.49, 2.0, -1.0, 0.5]), threshold=0.5)
    assert labels.desirable.tolist() == [T, F, T, F, T]
    assert labels.keep.tolist() == [T] * 5
    assert (labels.n_desirable, labels.n_undesirable, labels.n_dropped) == (3, 2, 0)


def test_threshold_labels_take_a_list_of_floats() -> None:
    labels = threshold_labels([0.0, 1.0], threshold=1)
    assert labels.desirable.tolist() == [F, T]


def test_threshold_must_be_a_number() -> None:
    with pytest.raises(ConfigError, match=r"online\.labelling\.threshold"):
        threshold_labels([0.0], threshold="high")  # type: ignore[arg-type]


def test_group_labels_compare_with_the_group_mean_and_drop_ties_and_equal_groups() -> None:
    labels = group_labels(torch.tensor(GROUPED), k=3)
    # Group 0: 1 < 2, 2 == 2 (tie, dropped), 3 > 2. Group 1: 0, 0 < 1/3 < 1. Group 2: all equal.
    assert_labels(labels, [F, F, T, F, F, T, F, F, F], [T, F, T, T, T, T, F, F, F])
    assert (labels.n_desirable, labels.n_undesirable, labels.n_dropped) == (2, 3, 4)
    assert labels.kept_index.tolist() == [0, 2, 3, 4, 5]
    assert labels.kept_desirable.tolist() == [F, T, F, F, T]


def test_group_labels_keep_ties_as_undesirable_and_still_drop_equal_groups() -> None:
    labels = group_labels(torch.tensor(GROUPED), k=3, ties="keep")
    assert labels.desirable.tolist()[:6] == [F, F, T, F, F, T]
    assert labels.keep.tolist() == [T, T, T, T, T, T, F, F, F]


def test_group_labels_keep_equal_groups_as_ties() -> None:
    labels = group_labels(torch.tensor(GROUPED), k=3, ties="keep", equal_groups="keep")
    assert labels.desirable.tolist() == [F, F, T, F, F, T, F, F, F]
    assert labels.keep.tolist() == [T] * 9
    assert (labels.n_desirable, labels.n_undesirable) == (2, 7)


def test_a_reward_at_an_inexact_mean_is_a_tie() -> None:
    # In float32 the mean of 0.1, 0.2 and 0.3 is not exactly 0.2; the middle one is still a tie.
    rewards = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float32)
    assert rewards.double().mean() != rewards.double()[1]
    assert_labels(group_labels(rewards, k=3), [F, F, T], [T, F, T])
    # Three equal rewards whose float sum is inexact are an all-equal group.
    assert group_labels([0.1, 0.1, 0.1], k=3, ties="keep").keep.tolist() == [F, F, F]


def test_a_small_real_difference_is_not_a_tie() -> None:
    labels = group_labels([1.0, 1.001], k=2)
    assert_labels(labels, [F, T], [T, T])


def test_group_labels_with_k_1_label_nothing_unless_equal_groups_are_kept() -> None:
    assert group_labels([3.0, -1.0], k=1).keep.tolist() == [F, F]
    labels = group_labels([3.0, -1.0], k=1, ties="keep", equal_groups="keep")
    assert labels.keep.tolist() == [T, T]
    assert labels.desirable.tolist() == [F, F]


def test_group_labels_are_those_of_each_group_alone() -> None:
    rewards = torch.randn(4 * 5, generator=torch.Generator().manual_seed(0))
    together = group_labels(rewards, k=5, ties="keep")
    for group in range(4):
        alone = group_labels(rewards[group * 5 : (group + 1) * 5], k=5, ties="keep")
        assert together.desirable[group * 5 : (group + 1) * 5].tolist() == alone.desirable.tolist()


def test_group_labels_refuse_rewards_that_do_not_split_into_groups_of_k() -> None:
    with pytest.raises(ValueError, match=r"^5 rewards do not split into groups of k=2"):
        group_labels(torch.zeros(5), k=2)
    with pytest.raises(ValueError, match="1-D"):
        group_labels(torch.zeros(2, 3), k=3)
    with pytest.raises(ValueError, match=r"k .* >= 1, got 0"):
        group_labels(torch.zeros(4), k=0)


@pytest.mark.parametrize("key", ["ties", "equal_groups"])
def test_group_labels_refuse_an_unknown_option(key: str) -> None:
    options = {"ties": "keep", "equal_groups": "keep", key: "sometimes"}
    with pytest.raises(ConfigError, match=f"online.labelling.{key} must be one of drop, keep"):
        group_labels(torch.zeros(4), k=2, **options)


def test_keeping_equal_groups_while_dropping_ties_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"equal_groups=keep.*ties=drop"):
        group_labels(torch.zeros(4), k=2, ties="drop", equal_groups="keep")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_reward_that_is_not_finite_is_refused_by_its_row(bad: float) -> None:
    with pytest.raises(DataError, match="reward of completion 2 is"):
        group_labels([0.0, 1.0, bad, 2.0], k=2)
    with pytest.raises(DataError, match="reward of completion 0 is"):
        threshold_labels([bad], threshold=0.0)


def test_labels_refuse_mismatched_rows() -> None:
    with pytest.raises(ValueError, match="desirable has 2 rows, keep 3"):
        Labels(torch.tensor([T, F]), torch.tensor([T, T, T]))
    with pytest.raises(ValueError, match="1-D bool"):
        Labels(torch.tensor([1, 0]), torch.tensor([T, T]))


def test_class_weights_auto_balance_the_kept_counts() -> None:
    # Kept: 2 desirable, 3 undesirable; the dropped rows (two of them desirable) do not count.
    labels = Labels(
        desirable=torch.tensor([T, T, F, F, F, T, T, F]),
        keep=torch.tensor([T, T, T, T, T, F, F, F]),
    )
    lambda_d, lambda_u, warnings = class_weights(labels, "auto", 1.0)
    assert (lambda_d, lambda_u, warnings) == (pytest.approx(3 / 2), 1.0, [])
    lambda_d, lambda_u, warnings = class_weights(labels, 2.0, "auto")
    assert (lambda_d, lambda_u, warnings) == (2.0, pytest.approx(2.0 * 2 / 3), [])
    assert lambda_d * 2 / (lambda_u * 3) == pytest.approx(1.0)  # paper eq. 8, at its low end


def test_class_weights_of_group_labels_use_the_drawn_counts() -> None:
    labels = group_labels(torch.tensor(GROUPED), k=3)  # 2 desirable, 3 undesirable kept
    assert class_weights(labels, "auto", 1.0)[:2] == (pytest.approx(3 / 2), 1.0)


def test_class_weights_warn_outside_the_recommended_range() -> None:
    labels = threshold_labels([1.0, 0.0, 0.0, 0.0, 0.0], threshold=0.5)  # 1 desirable, 4 not
    *_, warnings = class_weights(labels, 1.0, 1.0)
    assert len(warnings) == 1 and "1 desirable and 4 undesirable" in warnings[0]


def test_class_weights_refuse_a_draw_with_no_kept_row() -> None:
    with pytest.raises(DataError, match="every one of the 4 sampled completions was dropped"):
        class_weights(group_labels(torch.ones(4), k=2), "auto", 1.0)


def test_the_group_rules_option_clash_stops_when_the_labelling_is_built() -> None:
    with pytest.raises(ConfigError, match="equal_groups=keep keeps an all-equal group's rows"):
        Labelling(rule="group", ties="drop", equal_groups="keep")
    Labelling(rule="threshold", ties="drop", equal_groups="keep")  # the group options unused
