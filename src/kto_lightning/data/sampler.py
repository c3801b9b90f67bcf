"""Training orders: one epoch's order of row indices, all ranks together, chosen per epoch.

- EpochShuffleSampler: a plain seeded shuffle (the default).
- LabelBalancedSampler: every batch holds desirable and undesirable rows. KTO's loss needs both
  labels in a batch for its weights to mean what eq. 8 says, and a plain shuffle of skewed data
  (say 95/5) leaves many batches one-class.
- LengthGroupedSampler: rows of similar length share a batch, so dynamic padding pads less.
Each order depends only on (seed, epoch), so a resumed run replays it exactly; splitting it among
ranks and resuming mid-epoch are kto_lightning.data.sharding's.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from kto_lightning.errors import ConfigError, DataError


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


class EpochSampler(Sampler[int]):
    """Base of the training orders: `__iter__` yields the order of the epoch set last.

    Lightning calls `set_epoch` before each epoch (through kto_lightning.data.sharding.RankShard).
    """

    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order `__iter__` yields next."""
        self.epoch = epoch

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        raise NotImplementedError


class EpochShuffleSampler(EpochSampler):
    """A permutation of range(n) seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


def _draw(pool: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    # A class that runs out is drawn again from a fresh shuffle (oversampling), so every row is
    # used once before any row is used twice.
    rounds = math.ceil(count / len(pool))
    shuffles = [pool[torch.randperm(len(pool), generator=generator)] for _ in range(rounds)]
    return torch.cat(shuffles)[:count]


class LabelBalancedSampler(EpochSampler):
    """Shuffled order of dataset indices in which every batch holds both labels.

    Consecutive runs of ``batch_size`` indices form a batch; each such batch holds at least one
    desirable and one undesirable row, and otherwise about the dataset's share of each (the
    desirable count per batch is ``floor`` or ``ceil`` of the epoch's desirable total spread
    evenly over its batches). When one label is rarer than 1 in ``batch_size`` rows, it still
    fills one slot of every batch and its rows repeat: the epoch then holds the labels in other
    proportions than the dataset (1 in ``batch_size``); `label_counts` gives the epoch's.

    Under DDP, ``RankShard`` (like Lightning's ``DistributedSamplerWrapper``) hands rank ``r`` the
    strided slice ``indices[r::world]``; so indices come in global blocks of
    ``batch_size * world`` in rank-interleaved order (position ``k * world + r`` of a block is row
    ``k`` of rank ``r``'s batch), and every rank's batches are balanced too.

    Epoch length: ``len(labels)`` rounded up to whole global blocks, and further up when the
    majority class would not otherwise fit beside one minority row per batch. Hence every row
    appears at least once per epoch; rows beyond that are minority (or rounding) repeats. When
    ``len(labels)`` is a multiple of the block and the class counts split evenly over the
    batches, every row appears exactly once.

    With one label only, or ``batch_size == 1``, no batch can hold both labels: the epoch is then
    a plain seeded shuffle of ``len(labels)`` indices.

    The order depends only on ``seed + epoch`` (the ``DistributedSampler`` convention), so every
    rank builds the same list and ``set_epoch`` reshuffles.

    Args:
        labels: one per dataset row, True = desirable.
        batch_size: rows per device per batch; must equal the DataLoader's ``batch_size``.
        seed: base seed of the shuffle.
        num_replicas: number of ranks; None reads the ``torch.distributed`` world size when the
            epoch is built (1 when not initialised).
    """

    def __init__(
        self,
        labels: Sequence[bool],
        batch_size: int,
        seed: int = 0,
        num_replicas: int | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(
                f"data.batching.batch_size must be an integer >= 1, got {batch_size!r}"
            )
        if num_replicas is not None and num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1 or None, got {num_replicas!r}")
        if len(labels) == 0:
            raise DataError("the training set has no rows, so there is nothing to sample")
        self.labels = torch.tensor([bool(label) for label in labels], dtype=torch.bool)
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas

    @property
    def _balanced(self) -> bool:
        n_desirable = int(self.labels.sum())
        return self.batch_size >= 2 and 0 < n_desirable < len(self.labels)

    def _num_batches(self, world: int) -> int:
        # Whole global blocks covering every row, with room for the majority class when each
        # batch keeps at least one slot for the minority.
        n = len(self.labels)
        n_desirable = int(self.labels.sum())
        majority = max(n_desirable, n - n_desirable)
        blocks = max(
            math.ceil(n / (self.batch_size * world)),
            math.ceil(majority / ((self.batch_size - 1) * world)),
        )
        return blocks * world

    def _desirable_slots(self, num_batches: int) -> int:
        # The dataset's share of the epoch's slots, rounded half up, and 1..B-1 per batch.
        n, total = len(self.labels), num_batches * self.batch_size
        share = (2 * total * int(self.labels.sum()) + n) // (2 * n)
        return min(max(share, num_batches), num_batches * (self.batch_size - 1))

    def __len__(self) -> int:
        if not self._balanced:
            return len(self.labels)
        world = self.num_replicas or _world_size()
        return self._num_batches(world) * self.batch_size

    def label_counts(self) -> tuple[int, int]:
        """(desirable, undesirable) indices of one epoch, all ranks together.

        The same for every seed and epoch. Class weights that balance the labels trained on
        (``auto``) are resolved from these, not from the dataset's counts.
        """
        n_desirable = int(self.labels.sum())
        if not self._balanced:
            return n_desirable, len(self.labels) - n_desirable
        num_batches = self._num_batches(self.num_replicas or _world_size())
        desirable = self._desirable_slots(num_batches)
        return desirable, num_batches * self.batch_size - desirable

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        n = len(self.labels)
        if not self._balanced:
            return iter(torch.randperm(n, generator=generator).tolist())

        world = self.num_replicas or _world_size()
        batch_size = self.batch_size
        num_batches = self._num_batches(world)
        total = num_batches * batch_size
        desirable = self.labels.nonzero().flatten()
        undesirable = (~self.labels).nonzero().flatten()
        n_desirable_slots = self._desirable_slots(num_batches)
        # Spread them evenly: batch i gets floor or ceil of n_desirable_slots / num_batches.
        edges = torch.arange(num_batches + 1) * n_desirable_slots // num_batches
        per_batch = edges[1:] - edges[:-1]  # (num_batches,)
        slots = torch.arange(batch_size).expand(num_batches, batch_size) < per_batch[:, None]
        # Shuffle the slots within each batch so desirable rows do not always come first.
        order = torch.rand(num_batches, batch_size, generator=generator).argsort(dim=1)
        slots = slots.gather(1, order).flatten()  # (num_batches * batch_size,) True = desirable

        batches = torch.empty(total, dtype=torch.long)
        batches[slots] = _draw(desirable, n_desirable_slots, generator)
        batches[~slots] = _draw(undesirable, total - n_desirable_slots, generator)
        # (blocks, world, B) -> (blocks, B, world): rank r's k-th row lands at k * world + r.
        blocks = batches.view(-1, world, batch_size).transpose(1, 2)
        return iter(blocks.flatten().tolist())


class LengthGroupedSampler(EpochSampler):
    """A shuffle in which consecutive rows have similar lengths, so batches carry little padding.

    Each epoch: shuffle, cut into mega-batches of ``batch_size * world * group`` rows, sort each
    mega-batch by length (longest first), and shuffle the order of the resulting full batches
    (a short one, when ``len(lengths)`` is not a multiple of the batch, comes last). Rows
    still meet different neighbours every epoch; only their length is alike. Under DDP the
    strided split (``indices[r::world]``) of a sorted run still gives every rank alike lengths.

    Args:
        lengths: the token length of each row (prompt plus completion, KL row included).
        batch_size: rows per device per batch.
        seed: with the epoch, seeds the shuffles.
        group: batches per mega-batch; larger sorts more finely but mixes less.
        num_replicas: the world size; None reads it from torch.distributed at iteration time.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        group: int = 50,
        num_replicas: int | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(
                f"data.batching.batch_size must be an integer >= 1, got {batch_size!r}"
            )
        if len(lengths) == 0:
            raise DataError("the training set has no rows to sample from")
        if group < 1:
            raise ValueError(f"group must be >= 1, got {group!r}")
        if num_replicas is not None and num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1 or None, got {num_replicas!r}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size, self.seed, self.group = batch_size, seed, group
        self.num_replicas = num_replicas

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        world = self.num_replicas or _world_size()
        block = self.batch_size * world
        order = torch.randperm(len(self.lengths), generator=generator)
        batches = []
        for mega in order.split(block * self.group):
            ranked = mega[torch.argsort(self.lengths[mega], descending=True, stable=True)]
            batches += list(ranked.split(block))
        # Only the last mega-batch can end in a short batch; it stays last. Shuffled into the
        # middle, it would shift every later batch by its length, so that each one straddles two
        # sorted runs (and, under DDP, every rank's split too). At the end, drop_last drops it.
        tail = [batches.pop()] if len(batches[-1]) < block else []
        # Shuffle whole (global) batches, so an epoch does not run from long rows to short ones.
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return iter(torch.cat([batches[i] for i in shuffled] + tail).tolist())
