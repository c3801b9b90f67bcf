"""RoundKTOModule: online KTO's `round` loop.

A round (one training epoch) starts by sampling k completions of each of its prompts with the
policy as it is then, scoring and labelling them, and pairing each with another prompt's
completion for the KL rows; the round then trains one pass over the kept rows:

    round n's prompts (online/round_data.py) -> each rank samples its share, in batches
        -> all ranks' completions, in the order of (prompt row, sample): labels, KL pairs,
           class weights from the round's counts (eq. 8), a seeded order of the prompts
        -> the reference log-probs of every kept row, each rank scoring its share
        -> steps 0 .. S-1: step s trains the kept rows of the s-th S-th of the prompts (a
           prompt's completions side by side, as in a step-loop batch), each rank its share

The reference is the initial policy (`reference: initial`: a frozen copy, or the policy with its
adapters off), or the policy as it was at the round's start (`refresh`: then no second model is
held). Either way its log-probs are computed once, when the round is drawn, and kept with the
round's rows: a checkpoint written mid-round holds the round (rows, labels, log-probs, order),
so a resumed run trains exactly the steps the interrupted one would have.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from kto_lightning.common.distributed import all_reduce_sum, gather_objects, rank, world_size
from kto_lightning.core.logprobs import batch_logprobs, eval_mode
from kto_lightning.data.pairing import assign_kl_partners
from kto_lightning.data.tokenize import Example, fit_beside
from kto_lightning.errors import ConfigError, DataError
from kto_lightning.models.reference import ReferenceProvider
from kto_lightning.online.round_data import RoundDataModule
from kto_lightning.training.online import OnlineKTOModule
from kto_lightning.training.online_draws import draw_seed

# A round as a checkpoint holds it (module.on_save_checkpoint).
ROUND_KEY = "online_round"

REFERENCES = ("initial", "refresh")


def checked_reference(value: object) -> str:
    """`online.round.reference` when it is one of REFERENCES; ConfigError naming the key else."""
    if value not in REFERENCES:
        raise ConfigError(f"online.round.reference must be one of {REFERENCES}, got {value!r}")
    return str(value)


class RoundReference(ReferenceProvider):
    """The reference log-probs of the round's rows, looked up by the row's index; validation's
    rows go to the initial reference (`initial`), which `refresh` does not hold.

    Args:
        initial: the initial policy's provider (a copy, or the adapters off); None: refresh.
    """

    def __init__(self, initial: ReferenceProvider | None) -> None:
        super().__init__()
        self.initial = initial
        self.main: Tensor | None = None
        self.kl: Tensor | None = None

    def hold(self, main: Tensor, kl: Tensor | None) -> None:
        self.main, self.kl = main, kl

    def prepare(self, policy: torch.nn.Module) -> None:
        if self.initial is not None:
            self.initial.prepare(policy)

    def logps(self, policy, batch, split, chunk_size, needs_kl_rows, packing=None):
        if split != "train":
            assert self.initial is not None, "a refreshed reference scores the round's rows only"
            return self.initial.logps(policy, batch, split, chunk_size, needs_kl_rows, packing)
        assert self.main is not None, "no round drawn yet"
        index = batch["index"].to(self.main.device)
        kl = self.kl[index] if needs_kl_rows and self.kl is not None else None
        return self.main[index], kl


class Sampled(NamedTuple):
    """One completion of a round as the rank that drew it hands it to all: its key (the
    prompt's row, the sample's number), ids, the prompt and completion as the reward function
    read them, its reward and labels, and whether a stop token ended it."""

    key: tuple[int, int]
    prompt_ids: list[int]
    completion_ids: list[int]
    shown: str
    text: str
    reward: float
    desirable: bool
    keep: bool
    stopped: bool


@dataclass
class Round:
    """One round's kept rows, all ranks' (what a checkpoint holds of it).

    Args:
        number: the round (the training epoch).
        prompt_ids, completion_ids, kl_completion_ids, labels: the kept rows, row i's index i.
        main, kl: the reference log-probs of row i's completion and of its KL row.
        order: the kept rows grouped by prompt, the groups in the order the round trains them.
        shown, texts, rewards: row i's prompt and completion as the reward function read them,
            and its reward (the samples table).
        figures: the round's draw, as train/online/* logs it.
    """

    number: int
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    kl_completion_ids: list[list[int]]
    labels: list[bool]
    main: list[float]
    kl: list[float]
    order: list[list[int]]
    shown: list[str]
    texts: list[str]
    rewards: list[float]
    figures: dict[str, float]

    @property
    def n_desirable(self) -> int:
        return sum(self.labels)

    @property
    def n_undesirable(self) -> int:
        return len(self.labels) - sum(self.labels)

    def step_rows(self, step: int, steps: int, all_ranks: bool = False) -> list[int]:
        """The rows step `step` of `steps` trains on this rank: its share of the step's slice
        (`all_ranks`: the whole slice)."""
        order = self.order
        if len(order) < steps:  # fewer prompts kept than steps: spread their rows instead
            order = [[i] for group in order for i in group]
        n = len(order)  # spread evenly over the steps
        rows = [i for group in order[step * n // steps : (step + 1) * n // steps] for i in group]
        return rows if all_ranks else rows[rank() :: world_size()]

    def example(self, i: int) -> Example:
        return Example(
            self.prompt_ids[i], self.completion_ids[i], self.labels[i], self.kl_completion_ids[i], i
        )


class RoundKTOModule(OnlineKTOModule):
    """Train `policy` with KTO in rounds: sample a round's completions, train one pass on them.

    Args (by keyword; besides `OnlineKTOModule`'s):
        reference: the initial policy's provider; unused (None may be given) with
            `round_reference="refresh"`.
        round_reference: "initial" (the reference stays the initial policy) or "refresh" (each
            round's reference is the policy at the round's start).
    """

    summary_title = "online KTO training (rounds)"

    def __init__(
        self,
        *,
        reference: ReferenceProvider | None,
        round_reference: str = "initial",
        **kwargs: Any,
    ) -> None:
        round_reference = checked_reference(round_reference)
        initial = reference if round_reference == "initial" else None
        super().__init__(reference=RoundReference(initial), **kwargs)
        self.refresh = round_reference == "refresh"
        # No model gives the round-start policy's log-probs of validation's rows: with refresh,
        # validation reports the held-out rewards alone.
        self.validates_kto = not self.refresh
        self._round: Round | None = None
        self._held = -1  # the round whose log-probs and class weights are in place

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._round is not None:
            checkpoint[ROUND_KEY] = asdict(self._round)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get(ROUND_KEY)
        self._round = None if state is None else Round(**state)

    # ---------------------------------------------------------------- the round
    @property
    def _data(self) -> RoundDataModule:
        datamodule = self.trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning
        assert isinstance(datamodule, RoundDataModule), "the round loop reads a RoundDataModule"
        return datamodule

    def _hold(self, drawn: Round) -> None:
        """Put the round's reference log-probs (on the policy's device) and class weights in
        place."""
        reference = self.reference
        assert isinstance(reference, RoundReference)
        main = torch.tensor(drawn.main, dtype=torch.float32, device=self.device)
        kl = torch.tensor(drawn.kl, dtype=torch.float32, device=self.device)
        reference.hold(main, kl if self.loss.needs_kl_rows else None)
        if drawn.labels:  # a round that kept nothing trains nothing: its steps are skipped
            counts = drawn.n_desirable, drawn.n_undesirable
            self.loss, _ = self.loss_config.with_class_counts(*counts)
        self._held = drawn.number

    def draw_round(self, number: int) -> Round:
        """Sample, label and pair round `number`'s completions on every rank, and score their
        reference log-probs (every rank calls it at once; all get the same round)."""
        data, start = self._data, time.perf_counter()
        key = f"round/{number}"
        mine: list[Sampled] = []
        sampled = 0.0
        prompts = data.round_prompts(number)
        for first in range(0, len(prompts), data.sample_batch_size):
            rows = prompts[first : first + data.sample_batch_size]
            drawn = self.draw(rows, self.sampler, key)
            sampled += drawn.samples.seconds
            index = drawn.samples.prompt_index.tolist()
            labels = drawn.labels
            for j, (i, completion) in enumerate(
                zip(index, drawn.samples.completion_ids, strict=True)
            ):
                row = rows[i]
                mine.append(Sampled(
                    (row.index, j % self.sampler.k), list(row.prompt_ids),
                    fit_beside(len(row.prompt_ids), completion, self.max_length),
                    drawn.prompts[j], drawn.texts[j], float(drawn.rewards[j]),
                    bool(labels.desirable[j]), bool(labels.keep[j]),
                    bool(drawn.samples.stopped[j]),
                ))  # fmt: skip
        # All ranks' completions in the order of (prompt row, sample): the same on every rank.
        entries = sorted((e for rows in gather_objects(mine) for e in rows), key=lambda e: e.key)
        examples = [Example(e.prompt_ids, e.completion_ids, e.desirable) for e in entries]
        if self.loss.needs_kl_rows:
            try:  # partners among all of the round's completions, kept or not
                examples = assign_kl_partners(
                    examples, self.max_length, draw_seed(self.seed, f"{key}/pairs", 0)
                )
            except DataError:  # fewer than 2 different completions
                examples = []
        kept = [i for i, e in enumerate(entries) if e.keep] if examples else []
        # A prompt's kept completions train side by side (their shared tokens' gradients cancel
        # within a step, as in the step loop); the prompts in a seeded order.
        groups: dict[int, list[int]] = {}
        for position, i in enumerate(kept):
            groups.setdefault(entries[i].key[0], []).append(position)
        generator = torch.Generator().manual_seed(draw_seed(self.seed, f"{key}/order", 0))
        shuffled = torch.randperm(len(groups), generator=generator).tolist()
        order = [list(groups.values())[g] for g in shuffled]
        rewards = torch.tensor([e.reward for e in entries])
        n = max(len(entries), 1)
        figures = {
            "reward_mean": float(rewards.mean()) if len(entries) else math.nan,
            "reward_std": float(rewards.std(unbiased=False)) if len(entries) else math.nan,
            "desirable_share": sum(entries[i].desirable for i in kept) / max(len(kept), 1),
            "kept_share": len(kept) / n,
            "completion_tokens": sum(len(e.completion_ids) for e in entries) / n,
            "stopped_share": sum(e.stopped for e in entries) / n,
            "sample_seconds": sampled,
            "round": float(number),
        }
        main, kl = self._reference_logps([examples[i] for i in kept])
        figures["round_seconds"] = time.perf_counter() - start
        return Round(
            number,
            [examples[i].prompt_ids for i in kept],
            [examples[i].completion_ids for i in kept],
            [examples[i].kl_completion_ids for i in kept],
            [examples[i].label for i in kept],
            main, kl, order,
            [entries[i].shown for i in kept], [entries[i].text for i in kept],
            [entries[i].reward for i in kept], figures,
        )  # fmt: skip

    @torch.no_grad()
    def _reference_logps(self, examples: Sequence[Example]) -> tuple[list[float], list[float]]:
        """Every row's reference log-prob and its KL row's: each rank scores rows rank,
        rank + world, ... in batches of a step's rows, and all ranks get them all."""
        size, own = world_size(), rank()
        needs_kl = self.loss.needs_kl_rows
        chunk = self._data.rows_per_step
        scored: list[tuple[int, float, float]] = []
        positions = list(range(own, len(examples), size))
        for first in range(0, len(positions), chunk):
            part = positions[first : first + chunk]
            batch = self._to_device(self.collator([examples[i] for i in part]))
            if self.refresh:  # the reference is the policy as it is at the round's start
                with eval_mode(self.policy):
                    main, kl = batch_logprobs(
                        self.policy, batch, self.logprob_chunk_size, needs_kl, self.packing
                    )
            else:
                reference = self.reference
                assert isinstance(reference, RoundReference) and reference.initial is not None
                main, kl = reference.initial.logps(
                    self.policy, batch, "train", self.logprob_chunk_size, needs_kl, self.packing
                )
            kls = kl.float().tolist() if kl is not None else [0.0] * len(part)
            scored.extend(zip(part, main.float().tolist(), kls, strict=True))
        table = sorted(row for rows in gather_objects(scored) for row in rows)
        return [row[1] for row in table], [row[2] for row in table]

    # ---------------------------------------------------------------- training
    def training_step(  # type: ignore[override]
        self, batch: Any, batch_idx: int
    ) -> Tensor:
        number = self.current_epoch
        if self._round is None or self._round.number != number:
            self._round = self.draw_round(number)
        drawn = self._round
        if self._held != number:
            self._hold(drawn)
        step = int(self.trainer.fit_loop.epoch_loop.batch_progress.current.ready) - 1
        steps = self._data.steps_per_round()
        rows = drawn.step_rows(step, steps)
        self._remember_rows(drawn, rows)
        has_rows = torch.tensor([int(len(rows) > 0)], device=self.device)
        if int(all_reduce_sum(has_rows).item()) < world_size():
            # A rank without rows cannot join the step's collectives: every rank skips it.
            return self._skip()
        everyone = drawn.step_rows(step, steps, all_ranks=True)
        n_desirable = sum(drawn.labels[i] for i in everyone)
        self.count_trained(n_desirable, len(everyone) - n_desirable)
        self._trained_since_step = True
        batch = self.collator([drawn.example(i) for i in rows])
        return self._train_on(self._to_device(batch))

    def _remember_rows(self, drawn: Round, rows: list[int]) -> None:
        """The step's rows for the samples table, and the round's figures for the metrics."""
        self._online = {**drawn.figures, "skipped_draws": float(self._skipped)}
        self.last_draw = [
            {
                "prompt": drawn.shown[i],
                "completion": drawn.texts[i],
                "reward": drawn.rewards[i],
                "label": drawn.labels[i],
                "kept": True,
            }
            for i in rows
        ]
