"""Tests for LengthGroupedSampler, and for the `padding` metric it is meant to lower."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

from kto_lightning.core.metrics import batch_sums, metrics_from_sums
from kto_lightning.data.datamodule import KTODataModule
from kto_lightning.data.sampler import LengthGroupedSampler
from kto_lightning.errors import ConfigError, DataError
from kto_lightning.models.byte_tokenizer import byte_level_tokenizer


def random_lengths(n: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, 501, (n,), generator=generator).tolist()


def plain_shuffle(n: int, seed: int = 0) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def mean_spread(indices: list[int], lengths: list[int], batch_size: int) -> float:
    """Mean over batches of (longest - shortest) length."""
    batches = chunks(indices, batch_size)
    return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(
        batches
    )


def padding(indices: list[int], lengths: list[int], batch_size: int) -> int:
    """Pad tokens a dynamic-padding collator adds: sum over batches of len * max - sum."""
    total = 0
    for batch in chunks(indices, batch_size):
        batch_lengths = [lengths[i] for i in batch]
        total += len(batch) * max(batch_lengths) - sum(batch_lengths)
    return total


# ------------------------------------------------------------------------------ the sampler

# 1003 rows: not a multiple of the batch, nor of the 400-row mega-batch, so one batch is short.
N = 1003


@pytest.mark.parametrize(("n", "batch_size"), [(N, 8), (400, 8), (5, 8), (37, 1)])
def test_every_index_exactly_once_per_epoch(n, batch_size):
    sampler = LengthGroupedSampler(random_lengths(n), batch_size, seed=3, num_replicas=1)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert len(indices) == len(sampler) == n
        assert sorted(indices) == list(range(n))


def test_order_depends_on_seed_and_epoch_only():
    lengths = random_lengths(N)

    def order(seed: int, epoch: int) -> list[int]:
        sampler = LengthGroupedSampler(lengths, 8, seed=seed, num_replicas=1)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0)
    assert order(0, 2) == order(0, 2)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    # Not just a reordering of the same batches: rows meet different neighbours.
    first = {frozenset(b) for b in chunks(order(0, 0), 8)}
    second = {frozenset(b) for b in chunks(order(0, 1), 8)}
    assert len(first & second) < len(first) // 4


@pytest.mark.parametrize("epoch", [0, 1, 2, 3, 4])
def test_batches_hold_alike_lengths(epoch):
    # Lengths 1..500, 400-row mega-batches sorted into 50 batches: a batch spans ~10 length units,
    # a random batch of 8 ~390. Every epoch: wherever the short batch lands.
    lengths = random_lengths(N)
    sampler = LengthGroupedSampler(lengths, 8, seed=0, num_replicas=1)
    sampler.set_epoch(epoch)
    grouped = mean_spread(list(sampler), lengths, 8)
    shuffled = mean_spread(plain_shuffle(N, seed=epoch), lengths, 8)
    assert grouped * 3 < shuffled
    # Far better than 3x in fact: a full batch is a slice of one sorted mega-batch.
    assert grouped < 40


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_padding_is_much_lower_than_a_plain_shuffle(epoch):
    lengths = random_lengths(N)
    sampler = LengthGroupedSampler(lengths, 8, seed=0, num_replicas=1)
    sampler.set_epoch(epoch)
    grouped = padding(list(sampler), lengths, 8)
    shuffled = padding(plain_shuffle(N, seed=epoch), lengths, 8)
    # A plain shuffle pads ~7/8 * (E[max of 8] - mean) ~ 7/8 * (445 - 250) per row ~ 170 000 in
    # all; sorted batches pad a few units per row.
    assert shuffled > 100_000
    assert grouped < shuffled / 5


def test_only_the_last_batch_may_be_short():
    # 1003 = 125 * 8 + 3: the 3 leftover rows must close the epoch. A short batch in the middle
    # would shift every later batch so that each one straddles two sorted runs.
    lengths = random_lengths(N)
    for epoch in range(6):
        sampler = LengthGroupedSampler(lengths, 8, seed=0, num_replicas=1)
        sampler.set_epoch(epoch)
        indices = list(sampler)
        full = chunks(indices[: N // 8 * 8], 8)
        spreads = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in full]
        assert max(spreads) < 100, f"epoch {epoch}: a batch mixes lengths {max(spreads)} apart"


@pytest.mark.parametrize("world", [2, 4])
def test_every_rank_gets_length_grouped_batches_under_a_strided_split(world):
    lengths = random_lengths(N)
    sampler = LengthGroupedSampler(lengths, 4, seed=0, num_replicas=world)
    indices = list(sampler)
    assert sorted(indices) == list(range(N))
    for rank in range(world):
        mine = indices[rank::world]
        full = mine[: len(mine) // 4 * 4]
        grouped = mean_spread(full, lengths, 4)
        shuffled = mean_spread(plain_shuffle(len(full), seed=rank), lengths, 4)
        assert grouped * 3 < shuffled, f"rank {rank}"
        assert grouped < 40, f"rank {rank}"


def test_lightnings_distributed_wrapper_keeps_the_grouping():
    # What Lightning does under DDP: wrap the sampler, no extra shuffle, rank r takes [r::world].
    lengths = random_lengths(N)
    sampler = LengthGroupedSampler(lengths, 4, seed=0, num_replicas=2)
    seen: list[int] = []
    for rank in range(2):
        wrapped = DistributedSamplerWrapper(sampler, num_replicas=2, rank=rank, shuffle=False)
        mine = list(wrapped)
        seen += mine
        assert mean_spread(mine[: len(mine) // 4 * 4], lengths, 4) < 40
    assert set(seen) == set(range(N))


@pytest.mark.parametrize("batch_size", [0, -2, 2.5, True, "8"])
def test_bad_batch_size_names_the_key(batch_size):
    with pytest.raises(ConfigError, match=r"data\.batching\.batch_size"):
        LengthGroupedSampler([3, 4, 5], batch_size)


def test_no_rows_is_a_data_error():
    with pytest.raises(DataError):
        LengthGroupedSampler([], 8)


def test_datamodule_refuses_two_samplers_naming_both_keys():
    with pytest.raises(ConfigError) as error:
        KTODataModule(
            byte_level_tokenizer(),
            source={"path": "toy", "toy_rows": 100},
            batching={"balanced_batches": True, "group_by_length": True},
        )
    assert "data.batching.balanced_batches" in str(error.value)
    assert "data.batching.group_by_length" in str(error.value)


# ------------------------------------------------------------------------------ padding metric


def _sums(real_tokens, slot_tokens) -> torch.Tensor:
    # Two rows of dummy loss terms; only the token counts matter here.
    zeros = torch.zeros(2)
    labels = torch.tensor([True, False])
    return batch_sums(
        zeros,
        zeros,
        zeros,
        labels,
        torch.tensor(0.0),
        torch.tensor(0.0),
        real_tokens=real_tokens,
        slot_tokens=slot_tokens,
    )


def test_padding_of_one_batch():
    # 30 real tokens in 40 slots: 10 of 40 are padding.
    assert metrics_from_sums(_sums(30.0, 40.0))["padding"].item() == pytest.approx(0.25)
    # The module passes the real count as a tensor (a mask sum) and the slots as a float.
    assert metrics_from_sums(_sums(torch.tensor(30), 40.0))["padding"].item() == pytest.approx(0.25)


def test_padding_adds_count_weighted_across_batches():
    # 30/40 and 10/60: 40 real tokens in 100 slots -> 0.6, not the mean of 0.25 and 0.8333.
    total = _sums(30.0, 40.0) + _sums(torch.tensor(10), 60.0)
    share = metrics_from_sums(total)["padding"].item()
    assert share == pytest.approx(0.6)
    assert share != pytest.approx((0.25 + 50 / 60) / 2)


def test_padding_without_slots_is_nan():
    assert math.isnan(metrics_from_sums(_sums(0.0, 0.0))["padding"].item())


@pytest.mark.parametrize(("group", "num_replicas"), [(0, None), (50, 0)])
def test_bad_group_or_world_size_is_refused(group, num_replicas):
    with pytest.raises(ValueError, match="group" if group < 1 else "num_replicas"):
        LengthGroupedSampler([3, 4, 5], 2, group=group, num_replicas=num_replicas)
