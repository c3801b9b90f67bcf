"""Online KTO's data: prompts to sample completions for, with each row's other fields, in batches.

Rows are read as the offline data reads them (data/splits.py: a local file, a hub dataset, rows in
memory, or a bundled task, with the same validation rows: named, or a seeded share held out), but
only the prompt column is required: every other column is kept as the row's fields, for the
reward function (a reference answer, test cases). A bundled task gives its prompts alone.

A prompt is text or a conversation, and its token ids are exactly those offline training gives it
(data/tokenize.py `encode_prompts`). Batches are lists of `PromptRow`, drawn in the offline
training order (data/sampler.py, data/sharding.py): seeded per epoch, each rank its share, and
resumable mid-epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import datasets
import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from kto_lightning.data.config import TOY, Columns, Source, as_group
from kto_lightning.data.dataset import BatchesOf
from kto_lightning.data.preparing import preparing
from kto_lightning.data.prompts import Prompt, checked_prompt
from kto_lightning.data.sampler import EpochShuffleSampler
from kto_lightning.data.sharding import (
    RankShard,
    ResumableTrainOrder,
    ShardedEvalBatches,
)
from kto_lightning.data.splits import (
    DataPath,
    held_out_rows,
    read_source,
    refuse_training_rows_as_validation,
    validation_data,
)
from kto_lightning.data.tokenize import encode_prompts
from kto_lightning.data.toy import CONSISTENCY
from kto_lightning.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# The columns of a bundled task's rows that online data leaves out: online KTO samples its own.
BUNDLED_ANSWER_COLUMNS = ("completion", "label")


@dataclass(frozen=True)
class PromptRow:
    """One prompt, ready to sample from and to score.

    Args:
        prompt_ids: the prompt's token ids, as offline training encodes it.
        prompt: the prompt as read: text, or a conversation of `{role, content}` messages.
        fields: the row's other columns (a reference answer, test cases), for the reward function.
        index: the row's position in its split (training or validation).
    """

    prompt_ids: list[int]
    prompt: Prompt
    fields: dict[str, Any]
    index: int


@dataclass(frozen=True)
class PromptSplit:
    """One split's prompts as read, before encoding.

    Args:
        prompts: each row's prompt, checked.
        fields: each row's other columns.
        conversational: the prompts are conversations (else text).
        name: where the rows came from, as messages name it.
    """

    prompts: list[Prompt]
    fields: list[dict[str, Any]]
    conversational: bool
    name: str

    def select(self, rows: np.ndarray, name: str) -> PromptSplit:
        """The rows at positions `rows`, named `name`."""
        return PromptSplit(
            [self.prompts[i] for i in rows], [self.fields[i] for i in rows],
            self.conversational, name,
        )  # fmt: skip


def _checked(value: Any, where: str) -> Prompt:
    """`value` as a prompt: non-empty text or a conversation (data/prompts.py's check)."""
    if not isinstance(value, str | list):
        raise DataError(
            f"{where}: a prompt is text or a conversation (a list of {{role, content}} "
            f"messages), got {type(value).__name__} {value!r:.60}"
        )
    return checked_prompt(value, where)


def prompt_split(raw: datasets.Dataset, column: str, name: str, bundled: bool) -> PromptSplit:
    """The prompts of rows `raw` (read from `name`) in column `column`, and their other columns;
    a bundled task's (`bundled`) without its completion and label.

    Raises:
        DataError: naming `name`, the row (from 1) and the column, when the column is missing,
            or a prompt is empty or neither text nor a conversation.
    """
    if column not in raw.column_names:
        raise DataError(
            f"{name}: no prompt column {column!r}; the columns found are "
            f"{sorted(raw.column_names)}; set data.columns.prompt to the column that holds the "
            "prompts"
        )
    prompts = [
        _checked(value, f"{name}, row {number}, column {column!r}")
        for number, value in enumerate(raw[column], start=1)
    ]
    dropped = {column, *(BUNDLED_ANSWER_COLUMNS if bundled else ())}
    others = [other for other in raw.column_names if other not in dropped]
    fields = raw.select_columns(others).to_list() if others else [{} for _ in prompts]
    return PromptSplit(prompts, fields, isinstance(prompts[0], list), name)


def read_prompt_splits(
    source: Source, columns: Columns, seed: int
) -> tuple[PromptSplit, PromptSplit]:
    """(training, validation) prompts of `source`: the validation rows `read_splits` would take
    (named by `source`, or the same seeded share of the rows held out); `seed` seeds the
    hold-out and a bundled task's rows."""
    column = columns.prompt
    if column is None:
        raise ConfigError(
            "data.columns.prompt is null, but online KTO reads prompts; set it to the column "
            "that holds them"
        )
    refuse_training_rows_as_validation(source)

    def read(path: DataPath, split: str, key: str = "path") -> PromptSplit:
        raw, name = read_source(source, path, split, seed, key)
        bundled = isinstance(path, str) and path in (TOY, CONSISTENCY)
        return prompt_split(raw, column, name, bundled)

    train = read(source.path, source.split)
    if not source.holds_out:
        return train, read(*validation_data(source))
    held_out = held_out_rows(len(train.prompts), source.val_fraction, seed, train.name)
    return (
        train.select(np.flatnonzero(~held_out), train.name),
        train.select(np.flatnonzero(held_out), f"{train.name} (held out)"),
    )


def encode_split(
    split: PromptSplit,
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_length: int,
    chat_template: str | None = None,
) -> list[PromptRow]:
    """The split's rows with their prompts' token ids (`encode_prompts`); conversations go
    through `chat_template` when given, else the tokenizer's own (which `chat_template` then
    replaces, as in offline training).

    Raises:
        DataError: naming the split, when it holds conversations and there is no chat template.
    """
    if split.conversational:
        if chat_template is not None:
            tokenizer.chat_template = chat_template
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"{split.name} holds conversations, but the tokenizer "
                f"({tokenizer.name_or_path or type(tokenizer).__name__}) has no chat template; "
                "use a chat model's tokenizer or set data.columns.chat_template"
            )
    ids = encode_prompts(split.prompts, tokenizer, split.conversational, max_prompt_length)
    return [
        PromptRow(prompt_ids, prompt, fields, index)
        for index, (prompt_ids, prompt, fields) in enumerate(
            zip(ids, split.prompts, split.fields, strict=True)
        )
    ]


class _Rows(Dataset[PromptRow]):
    """Prompt rows for a DataLoader: item i is row i."""

    def __init__(self, rows: list[PromptRow]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> PromptRow:
        return self.rows[index]


class PromptDataModule(ResumableTrainOrder, L.LightningDataModule):
    """Prompts for online KTO, in batches of `PromptRow` (plain lists, no tensors).

    The training loader draws the offline data module's order (a seeded shuffle per epoch, each
    rank its share, padded to a multiple of the world size) and keeps its position for an exact
    mid-epoch resume, through the same `state_dict` / `load_state_dict` hooks; every prompt comes
    once an epoch (a last batch may be smaller). The validation loader gives each held-out prompt
    once across ranks, in order.

    Args:
        tokenizer: the policy's tokenizer.
        source: where the rows come from (`Source`, or a mapping of its keys).
        columns: `prompt` names the prompt column and `chat_template` may replace the
            tokenizer's; the other keys are not read (`Columns`, or a mapping of its keys).
        prompts_per_step: prompts per batch, per rank (training and validation).
        max_prompt_length: a prompt's tokens at most, cut from the left (a leading BOS stays).
        seed: the seed of the validation hold-out, of a bundled task's rows and of the order.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        source: Source | Mapping[str, Any] | None = None,
        columns: Columns | Mapping[str, Any] | None = None,
        prompts_per_step: int = 8,
        max_prompt_length: int = 256,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for key, value, least in (
            ("prompts_per_step", prompts_per_step, 1),
            ("max_prompt_length", max_prompt_length, 1),
            ("num_workers", num_workers, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{key} must be an integer >= {least}, got {value!r}")
        self.tokenizer = tokenizer
        self.source = as_group(Source, source, "source")
        self.columns = as_group(Columns, columns, "columns")
        self.prompts_per_step = prompts_per_step
        self.max_prompt_length = max_prompt_length
        self.seed = seed
        self.num_workers = num_workers
        self.train_rows: list[PromptRow] | None = None
        self.val_rows: list[PromptRow] | None = None
        self._train_loader: StatefulDataLoader | None = None
        self._train_shard: RankShard | None = None
        self._restored_position: dict[str, int] | None = None

    def prepare_data(self) -> None:
        """Read the rows (a file or hub dataset into the datasets cache); also sets them up."""
        self.setup("fit")

    def setup(self, stage: str | None = None) -> None:
        """Read and encode the training and validation prompts, once."""
        if self.train_rows is not None:
            return
        # The offline lock: processes given the same data read it into the cache one at a time.
        with preparing(self.source):
            splits = read_prompt_splits(self.source, self.columns, self.seed)
        train, val = (
            encode_split(split, self.tokenizer, self.max_prompt_length, self.columns.chat_template)
            for split in splits
        )
        log.info(
            "prompts: %d to train on (%s), %d to validate on (%s)",
            len(train), splits[0].name, len(val), splits[1].name,
        )  # fmt: skip
        self.train_rows, self.val_rows = train, val

    @property
    def val_set(self) -> list[PromptRow]:
        """The validation prompts (after setup), each with its `prompt_ids`: what the
        generations table reads of a data module."""
        return self.val_rows or []

    def train_dataloader(self) -> StatefulDataLoader:
        """Batches of training prompts in the seeded order of the epoch, this rank's share."""
        assert self.train_rows is not None, "call setup() first"
        order = EpochShuffleSampler(len(self.train_rows), seed=self.seed)
        return self.resumable_loader(
            _Rows(self.train_rows), order, self.prompts_per_step, list, self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        """Batches of validation prompts, in order; each is validated once across ranks."""
        assert self.val_rows is not None, "call setup() first"
        sampler = ShardedEvalBatches(len(self.val_rows), self.prompts_per_step, *self._ranks())
        return DataLoader(
            BatchesOf(self.val_rows),
            batch_size=None,  # the sampler yields whole batches
            sampler=sampler,
            collate_fn=list,
            num_workers=self.num_workers,
        )
