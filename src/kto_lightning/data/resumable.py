"""Exact mid-epoch resume: an epoch-seeded shuffle and a DataLoader that remembers its position.

Lightning restores any dataloader with `state_dict` / `load_state_dict`. Ours records how many
samples of the current epoch were consumed (from Lightning's own count of processed batches, so a
batch prefetched but not trained on is not counted); after a restart the sampler skips exactly
those, and the order itself depends only on (seed, epoch). Under DDP the count is global and the
skip happens before the per-rank split, which a multiple of world x batch leaves unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class EpochSampler(Sampler[int]):
    """Base of our training samplers: an order chosen per epoch, and a one-time skip.

    Lightning calls `set_epoch` before each epoch; `ResumableDataLoader.load_state_dict` calls
    `skip_next` after a mid-epoch restart. Subclasses build the epoch's order and pass it through
    `_resume`, which drops the samples already trained on.
    """

    epoch: int = 0
    _skip: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order `__iter__` yields next."""
        self.epoch = epoch

    def skip_next(self, samples: int) -> None:
        """The next iteration starts `samples` into its order (used once, after a restart)."""
        self._skip = samples

    def _resume(self, order: list[int]) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return iter(order[skip:])


class EpochShuffleSampler(EpochSampler):
    """A permutation of range(n) seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        # A generator: the order is drawn at the first next(), after Lightning's set_epoch.
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        yield from self._resume(torch.randperm(self.n, generator=generator).tolist())


def _innermost(sampler: Any) -> Any:
    """Our sampler inside Lightning's DistributedSamplerWrapper, if it wrapped one."""
    while hasattr(sampler, "dataset") and hasattr(sampler.dataset, "_sampler"):
        sampler = sampler.dataset._sampler
    return sampler


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position within an epoch survives a checkpoint and a restart.

    Args:
        progress: returns (epoch, batches processed in it, world size) at checkpoint time;
            the data module passes one that reads Lightning's fit-loop progress.
    """

    def __init__(self, *args: Any, progress: Callable[[], tuple[int, int, int]] | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        if self.progress is None:
            return {}
        epoch, batches, world = self.progress()
        return {"epoch": epoch, "samples": batches * (self.batch_size or 1) * world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = _innermost(self.sampler)
        if not state or not hasattr(sampler, "skip_next"):
            return
        sampler.set_epoch(state["epoch"])
        sampler.skip_next(state["samples"])
