"""The tokenized split as a torch Dataset: item i is row i with its KL partner's completion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

import datasets
import numpy as np
import pyarrow.compute as pc
from torch.utils.data import Dataset

from kto_lightning.data.rows import arrow_column
from kto_lightning.data.tokenize import Example, fit_beside

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Rows(Protocol[T_co]):
    """What `BatchesOf` reads of its rows: their count, and row i."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> T_co: ...


class KTODataset(Dataset):
    """Tokenized rows; item i also carries its KL partner's completion, cut to fit its prompt.

    Args:
        rows: tokenized rows (`prompt_ids`, `completion_ids`, `label`).
        partners: row i's KL partner (kto_lightning.data.pairing), or None without KL rows.
        max_length: `data.lengths.max_length`, the room a prompt and a completion share.
    """

    def __init__(
        self, rows: datasets.Dataset, partners: Sequence[int] | np.ndarray | None, max_length: int
    ) -> None:
        self.rows = rows.select_columns(["prompt_ids", "completion_ids", "label"])
        self.partners = partners
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Example:
        row = self.rows[index]
        kl: list[int] = []
        if self.partners is not None:
            partner = self.rows[int(self.partners[index])]["completion_ids"]
            kl = fit_beside(len(row["prompt_ids"]), partner, self.max_length)
        return Example(row["prompt_ids"], row["completion_ids"], bool(row["label"]), kl, index)

    @property
    def lengths(self) -> list[int]:
        """Tokens of each row as a batch pads it: the longer of the row and its KL row."""
        prompts, completions = (
            pc.list_value_length(arrow_column(self.rows, name)).to_numpy().astype(np.int64)
            for name in ("prompt_ids", "completion_ids")
        )
        lengths = prompts + completions
        if self.partners is not None:  # the partner's completion, cut as fit_beside cuts it
            kl = np.minimum(completions[np.asarray(self.partners)], self.max_length - prompts)
            lengths = np.maximum(lengths, prompts + kl)
        return lengths.tolist()

    @property
    def labels(self) -> list[bool]:
        return arrow_column(self.rows, "label").to_numpy().astype(bool).tolist()

    @property
    def examples(self) -> list[Example]:
        return [self[i] for i in range(len(self))]


class BatchesOf(Dataset[list[T]], Generic[T]):
    """``BatchesOf(rows)[[i, j]]`` is ``[rows[i], rows[j]]``: for a loader whose sampler yields
    whole batches (ShardedEvalBatches). `rows`: a KTODataset, or online KTO's prompt rows."""

    def __init__(self, rows: Rows[T]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, indices: list[int]) -> list[T]:
        return [self.rows[i] for i in indices]
