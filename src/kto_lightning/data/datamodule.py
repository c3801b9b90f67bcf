"""KTODataModule: rows -> tokenized examples with KL partners -> shuffled, padded batches."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from kto_lightning.data.collate import KTOCollator
from kto_lightning.data.rows import Row, read_jsonl
from kto_lightning.data.tokenize import Example, assign_kl_partners, check_lengths, tokenize_rows
from kto_lightning.data.toy import toy_rows
from kto_lightning.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TOY = "toy"


class ExampleDataset(Dataset):
    def __init__(self, examples: list[Example]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


class KTODataModule(L.LightningDataModule):
    """Binary-feedback data for KTO.

    Args:
        tokenizer: the policy's tokenizer (passed by the entry point, not from YAML).
        source: "toy" for the bundled task, or a JSON-lines file of `{prompt, completion, label}`.
        val_source: a file for validation; None splits `val_fraction` off `source` (seeded).
        val_fraction: share of rows held out for validation when `val_source` is None.
        prompt_column, completion_column, label_column: the column names in the files.
        max_length: prompt plus completion, in tokens.
        max_prompt_length: the prompt's share, in tokens (truncated from the left).
        batch_size: rows per device per step (each row also brings its KL row).
        eval_batch_size: validation rows per device; None means `batch_size`.
        num_workers: DataLoader worker processes.
        seed: the seed of the split and of the KL pairing.
        toy_rows: how many rows the bundled task generates.
        with_kl: build KL rows (needed by the `mismatched` reference point only).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        source: str = TOY,
        val_source: str | None = None,
        val_fraction: float = 0.1,
        prompt_column: str = "prompt",
        completion_column: str = "completion",
        label_column: str = "label",
        max_length: int = 256,
        max_prompt_length: int = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        toy_rows: int = 1200,
        with_kl: bool = True,
    ) -> None:
        super().__init__()
        check_lengths(max_length, max_prompt_length)
        if val_source is None and not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ConfigError(f"data.eval_batch_size must be >= 1 or null, got {eval_batch_size}")
        self.tokenizer = tokenizer
        self.source = source
        self.val_source = val_source
        self.val_fraction = val_fraction
        self.columns = (prompt_column, completion_column, label_column)
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.toy_rows = toy_rows
        self.with_kl = with_kl
        self.collator = KTOCollator(tokenizer.pad_token_id, with_kl=with_kl)
        # One generator for the whole run: a reloaded dataloader continues the shuffle stream.
        self._shuffle_generator = torch.Generator().manual_seed(seed)
        self.train_set: ExampleDataset | None = None
        self.val_set: ExampleDataset | None = None

    def _read(self, source: str) -> list[Row]:
        if source == TOY:
            return [Row(**r) for r in toy_rows(self.toy_rows, seed=self.seed)]
        return read_jsonl(Path(source), *self.columns)

    def _prepare(self, rows: list[Row], name: str, seed: int) -> ExampleDataset:
        examples, dropped = tokenize_rows(
            rows, self.tokenizer, self.max_length, self.max_prompt_length
        )
        if dropped:
            log.warning("%s: dropped %d row(s) left with no completion tokens", name, dropped)
        if not self.with_kl:  # no KL rows are used, so pairing (and its requirements) is skipped
            return ExampleDataset(examples)
        try:
            examples = assign_kl_partners(examples, self.max_length, seed)
        except DataError as error:
            raise DataError(f"{name} set: {error}") from None
        return ExampleDataset(examples)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        rows = self._read(self.source)
        if self.val_source is not None:
            train_rows, val_rows = rows, self._read(self.val_source)
        else:
            order = list(range(len(rows)))
            random.Random(self.seed).shuffle(order)
            n_val = max(1, round(len(rows) * self.val_fraction))
            if len(rows) - n_val < 2:
                raise DataError(
                    f"{self.source}: {len(rows)} rows are too few to hold out "
                    f"data.val_fraction={self.val_fraction} for validation"
                )
            val_rows = [rows[i] for i in order[:n_val]]
            train_rows = [rows[i] for i in order[n_val:]]
        self.train_set = self._prepare(train_rows, "train", self.seed)
        self.val_set = self._prepare(val_rows, "validation", self.seed + 1)
        labels = [e.label for e in self.train_set.examples]
        log.info(
            "data: %d train rows (%d desirable, %d undesirable), %d validation rows",
            len(labels),
            sum(labels),
            len(labels) - sum(labels),
            len(self.val_set),
        )

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            collate_fn=self.collator,
            num_workers=self.num_workers,
            generator=self._shuffle_generator,
            drop_last=len(self.train_set) > self.batch_size,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        return DataLoader(
            self.val_set,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=self.collator,
            num_workers=self.num_workers,
        )
