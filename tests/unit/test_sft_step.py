"""Tests for the SFT step (training/sft.py): the mean token NLL, by hand-worked numbers."""

from __future__ import annotations

import math

import torch

from kto_lightning.core.step import Reduction
from kto_lightning.training.sft import completion_tokens, sft_metrics, sft_step


def test_the_loss_is_the_mean_nll_over_tokens_not_rows() -> None:
    # Row 1: 1 token, log-prob -2; row 2: 3 tokens summing to -4. Per token: 6 / 4 = 1.5 (a mean
    # over rows, (2 + 4/3) / 2, would be 1.667).
    logps = torch.tensor([-2.0, -4.0], requires_grad=True)
    result = sft_step(logps, torch.tensor([1, 3]), real_tokens=10.0, slot_tokens=16.0)
    torch.testing.assert_close(result.loss, torch.tensor(1.5))
    result.loss.backward()
    # d loss / d logp_i = -1 / tokens of the batch: every token weighs the same.
    torch.testing.assert_close(logps.grad, torch.tensor([-0.25, -0.25]))
    metrics = sft_metrics(result.metric_sums)
    torch.testing.assert_close(metrics["loss"], torch.tensor(1.5))
    torch.testing.assert_close(metrics["perplexity"], torch.tensor(math.exp(1.5)))
    assert metrics["count/tokens"].item() == 4 and metrics["count/rows"].item() == 2
    torch.testing.assert_close(metrics["padding"], torch.tensor(1 - 10 / 16))


def test_ranks_of_unequal_batches_give_the_mean_over_all_their_tokens() -> None:
    # Rank A: 4 tokens, NLL 6; rank B: 1 token, NLL 4. The strategy averages the two ranks'
    # gradients (divides by 2): their mean must be the gradient of (6 + 4) / 5, where a mean of
    # per-rank means would give (6/4 + 4) / 2.
    a, b = torch.tensor([-2.0, -4.0]), torch.tensor([-4.0])
    a_tokens, b_tokens = torch.tensor([1, 3]), torch.tensor([1])

    def other_rank_adds(tokens: torch.Tensor):
        return Reduction(sum=lambda local: local + tokens.sum().float(), world_size=2)

    loss_a = sft_step(a, a_tokens, other_rank_adds(b_tokens)).loss
    loss_b = sft_step(b, b_tokens, other_rank_adds(a_tokens)).loss
    torch.testing.assert_close((loss_a + loss_b) / 2, torch.tensor(10.0 / 5))


def test_completion_tokens_leave_out_the_first_position() -> None:
    # Nothing predicts position 0 (sequence_logprobs scores from position 1 on).
    mask = torch.tensor([[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    assert completion_tokens(mask).tolist() == [2, 2]
