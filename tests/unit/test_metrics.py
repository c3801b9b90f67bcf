"""Tests for kto_lightning.core.metrics (sums, means, AUROC) and, in one process, .distributed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

from kto_lightning.common import distributed
from kto_lightning.core.metrics import FIELDS, batch_sums, metrics_from_sums, reward_auroc


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def sums_of(rewards, labels, losses=None, kl_sum=0.0, kl_count=0.0, threshold=0.0):
    rewards = t(rewards)
    losses = torch.ones_like(rewards) if losses is None else t(losses)
    return batch_sums(
        losses,
        rewards,
        -torch.ones_like(rewards),
        torch.tensor(labels),
        t(kl_sum),
        t(kl_count),
        threshold=threshold,
    )


def check(metrics: dict[str, torch.Tensor], expected: dict[str, float]) -> None:
    for name, value in expected.items():
        assert_close(metrics[name], t(value), msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------------------------ batch sums


def four_rows(threshold=0.0) -> torch.Tensor:
    return batch_sums(
        losses=t([1.0, 2.0, 3.0, 4.0]),
        rewards=t([0.5, -0.2, 0.1, -0.3]),
        policy_logps=t([-1.0, -2.0, -3.0, -4.0]),
        labels=torch.tensor([True, True, False, False]),
        kl_sum=t(0.6),
        kl_count=t(3.0),
        threshold=threshold,
    )


def test_batch_sums_hand_worked():
    sums = four_rows()
    assert sums.dtype == torch.float32
    assert sums.shape == (len(FIELDS),)
    expected = {
        "loss_sum": 10.0,
        "rows": 4.0,
        "loss_desirable_sum": 3.0,
        "desirable": 2.0,
        "loss_undesirable_sum": 7.0,
        "undesirable": 2.0,
        "reward_desirable_sum": 0.3,
        "reward_undesirable_sum": -0.2,
        "logp_desirable_sum": -3.0,
        "logp_undesirable_sum": -7.0,
        # 0.5 > 0 and -0.3 < 0 are right; -0.2 (desirable) and 0.1 (undesirable) are wrong.
        "correct": 2.0,
        "kl_sum": 0.6,
        "kl_count": 3.0,
        # token counts default to 0 when the caller gives none
        "real_tokens": 0.0,
        "slot_tokens": 0.0,
    }
    assert_close(sums, t([expected[name] for name in FIELDS]))


def test_finalize_hand_worked():
    check(
        metrics_from_sums(four_rows()),
        {
            "loss": 2.5,
            "loss/desirable": 1.5,
            "loss/undesirable": 3.5,
            "rewards/chosen": 0.15,
            "rewards/rejected": -0.1,
            "rewards/margins": 0.25,
            "rewards/accuracy": 0.5,
            "kl": 0.2,
            "logps/chosen": -1.5,
            "logps/rejected": -3.5,
            "count/desirable": 2.0,
            "count/undesirable": 2.0,
        },
    )


def test_accuracy_uses_the_threshold():
    # Threshold 0.2: 0.5 > 0.2 right, -0.2 wrong, 0.1 < 0.2 right, -0.3 < 0.2 right.
    check(metrics_from_sums(four_rows(threshold=0.2)), {"rewards/accuracy": 0.75})
    check(metrics_from_sums(four_rows(threshold=t(0.2))), {"rewards/accuracy": 0.75})
    # Threshold -0.25: 0.5 right, -0.2 right, 0.1 wrong, -0.3 right.
    check(metrics_from_sums(four_rows(threshold=-0.25)), {"rewards/accuracy": 0.75})


def test_accuracy_counts_ties_as_wrong():
    sums = sums_of([0.2, 0.2], [True, False], threshold=0.2)
    check(metrics_from_sums(sums), {"rewards/accuracy": 0.0})


def test_finalize_missing_class_is_nan_not_zero():
    metrics = metrics_from_sums(sums_of([1.0, 3.0], [True, True], losses=[0.5, 1.5]))
    check(
        metrics,
        {
            "loss": 1.0,
            "rewards/chosen": 2.0,
            "rewards/accuracy": 1.0,
            "count/undesirable": 0.0,
        },
    )
    for name in ("loss/undesirable", "rewards/rejected", "rewards/margins", "logps/rejected"):
        assert math.isnan(metrics[name].item()), name


def test_finalize_clamps_kl_at_zero_and_reports_zero_without_kl_rows():
    check(metrics_from_sums(sums_of([1.0], [True], kl_sum=-0.6, kl_count=3.0)), {"kl": 0.0})
    check(metrics_from_sums(sums_of([1.0], [True], kl_sum=0.0, kl_count=0.0)), {"kl": 0.0})


def test_batch_sums_detach_their_inputs():
    rewards = t([0.5, -0.5]).requires_grad_()
    sums = batch_sums(
        rewards * 2, rewards, rewards * 3, torch.tensor([True, False]), t(0.1), t(2.0)
    )
    assert not sums.requires_grad


def test_adding_sums_gives_the_count_weighted_mean_over_the_union():
    # Batch A: 1 desirable, 3 undesirable. Batch B: 3 desirable, 2 undesirable.
    a = sums_of(
        [3.0, 0.0, 0.0, 0.0],
        [True, False, False, False],
        losses=[1.0] * 4,
        kl_sum=1.0,
        kl_count=1.0,
    )
    b = sums_of(
        [1.0, 1.0, 1.0, -4.0, -4.0],
        [True, True, True, False, False],
        losses=[2.0] * 5,
        kl_sum=0.5,
        kl_count=5.0,
    )
    union = metrics_from_sums(a + b)
    check(
        union,
        {
            "rewards/chosen": 6.0 / 4,  # mean of the per-batch means would be (3 + 1) / 2 = 2
            "rewards/rejected": -8.0 / 5,  # would be (0 - 4) / 2 = -2
            "rewards/margins": 1.5 + 1.6,
            "loss": 14.0 / 9,  # would be 1.5
            "loss/desirable": 7.0 / 4,  # (1 + 2 + 2 + 2) / 4; would be 1.5
            "rewards/accuracy": 6.0 / 9,  # A: 1/4 right (0 is not below 0), B: 5/5; would be 0.625
            "kl": 1.5 / 6,  # would be (1 + 0.1) / 2
            "count/desirable": 4.0,
            "count/undesirable": 5.0,
        },
    )
    mean_of_means = (
        metrics_from_sums(a)["rewards/chosen"] + metrics_from_sums(b)["rewards/chosen"]
    ) / 2
    assert not torch.isclose(union["rewards/chosen"], mean_of_means)


# ------------------------------------------------------------------------------------ AUROC


def auroc(rewards, labels) -> torch.Tensor:
    return reward_auroc(t(rewards), torch.tensor(labels))


def test_auroc_perfect_reversed_and_tied():
    labels = [False, True, False, True]
    assert_close(auroc([0.1, 0.9, 0.2, 0.8], labels), t(1.0))
    assert_close(auroc([0.9, 0.1, 0.8, 0.2], labels), t(0.0))
    assert_close(auroc([0.3, 0.3, 0.3, 0.3], labels), t(0.5))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_auroc_with_a_non_finite_reward_is_nan(bad):
    # Sorted last by torch.unique, a NaN would otherwise rank above every desirable reward.
    assert torch.isnan(auroc([bad, 0.9, 0.1, 0.2], [True, True, False, False]))
    assert torch.isnan(auroc([0.1, 0.9, bad, 0.2], [False, True, False, True]))


def test_auroc_hand_worked_partial_order():
    # Positives 0.35, 0.8; negatives 0.1, 0.4. Of the 4 (positive, negative) pairs the positive
    # wins 3: 0.35 > 0.1, 0.8 > 0.1, 0.8 > 0.4 (0.35 < 0.4 loses).
    assert_close(auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]), t(0.75))


def test_auroc_counts_a_tied_pair_as_half():
    # Positives 2, 3; negatives 1, 2: pairs 2>1, 2=2 (1/2), 3>1, 3>2 -> 3.5 / 4.
    assert_close(auroc([1.0, 2.0, 2.0, 3.0], [False, True, False, True]), t(0.875))


def test_auroc_does_not_saturate_for_large_or_negative_rewards():
    # A sigmoid in float32 maps all of these to 1.0 (or 0.0), which would make them tie.
    assert_close(auroc([20.0, 25.0, 18.0, 17.5], [True, True, False, False]), t(1.0))
    assert_close(auroc([-120.0, -110.0, -150.0], [True, True, False]), t(1.0))


def test_auroc_is_order_invariant():
    rewards = t([0.3, -1.0, 2.0, 0.3, 0.7, -0.2])
    labels = torch.tensor([True, False, True, False, False, True])
    permutation = torch.tensor([4, 0, 5, 2, 1, 3])
    assert_close(
        reward_auroc(rewards, labels), reward_auroc(rewards[permutation], labels[permutation])
    )


@pytest.mark.parametrize("labels", [[True, True, True], [False, False, False], []])
def test_auroc_with_one_class_is_nan(labels):
    rewards = [0.1 * i for i in range(len(labels))]
    assert math.isnan(auroc(rewards, labels).item())


# ------------------------------------------------------------------------------------ distributed


def test_collectives_are_identities_in_one_process():
    assert not dist.is_initialized()
    assert distributed.world_size() == 1
    x = t([1.0, 2.0, 3.0])
    assert distributed.all_reduce_sum(x) is x
    assert distributed.gather_cat(x) is x
    assert_close(x, t([1.0, 2.0, 3.0]))


def test_collectives_in_a_process_group_of_one(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        assert distributed.world_size() == 1
        x = t([1.0, -2.0])
        assert_close(distributed.all_reduce_sum(x), t([1.0, -2.0]))
        assert_close(distributed.gather_cat(t([5.0, 6.0, 7.0])), t([5.0, 6.0, 7.0]))
    finally:
        dist.destroy_process_group()
