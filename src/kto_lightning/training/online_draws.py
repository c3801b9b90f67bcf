"""Online KTO's draws: what a prompt row offers (`Prompted`), a draw's completions, rewards and
labels (`Draw`), each prompt's seed (`draw_seed`), and the training rows a draw gives each rank
(`deal_training_rows`: KL partners drawn over all ranks' completions, the kept rows dealt out).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

from kto_lightning.common.distributed import gather_objects, rank, world_size
from kto_lightning.data.pairing import assign_kl_partners
from kto_lightning.data.tokenize import Example, fit_beside
from kto_lightning.errors import DataError
from kto_lightning.online.labelling import Labels
from kto_lightning.online.sampler import Samples


class Prompted(Protocol):
    """What the module reads of a prompt row: its token ids (as training encodes the prompt),
    the prompt itself (text or a conversation), its fields (what the reward function reads) and
    its index in its split (what seeds its completions).
    """

    @property
    def prompt_ids(self) -> Sequence[int]: ...

    @property
    def prompt(self) -> str | list[dict[str, str]]: ...

    @property
    def fields(self) -> dict[str, Any]: ...

    @property
    def index(self) -> int: ...


@dataclass(frozen=True)
class Draw:
    """One draw of a batch: its completions, their rewards and labels, and its training rows.

    Args:
        samples: the sampler's completions, each prompt's k together.
        prompts: each completion's prompt as the reward function read it.
        texts: the completions as text.
        rewards: (N,) float32, one per completion.
        labels: which completions are desirable and which train.
        batch: the KTO batch (tensors on the CPU) of the kept completions, or drawn across ranks
            of this rank's share of all ranks' kept ones; None when it has no row to train on,
            or was not asked for.
    """

    samples: Samples
    prompts: list[str]
    texts: list[str]
    rewards: Tensor
    labels: Labels
    batch: dict[str, Tensor] | None


def draw_seed(seed: int, key: str, row: int) -> int:
    """A prompt's seed from the run's seed, the draw's key ("train/<epoch>", "validation",
    "round/<n>") and the prompt's row in its split: the same three, the same completions, whatever
    the batch, the rank or the number of ranks (a resumed run draws again what was drawn)."""
    digest = hashlib.sha256(f"{seed}/{key}/{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def training_examples(
    owners: Sequence[Prompted],
    completions: Sequence[list[int]],
    desirable: Sequence[bool],
    max_length: int,
) -> list[Example]:
    """One training row per completion (its prompt's ids, the completion cut to fit beside
    them, its label)."""
    return [
        Example(list(r.prompt_ids), fit_beside(len(r.prompt_ids), c, max_length), bool(d))
        for r, c, d in zip(owners, completions, desirable, strict=True)
    ]


def deal_training_rows(
    examples: list[Example],
    keys: Sequence[tuple[int, int]],
    keep: Sequence[bool],
    seed: int,
    max_length: int,
    needs_kl_rows: bool,
    across_ranks: bool,
) -> list[Example]:
    """The kept rows this rank trains on, each with its KL partner drawn (with `seed`) among
    all completions, kept or not: with `across_ranks`, all ranks' completions, whose kept
    rows are then dealt out to the ranks in turn; else this rank's own. No rows when there are
    fewer than 2 different completions to pair.

    The completions are ordered by their keys (the prompt's row, the sample's number), so
    the pairs and the deal do not depend on how the prompts were split over ranks: one
    process trains on the rows that all ranks together do.
    """
    mine = list(zip(keys, examples, keep, strict=True))
    ranks = gather_objects(mine) if across_ranks else [mine]
    entries = sorted(
        ((key, r, i, example, kept) for r, rows in enumerate(ranks)
         for i, (key, example, kept) in enumerate(rows)),
        key=lambda entry: entry[:3],  # ties: a prompt padded into the batch twice
    )  # fmt: skip
    paired = [example for *_, example, _ in entries]
    if needs_kl_rows:
        try:
            paired = assign_kl_partners(paired, max_length, seed)
        except DataError:  # fewer than 2 different completions: no unrelated one
            return []
    kept = [row for row, (*_, keep_it) in zip(paired, entries, strict=True) if keep_it]
    return kept[rank() :: world_size()] if across_ranks else kept
