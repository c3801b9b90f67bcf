"""Online KTO's data for the `round` loop: each round's prompts, and the steps a round trains in.

A round samples completions for its prompts with the policy as it is at the round's start, labels
them, and trains on them for one pass (training/online_round.py). Round `n`'s prompts are the
first `prompts_per_round` of a permutation of the training prompts seeded by (seed, n): every
prompt once a round when `prompts_per_round` is None. Each rank samples its share of them
(positions rank, rank + world, ...).

The training loader yields no data: it counts the round's steps, ceil(prompts x k / (rows per
step x ranks)), and keeps its position for an exact mid-round resume (the round's rows travel in
the module's checkpoint). Validation prompts come as in the `step` loop.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from kto_lightning.data.sampler import EpochShuffleSampler
from kto_lightning.errors import ConfigError
from kto_lightning.online.prompt_data import PromptDataModule, PromptRow


class RoundDataModule(PromptDataModule):
    """Prompts for online KTO's `round` loop (see the module).

    Args:
        prompts_per_round: prompts sampled for in a round, all ranks together; None: all of
            the training prompts.
        k: completions per prompt (`online.sampling.k`): with `rows_per_step`, the round's
            number of steps.
        rows_per_step: training rows a step, per rank (`data.batching.batch_size`).
        sample_batch_size: prompts per `generate` call while a round samples.
        **kwargs: `PromptDataModule`'s arguments (`prompts_per_step` is validation's batch).
    """

    def __init__(
        self,
        prompts_per_round: int | None,
        k: int,
        rows_per_step: int,
        sample_batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for key, value in (
            ("online.round.prompts", prompts_per_round),
            ("online.round.sample_batch_size", sample_batch_size),
            ("data.batching.batch_size", rows_per_step),
        ):
            if value is None and key == "online.round.prompts":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
        self.prompts_per_round = prompts_per_round
        self.k = k
        self.rows_per_step = rows_per_step
        self.sample_batch_size = sample_batch_size

    def round_size(self) -> int:
        """Prompts in a round, all ranks together (after setup)."""
        assert self.train_rows is not None, "call setup() first"
        total = len(self.train_rows)
        return total if self.prompts_per_round is None else min(self.prompts_per_round, total)

    def steps_per_round(self) -> int:
        """The optimizer's batches in a round: its completions spread over all ranks' steps."""
        world, _ = self._ranks()
        return max(1, math.ceil(self.round_size() * self.k / (self.rows_per_step * world)))

    def round_prompts(self, number: int) -> list[PromptRow]:
        """This rank's share of round `number`'s prompts (the same on every call)."""
        assert self.train_rows is not None, "call setup() first"
        order = np.random.default_rng([self.seed, number]).permutation(len(self.train_rows))
        world, rank = self._ranks()
        return [self.train_rows[i] for i in order[: self.round_size()][rank::world]]

    def train_dataloader(self) -> StatefulDataLoader:
        """A round's steps, this rank's share (each rank takes every step): the numbers
        0 .. steps - 1, resumable mid-round."""
        steps = self.steps_per_round()
        world, _ = self._ranks()
        # Each rank takes positions rank, rank + world, ...: world copies of each step number.
        order = EpochShuffleSampler(steps * world, seed=self.seed)
        return self.resumable_loader(_Steps(steps * world), order, 1, list, self.num_workers)


class _Steps(Dataset[int]):
    """Item i is i: the round loop's loader counts steps, the module holds the rows."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index
