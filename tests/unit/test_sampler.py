"""Tests for kto_lightning.data.sampler and .sharding: LabelBalancedSampler, RankShard (with its
mid-epoch resume position) and ShardedEvalBatches."""

from __future__ import annotations

import itertools
from collections import Counter
from itertools import chain

import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import DataLoader, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from kto_lightning.core.losses import KTOLossConfig
from kto_lightning.data.sampler import (
    EpochShuffleSampler,
    LabelBalancedSampler,
    LengthGroupedSampler,
)
from kto_lightning.data.sharding import RankShard, ShardedEvalBatches, shard_state
from kto_lightning.errors import ConfigError, DataError


def make_labels(n_desirable: int, n_undesirable: int, seed: int = 0) -> list[bool]:
    labels = [True] * n_desirable + [False] * n_undesirable
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    return [labels[i] for i in order]


def chunks(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def assert_balanced(batches: list[list[int]], labels: list[bool], batch_size: int) -> None:
    for batch in batches:
        assert len(batch) == batch_size
        batch_labels = {labels[i] for i in batch}
        assert batch_labels == {True, False}, f"one-class batch {batch}"


# ------------------------------------------------------------------------------ single process


@pytest.mark.parametrize(("n_desirable", "n_undesirable"), [(50, 50), (90, 10), (99, 1), (3, 97)])
def test_every_batch_holds_both_labels(n_desirable, n_undesirable):
    labels = make_labels(n_desirable, n_undesirable)
    sampler = LabelBalancedSampler(labels, batch_size=8, seed=1, num_replicas=1)
    indices = list(sampler)
    assert len(indices) % 8 == 0
    assert_balanced(chunks(indices, 8), labels, 8)


@pytest.mark.parametrize(("n_desirable", "n_undesirable"), [(50, 50), (90, 10), (99, 1), (7, 30)])
@pytest.mark.parametrize("batch_size", [2, 8])
def test_every_index_appears_and_len_matches(n_desirable, n_undesirable, batch_size):
    labels = make_labels(n_desirable, n_undesirable)
    sampler = LabelBalancedSampler(labels, batch_size=batch_size, seed=3, num_replicas=1)
    indices = list(sampler)
    assert len(indices) == len(sampler)
    assert set(indices) == set(range(len(labels)))
    assert all(0 <= i < len(labels) for i in indices)


def test_each_index_exactly_once_when_no_oversampling_is_needed():
    # 70/30 over 100 rows in batches of 10: 7 desirable + 3 undesirable per batch, 10 batches.
    labels = make_labels(70, 30)
    sampler = LabelBalancedSampler(labels, batch_size=10, seed=0, num_replicas=1)
    indices = list(sampler)
    assert len(sampler) == 100
    assert sorted(indices) == list(range(100))
    for batch in chunks(indices, 10):
        assert sum(labels[i] for i in batch) == 7


def test_proportions_are_roughly_kept():
    labels = make_labels(700, 300)
    sampler = LabelBalancedSampler(labels, batch_size=16, seed=5, num_replicas=1)
    shares = [sum(labels[i] for i in b) / 16 for b in chunks(list(sampler), 16)]
    assert abs(sum(shares) / len(shares) - 0.7) < 0.1
    # Counts differ by at most one between batches: 706 of 1008 slots over 63 batches.
    assert max(shares) - min(shares) <= 1 / 16 + 1e-9


def test_minority_is_oversampled_and_majority_fits():
    # 99/1 in batches of 8: the one undesirable row must sit in every batch, and the 99
    # desirable rows need ceil(99 / 7) = 15 batches, so the epoch grows from 100 to 120.
    labels = make_labels(99, 1)
    sampler = LabelBalancedSampler(labels, batch_size=8, seed=0, num_replicas=1)
    indices = list(sampler)
    assert len(sampler) == len(indices) == 120
    minority = labels.index(False)
    assert Counter(indices)[minority] == 15
    assert {i for i in indices if labels[i]} == {i for i in range(100) if labels[i]}


def test_epoch_is_rounded_up_to_whole_batches():
    labels = make_labels(30, 21)  # 51 rows, batch 8 -> 7 batches = 56 indices
    sampler = LabelBalancedSampler(labels, batch_size=8, seed=0, num_replicas=1)
    assert len(sampler) == len(list(sampler)) == 56


def test_deterministic_per_seed_and_epoch_and_reshuffled_across_epochs():
    labels = make_labels(60, 40)
    a = LabelBalancedSampler(labels, batch_size=8, seed=7, num_replicas=1)
    b = LabelBalancedSampler(labels, batch_size=8, seed=7, num_replicas=1)
    assert list(a) == list(b)
    assert list(a) == list(a)  # iterating again without set_epoch repeats the epoch
    first = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(a) != first
    assert list(LabelBalancedSampler(labels, batch_size=8, seed=8, num_replicas=1)) != first


@pytest.mark.parametrize(
    ("labels", "batch_size"),
    [([True] * 10, 4), ([False] * 10, 4), (make_labels(5, 5), 1)],
)
def test_single_label_or_batch_of_one_is_a_plain_shuffle(labels, batch_size):
    sampler = LabelBalancedSampler(labels, batch_size=batch_size, seed=0, num_replicas=2)
    indices = list(sampler)
    assert len(sampler) == 10
    assert sorted(indices) == list(range(10))
    assert indices != list(range(10))
    sampler.set_epoch(1)
    assert list(sampler) != indices


def test_num_replicas_none_reads_world_size_one_without_distributed():
    labels = make_labels(20, 20)
    assert not torch.distributed.is_initialized()
    implicit = LabelBalancedSampler(labels, batch_size=4, seed=0)
    explicit = LabelBalancedSampler(labels, batch_size=4, seed=0, num_replicas=1)
    assert list(implicit) == list(explicit)
    assert len(implicit) == 40


@pytest.mark.parametrize("batch_size", [0, -1, 2.0, True])
def test_bad_batch_size_names_the_config_key(batch_size):
    with pytest.raises(ConfigError, match=r"data\.batching\.batch_size"):
        LabelBalancedSampler([True, False], batch_size=batch_size)


def test_empty_labels_raise_data_error():
    with pytest.raises(DataError, match="no rows"):
        LabelBalancedSampler([], batch_size=4)


# ------------------------------------------------------------------------------ DataLoader / DDP


def test_dataloader_batches_are_balanced():
    labels = make_labels(85, 15)
    dataset = torch.utils.data.TensorDataset(torch.arange(100), torch.tensor(labels))
    sampler = LabelBalancedSampler(labels, batch_size=8, seed=2, num_replicas=1)
    loader = DataLoader(dataset, batch_size=8, sampler=sampler)
    batches = list(loader)
    assert len(batches) == len(loader) == len(sampler) // 8
    for index, label in batches:
        assert len(index) == 8
        assert label.any() and not label.all()
        assert torch.equal(label, torch.tensor(labels)[index])


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(("n_desirable", "n_undesirable"), [(50, 50), (90, 10), (99, 1), (13, 40)])
def test_strided_split_gives_every_rank_balanced_batches(world, n_desirable, n_undesirable):
    labels = make_labels(n_desirable, n_undesirable)
    sampler = LabelBalancedSampler(labels, batch_size=4, seed=0, num_replicas=world)
    indices = list(sampler)
    assert len(indices) == len(sampler)
    assert len(indices) % (4 * world) == 0  # the wrapper then pads nothing
    assert set(indices) == set(range(len(labels)))
    for rank in range(world):
        assert_balanced(chunks(indices[rank::world], 4), labels, 4)


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_sampler_wrapper_gives_every_rank_balanced_batches(world):
    labels = make_labels(90, 10)
    sampler = LabelBalancedSampler(labels, batch_size=4, seed=0, num_replicas=world)
    seen: list[int] = []
    for epoch in range(2):
        per_rank = []
        for rank in range(world):
            wrapper = DistributedSamplerWrapper(
                sampler, num_replicas=world, rank=rank, shuffle=False
            )
            wrapper.set_epoch(epoch)  # forwarded to the balanced sampler
            rank_indices = list(wrapper)
            assert len(rank_indices) == len(wrapper) == len(sampler) // world
            assert_balanced(chunks(rank_indices, 4), labels, 4)
            per_rank.append(rank_indices)
        # Ranks see disjoint slots of the same epoch; together they cover every row.
        assert set().union(*per_rank) == set(range(100))
        assert sum(map(len, per_rank)) == len(sampler)
        seen.append(per_rank[0])
    assert seen[0] != seen[1]


# ------------------------------------------------------------------------------ class weights


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize(("n_desirable", "n_undesirable"), [(950, 50), (50, 950), (990, 10)])
def test_auto_weight_balances_the_labels_the_epoch_draws(world, n_desirable, n_undesirable):
    # On skewed data the epoch repeats the minority class (one row of it in every batch), so the
    # weights must come from the draws, not from the dataset's counts (0.37 at 950/50).
    labels = make_labels(n_desirable, n_undesirable)
    sampler = LabelBalancedSampler(labels, batch_size=8, seed=0, num_replicas=world)
    loss, _ = KTOLossConfig(desirable_weight="auto").with_class_counts(*sampler.label_counts())
    drawn: Counter[bool] = Counter()
    for rank in range(world):
        wrapper = DistributedSamplerWrapper(sampler, num_replicas=world, rank=rank, shuffle=False)
        drawn.update(labels[i] for i in wrapper)
    ratio = loss.desirable_weight * drawn[True] / (loss.undesirable_weight * drawn[False])
    assert ratio == pytest.approx(1.0, abs=1e-6)
    assert drawn[True] + drawn[False] == len(sampler)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize(("n_desirable", "n_undesirable"), [(70, 30), (30, 21), (5, 0)])
def test_label_counts_are_what_an_epoch_draws(world, n_desirable, n_undesirable):
    labels = make_labels(n_desirable, n_undesirable)
    sampler = LabelBalancedSampler(labels, batch_size=8, seed=4, num_replicas=world)
    drawn = Counter(labels[i] for i in sampler)
    assert sampler.label_counts() == (drawn[True], drawn[False])


# ------------------------------------------------------------------------------ training shards


def _orders():
    labels = make_labels(37, 66, seed=3)  # 103 rows: not a multiple of any world size below
    lengths = torch.randint(1, 300, (103,), generator=torch.Generator().manual_seed(0)).tolist()
    return {
        "shuffle": lambda world: EpochShuffleSampler(103, seed=5),
        "balanced": lambda world: LabelBalancedSampler(labels, 4, seed=5, num_replicas=world),
        "grouped": lambda world: LengthGroupedSampler(lengths, 4, seed=5, num_replicas=world),
    }


@pytest.mark.parametrize("order", ["shuffle", "balanced", "grouped"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_shards_split_the_order_as_lightnings_wrapper_does(order, world):
    for epoch in (0, 3):
        for rank in range(world):
            ours = RankShard(_orders()[order](world), world, rank)
            wrapper = DistributedSamplerWrapper(
                _orders()[order](world), num_replicas=world, rank=rank, shuffle=False
            )
            ours.set_epoch(epoch)
            wrapper.set_epoch(epoch)
            assert list(ours) == list(wrapper)
            assert len(ours) == len(wrapper)


def test_rank_shards_are_a_distributed_sampler_lightning_keeps():
    assert isinstance(RankShard(EpochShuffleSampler(10), 2, 1), DistributedSampler)


@pytest.mark.parametrize("order", ["shuffle", "balanced", "grouped"])
@pytest.mark.parametrize(("world", "new_world"), [(1, 1), (2, 2), (3, 3), (2, 1)])
def test_a_restored_position_continues_every_rank_at_its_next_sample(order, world, new_world):
    # Every rank draws 5 batches of 4 in epoch 2, then the run stops. The position is global
    # (all ranks' samples), so the skip comes before the per-rank split: together the resumed
    # ranks draw exactly the rest of the epoch's order, also on another number of ranks.
    shards = [RankShard(_orders()[order](world), world, rank) for rank in range(world)]
    for shard in shards:
        shard.set_epoch(2)
    drawn = [[next(it) for _ in range(20)] for it in map(iter, shards)]
    state = shards[0].state_dict()
    assert state == {"epoch": 2, "samples_seen": 20 * world}
    assert {str(s.state_dict()) for s in shards} == {str(state)}, "the same on every rank"

    full = _orders()[order](new_world)
    full.set_epoch(2)
    order_of_epoch = list(full)
    resumed = []
    for rank in range(new_world):
        shard = RankShard(_orders()[order](new_world), new_world, rank)
        shard.load_state_dict(state)
        shard.set_epoch(2)  # Lightning sets the epoch again before it iterates: no change
        resumed.append(list(shard))
    if new_world == world:
        for rank in range(world):
            uninterrupted = RankShard(_orders()[order](world), world, rank)
            uninterrupted.set_epoch(2)
            assert drawn[rank] + resumed[rank] == list(uninterrupted)
    together = [i for step in itertools.zip_longest(*resumed) for i in step if i is not None]
    assert together[: len(order_of_epoch) - 20 * world] == order_of_epoch[20 * world :]


def test_a_position_applies_once_and_only_to_its_epoch():
    shard = RankShard(EpochShuffleSampler(20, seed=3))
    shard.set_epoch(1)
    epoch1 = list(shard)
    shard.load_state_dict({"epoch": 1, "samples_seen": 8})
    assert list(shard) == epoch1[8:], "a restart continues at the exact next sample"
    assert list(shard) == epoch1, "the skip applies once"
    # A checkpoint from the end of epoch 1 resumes with epoch 2, from its start.
    shard.load_state_dict({"epoch": 1, "samples_seen": 20})
    shard.set_epoch(2)
    assert sorted(shard) == list(range(20))


def test_the_order_is_drawn_at_the_first_sample_so_a_late_restore_applies():
    # An iterator made before the checkpoint is restored (Lightning's estimated_stepping_batches
    # does that) still starts at the restored position.
    shard = RankShard(EpochShuffleSampler(20, seed=3))
    reference = RankShard(EpochShuffleSampler(20, seed=3))
    reference.set_epoch(4)
    early = iter(shard)
    assert not shard.drawn
    shard.load_state_dict({"epoch": 4, "samples_seen": 12})
    assert list(early) == list(reference)[12:]
    assert shard.drawn


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_loader_saves_the_position_of_the_last_batch_it_yielded(num_workers):
    # With workers, torchdata draws ahead of the batches it yields; the saved position is the
    # yielded one all the same, and a new loader continues right after it.
    def loader():
        shard = RankShard(EpochShuffleSampler(40, seed=1))
        shard.set_epoch(1)
        return StatefulDataLoader(list(range(40)), batch_size=4, sampler=shard,
                                  num_workers=num_workers)  # fmt: skip

    whole = [batch.tolist() for batch in loader()]
    first = loader()
    iterator = iter(first)
    head = [next(iterator).tolist() for _ in range(3)]
    state = first.state_dict()
    assert shard_state(state) == {"epoch": 1, "samples_seen": 12}
    second = loader()
    second.load_state_dict(state)
    assert head + [batch.tolist() for batch in second] == whole


# ------------------------------------------------------------------------------ validation shards


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("rows", [3, 7, 13, 15, 16, 25])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_validation_shards_score_every_row_once_in_equal_steps(world, rows, batch_size):
    shards = [list(ShardedEvalBatches(rows, batch_size, world, rank)) for rank in range(world)]
    # Every rank runs the same number of steps (the module all-reduces in each), none empty.
    assert len({len(batches) for batches in shards}) == 1
    assert all(batch for batches in shards for batch in batches)
    assert all(len(ShardedEvalBatches(rows, batch_size, world, 0)) == len(b) for b in shards)
    for rank, batches in enumerate(shards):
        assert list(chain.from_iterable(batches)) == list(range(rank, rows, world))
    # Global batch k is a run of consecutive rows: one process's batch of batch_size * world.
    for step in zip(*shards, strict=True):
        together = sorted(chain.from_iterable(step))
        assert together == list(range(together[0], together[-1] + 1))


def test_validation_shards_match_one_process_batches():
    one = list(ShardedEvalBatches(15, 6))
    assert one == [list(range(0, 6)), list(range(6, 12)), list(range(12, 15))]
    two = [list(ShardedEvalBatches(15, 3, 2, rank)) for rank in range(2)]
    assert [sorted(a + b) for a, b in zip(*two, strict=True)] == one


def test_a_last_batch_too_small_for_every_rank_joins_the_one_before():
    # 13 rows, 2 per rank: global batches of 4, and a 13th row that only rank 0 could score.
    shards = [list(ShardedEvalBatches(13, 2, 2, rank)) for rank in range(2)]
    assert shards == [[[0, 2], [4, 6], [8, 10, 12]], [[1, 3], [5, 7], [9, 11]]]


def test_validation_shards_are_a_distributed_sampler_lightning_keeps():
    assert isinstance(ShardedEvalBatches(10, 4, 2, 1), DistributedSampler)


def test_fewer_validation_rows_than_ranks_name_the_fix():
    with pytest.raises(DataError, match=r"1 row\(s\), fewer than the 2 ranks.*trainer\.devices"):
        ShardedEvalBatches(1, 4, 2, 0)
    assert list(ShardedEvalBatches(0, 4, 2, 1)) == []


def test_validation_shards_feed_a_loader_of_whole_batches():
    dataset = [f"row {i}" for i in range(7)]
    sampler = ShardedEvalBatches(len(dataset), 2, 2, 1)
    loader = DataLoader(
        _ByIndices(dataset), batch_size=None, sampler=sampler, collate_fn=lambda rows: rows
    )
    assert list(loader) == [["row 1", "row 3"], ["row 5"]]


class _ByIndices(torch.utils.data.Dataset):
    def __init__(self, rows: list[str]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, indices: list[int]) -> list[str]:
        return [self.rows[i] for i in indices]
