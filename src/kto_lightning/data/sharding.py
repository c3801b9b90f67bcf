"""Splitting rows among ranks: the training order (resumable mid-epoch) and validation batches.

- RankShard: one rank's share of a training order (kto_lightning.data.sampler), and its position
  in it, which torchdata's StatefulDataLoader saves and restores for an exact mid-epoch resume.
- ShardedEvalBatches: under DDP, each rank's validation batches; every row is scored once.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from kto_lightning.data.sampler import EpochSampler
from kto_lightning.errors import ConfigError, DataError

_STATE_KEYS = frozenset({"epoch", "samples_seen"})


class RankShard(DistributedSampler[int]):
    """One rank's share of an epoch order, and the position reached in it.

    Rank ``r`` takes positions ``r, r + world, r + 2 * world, ...`` of the epoch's order, padded
    first (by repeating its start) to a multiple of the world size: the split Lightning's
    ``DistributedSamplerWrapper`` makes, and with ``world == 1`` the order itself. Two things the
    wrapper does not do, both for an exact mid-epoch resume:

    - ``state_dict`` / ``load_state_dict`` (torchdata's Stateful protocol): the epoch and the
      *global* position, the samples of the order that all ranks together have drawn. The skip
      thus happens before the per-rank split, and every rank resumes at its own next sample;
      ``StatefulDataLoader`` saves this state as of the last batch it yielded.
    - ``__iter__`` draws the order at the first sample, not when the iterator is made: an
      iterator made before the checkpoint was restored still starts at the restored position
      (see ``KTODataModule.load_state_dict``).

    Being a ``DistributedSampler``, Lightning uses it as it is instead of wrapping it.

    Args:
        sampler: the epoch order, all ranks together.
        num_replicas: the world size.
        rank: this process's rank.
    """

    def __init__(self, sampler: EpochSampler, num_replicas: int = 1, rank: int = 0) -> None:
        # DistributedSampler only reads the length of its `dataset`: the order stands in for it.
        super().__init__(sampler, num_replicas=num_replicas, rank=rank, shuffle=False)  # type: ignore[arg-type]
        self.sampler = sampler
        self._resume_at = 0  # where the next iteration starts, once (after a restore)
        self._position = 0  # samples of this epoch's order drawn, all ranks together
        self.drawn = False  # an iteration has drawn an order

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            # A position belongs to its epoch: a checkpoint written at the end of one resumes
            # with the next, from its start.
            self._resume_at = self._position = 0
        super().set_epoch(epoch)
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "samples_seen": self._position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue epoch `state["epoch"]` after its first `state["samples_seen"]` samples."""
        self.set_epoch(state["epoch"])
        self._resume_at = self._position = state["samples_seen"]

    def __iter__(self) -> Iterator[int]:
        # A generator: none of this runs before the first sample is asked for.
        self.drawn = True
        order = list(self.sampler)
        if not order:
            return
        total = len(self) * self.num_replicas
        order += (order * math.ceil(total / len(order)))[: total - len(order)]
        start, self._resume_at = self._resume_at, 0
        self._position = start
        for index in order[start + self.rank :: self.num_replicas]:
            self._position += self.num_replicas  # before the yield: a batch's last row counts
            yield index


def shard_state(loader_state: Any) -> dict[str, int] | None:
    """RankShard's state inside a StatefulDataLoader's `state_dict()`, wherever torchdata keeps it.

    It is the state as of the last batch the loader yielded, with worker processes too: torchdata
    records the sampler's state when it hands a batch's indices to a worker.
    """
    if isinstance(loader_state, Mapping):
        if set(loader_state) == _STATE_KEYS:
            return dict(loader_state)
        values: Any = loader_state.values()
    elif isinstance(loader_state, list | tuple):
        values = loader_state
    else:
        return None
    return next((s for s in map(shard_state, values) if s is not None), None)


class ResumableTrainOrder:
    """A data module's training loader over a `RankShard` of an order, and its `state_dict` /
    `load_state_dict`: the order's position travels through these hooks as well as through the
    loader's own state, because a loader built before the checkpoint is restored never gets the
    loader's. `KTODataModule` and online KTO's `PromptDataModule` share them.

    `resumable_loader` builds the loader and applies a restored position to its shard;
    `workers_key` names the data module's worker count. The data module is a LightningDataModule
    (`trainer` is set once a trainer runs it).
    """

    workers_key = "data.batching.num_workers"
    trainer: Any
    _train_loader: Any = None
    _train_shard: RankShard | None = None
    _restored_position: dict[str, int] | None = None

    def _ranks(self) -> tuple[int, int]:
        """(world size, this process's rank)."""
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def resumable_loader(
        self,
        items: Dataset[Any],
        order: EpochSampler,
        batch_size: int,
        collate_fn: Callable[[list[Any]], Any],
        num_workers: int,
        drop_last: bool = False,
    ) -> StatefulDataLoader:
        """The training loader: batches of `items` in `order`, this rank's share of it, starting
        at a restored position and keeping its own for the next checkpoint."""
        shard = RankShard(order, *self._ranks())
        if self._restored_position is not None:
            shard.load_state_dict(self._restored_position)
            self._restored_position = None
        with warnings.catch_warnings():
            # torchdata 0.11 calls torch.set_vital, which this torch deprecates: noise, not ours.
            warnings.filterwarnings("ignore", "'set_vital' is deprecated", UserWarning)
            loader = StatefulDataLoader(
                items,
                batch_size=batch_size,
                sampler=shard,
                collate_fn=collate_fn,
                num_workers=num_workers,
                drop_last=drop_last,
            )
        self._train_shard, self._train_loader = shard, loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        """The training order's position at the last batch the train loader yielded."""
        if self._train_loader is None:
            return {}
        position = shard_state(self._train_loader.state_dict())
        return {} if position is None else {"train_order": position}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume the training order at a position `state_dict` saved."""
        position = state_dict.get("train_order")
        if position is None:
            return
        shard = self._train_shard
        if shard is None:  # the usual case: train_dataloader() applies it
            self._restored_position = dict(position)
            return
        if shard.drawn:
            raise ConfigError(
                "cannot resume mid-epoch: the training loader's worker processes began drawing "
                "the epoch before the checkpoint was restored (a strategy that restores after "
                "its setup builds the loader first); resume with "
                f"{self.workers_key}=0, which does not change the order"
            )
        shard.load_state_dict(position)


class ShardedEvalBatches(DistributedSampler[list[int]]):
    """One rank's validation batches, as lists of row indices; no row is repeated or left out.

    Under DDP, Lightning puts a `DistributedSampler` into the validation DataLoader unless it
    already has one; that one pads the rows to a multiple of the world size, so up to world - 1
    rows would be scored twice. Being a `DistributedSampler`, this sampler is kept as it is. It
    yields whole batches: use it with ``DataLoader(batch_size=None)`` over a dataset that takes a
    list of indices.

    Rank ``r`` scores rows ``r::world``, in order: global batch ``k`` (all ranks' ``k``-th
    batches together) is rows ``k*B*world`` to ``(k+1)*B*world - 1``, the batches of one process
    with ``B * world`` rows per batch (``B = batch_size``). Ranks may hold one row more or less,
    but never a different number of batches: the module all-reduces the reference point in every
    step, so a rank left with nothing in the last global batch would wait for its peers forever.
    Hence a last global batch of fewer rows than ranks joins the one before it.

    Args:
        num_rows: rows of the validation set.
        batch_size: rows per rank per batch.
        num_replicas: the world size.
        rank: this process's rank.

    Raises:
        DataError: fewer rows than ranks (but more than none): some rank would have no row to
            score, and every rank must run the same validation steps.
    """

    def __init__(
        self, num_rows: int, batch_size: int, num_replicas: int = 1, rank: int = 0
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(
                f"data.batching.eval_batch_size must be an integer >= 1, got {batch_size!r}"
            )
        rows = range(num_rows)  # DistributedSampler only reads the length of its `dataset`
        super().__init__(rows, num_replicas=num_replicas, rank=rank, shuffle=False)  # type: ignore[arg-type]
        if 0 < num_rows < num_replicas:
            raise DataError(
                f"the validation set has {num_rows} row(s), fewer than the {num_replicas} ranks; "
                "every rank needs at least one: add validation rows (data.source.val_fraction, "
                "data.source.val_path) or use fewer devices (trainer.devices)"
            )
        self.num_rows, self.batch_size = num_rows, batch_size

    def _starts(self) -> list[int]:
        """First row of each global batch."""
        world = self.num_replicas
        starts = list(range(0, self.num_rows, self.batch_size * world))
        if len(starts) > 1 and self.num_rows - starts[-1] < world:
            starts.pop()  # too few rows left for every rank: they join the batch before
        return starts

    def __len__(self) -> int:
        return len(self._starts())

    def __iter__(self) -> Iterator[list[int]]:
        bounds = [*self._starts(), self.num_rows]
        for start, end in itertools.pairwise(bounds):
            # start is a multiple of world, so these are exactly this rank's rows r::world.
            yield list(range(start + self.rank, end, self.num_replicas))
