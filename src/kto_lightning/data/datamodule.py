"""KTODataModule: rows of any supported source and shape -> tokenized examples -> batches."""

from __future__ import annotations

import logging
import random

import datasets
import lightning as L
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from kto_lightning.data.collate import KTOCollator
from kto_lightning.data.formats import Schema, normalise
from kto_lightning.data.resumable import EpochSampler, EpochShuffleSampler, ResumableDataLoader
from kto_lightning.data.sampler import (
    LabelBalancedSampler,
    LengthGroupedSampler,
    ShardedEvalBatches,
)
from kto_lightning.data.sources import load_source
from kto_lightning.data.summary import SplitSummary, format_summary, percentiles
from kto_lightning.data.tokenize import Example, check_lengths, kl_partners, tokenize_dataset
from kto_lightning.data.toy import toy_rows
from kto_lightning.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TOY = "toy"
DROPPED_EMPTY = "no completion tokens left"


def _tokenization_note(cached: bool, in_memory: bool) -> str:
    if in_memory:
        return "in memory"  # rows made in this process (the toy task) have no cache to reuse
    return "cached" if cached else "computed"


class KTODataset(Dataset):
    """Tokenized rows; item i also carries its KL partner's completion, cut to fit its prompt."""

    def __init__(self, rows: datasets.Dataset, partners: list[int] | None, max_length: int) -> None:
        self.rows = rows.select_columns(["prompt_ids", "completion_ids", "label"])
        self.partners = partners
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Example:
        row = self.rows[index]
        kl: list[int] = []
        if self.partners is not None:
            room = self.max_length - len(row["prompt_ids"])
            kl = self.rows[self.partners[index]]["completion_ids"][:room]
        return Example(row["prompt_ids"], row["completion_ids"], bool(row["label"]), kl, index)

    @property
    def lengths(self) -> list[int]:
        """Tokens of each row as a batch pads it: the longer of the row and its KL row."""
        prompts = [len(ids) for ids in self.rows["prompt_ids"]]
        completions = [len(ids) for ids in self.rows["completion_ids"]]
        lengths = [p + c for p, c in zip(prompts, completions, strict=True)]
        if self.partners is None:
            return lengths
        kl = [
            p + min(completions[j], self.max_length - p)
            for p, j in zip(prompts, self.partners, strict=True)
        ]
        return [max(a, b) for a, b in zip(lengths, kl, strict=True)]

    @property
    def labels(self) -> list[bool]:
        return [bool(x) for x in self.rows["label"]]

    @property
    def examples(self) -> list[Example]:
        return [self[i] for i in range(len(self))]


class _Batches(Dataset):
    """``batches[[i, j]]`` is ``[rows[i], rows[j]]``: for a loader whose sampler yields batches."""

    def __init__(self, rows: KTODataset) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, indices: list[int]) -> list[Example]:
        return [self.rows[i] for i in indices]


class KTODataModule(L.LightningDataModule):
    """Binary-feedback data for KTO, from a local file, a hub dataset or the bundled toy task.

    Args:
        tokenizer: the policy's tokenizer (passed by the entry point, not from YAML).
        source: "toy", a local .jsonl/.json/.parquet/.csv file, or a hub dataset name.
        subset: the hub dataset's configuration (subset) name.
        split: the split of `source` to train on.
        revision: the hub dataset's branch, tag or commit.
        val_source: a file or hub dataset for validation; None uses `source`.
        val_split: the split for validation; None (with no `val_source`) holds out
            `val_fraction` of the training rows, seeded.
        val_fraction: share of rows held out for validation when no validation data is named.
        format: "auto", "unpaired", "paired" or "score" (see kto_lightning.data.formats).
        prompt_column, completion_column, label_column: columns of unpaired rows.
        chosen_column, rejected_column: columns of paired rows (the prompt may be implicit).
        score_column, score_threshold: a numeric column and the threshold for "desirable".
        chat_template: a Jinja chat template replacing the tokenizer's own.
        max_length: prompt plus completion, in tokens.
        max_prompt_length: the prompt's share, in tokens (truncated from the left).
        batch_size: rows per device per step (each row also brings its KL row).
        eval_batch_size: validation rows per device; None means `batch_size`.
        balanced_batches: every training batch holds both labels (LabelBalancedSampler).
        group_by_length: batch rows of similar length together to cut padding
            (LengthGroupedSampler); not together with `balanced_batches`.
        num_workers: DataLoader worker processes.
        num_proc: processes for reading and tokenizing (datasets.map).
        cache_dir: the datasets cache folder; None is HF_DATASETS_CACHE.
        seed: the seed of the validation split, of the pairing and of the shuffle.
        toy_rows: how many rows the bundled task generates.
        with_kl: build KL rows (needed by the `mismatched` reference point only).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        source: str = TOY,
        subset: str | None = None,
        split: str = "train",
        revision: str | None = None,
        val_source: str | None = None,
        val_split: str | None = None,
        val_fraction: float = 0.1,
        format: str = "auto",
        prompt_column: str | None = "prompt",
        completion_column: str = "completion",
        label_column: str = "label",
        chosen_column: str = "chosen",
        rejected_column: str = "rejected",
        score_column: str | None = None,
        score_threshold: float | None = None,
        chat_template: str | None = None,
        max_length: int = 256,
        max_prompt_length: int = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        balanced_batches: bool = False,
        group_by_length: bool = False,
        num_workers: int = 0,
        num_proc: int | None = None,
        cache_dir: str | None = None,
        seed: int = 42,
        toy_rows: int = 1200,
        with_kl: bool = True,
    ) -> None:
        super().__init__()
        check_lengths(max_length, max_prompt_length)
        if val_source is None and val_split is None and not 0.0 < val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size must be >= 1, got {batch_size}")
        if eval_batch_size is not None and eval_batch_size < 1:
            raise ConfigError(f"data.eval_batch_size must be >= 1, got {eval_batch_size}")
        self.tokenizer = tokenizer
        self.schema = Schema(
            format, prompt_column, completion_column, label_column, chosen_column,
            rejected_column, score_column, score_threshold,
        )  # fmt: skip
        self.source, self.subset, self.split, self.revision = source, subset, split, revision
        self.val_source, self.val_split, self.val_fraction = val_source, val_split, val_fraction
        self.chat_template = chat_template
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        if balanced_batches and group_by_length:
            raise ConfigError(
                "data.balanced_batches and data.group_by_length each choose the batches' rows; "
                "set at most one of them to true"
            )
        self.balanced_batches = balanced_batches
        self.group_by_length = group_by_length
        self.num_workers = num_workers
        self.num_proc = num_proc
        self.cache_dir = cache_dir
        self.seed = seed
        self.toy_rows = toy_rows
        self.collator = KTOCollator(tokenizer.pad_token_id, with_kl=with_kl)
        self.train_set: KTODataset | None = None
        self.val_set: KTODataset | None = None
        self.summaries: dict[str, SplitSummary] = {}

    # ------------------------------------------------------------------ reading
    def _load(self, source: str, split: str) -> datasets.Dataset:
        if source == TOY:
            return datasets.Dataset.from_list(toy_rows(self.toy_rows, seed=self.seed))
        return load_source(source, self.subset, split, self.revision, self.cache_dir)

    def _read(self, source: str, split: str, seed: int) -> tuple[datasets.Dataset, str, bool, int]:
        """Load and normalise one source; returns (rows, format, conversational, rows read)."""
        raw = self._load(source, split)
        rows, fmt, chat = normalise(
            raw, self.schema, self._name(source, split), seed, self.num_proc
        )
        return rows, fmt, chat, len(raw)

    def _hold_out(
        self, rows: datasets.Dataset, n_source: int, name: str
    ) -> tuple[list[int], list[int], int]:
        """Training and validation row indices, and the number of source rows held out.

        A seeded share of the *source* rows is held out.

        The split is made over source rows, after they were read and checked, so error messages
        name rows as they stand in the file and both rows of a pair land on the same side.
        """
        order = list(range(n_source))
        random.Random(self.seed).shuffle(order)
        n_val = max(1, round(n_source * self.val_fraction))
        if n_source - n_val < 2:
            raise DataError(
                f"{name}: {n_source} rows are too few to hold out "
                f"data.val_fraction={self.val_fraction} for validation"
            )
        held_out = set(order[:n_val])
        source_rows = rows["row"]
        train = [i for i, r in enumerate(source_rows) if r not in held_out]
        val = [i for i, r in enumerate(source_rows) if r in held_out]
        return train, val, n_val

    def _name(self, source: str, split: str) -> str:
        return source if source == TOY or split == "train" else f"{source}[{split}]"

    # ------------------------------------------------------------------ preparing
    def _prepare(
        self,
        rows: datasets.Dataset,
        fmt: str,
        chat: bool,
        split: str,
        name: str,
        rows_read: int,
        seed: int,
    ) -> tuple[KTODataset, SplitSummary]:
        """Tokenize, filter and pair one split; `name` says where its rows came from."""
        if chat:
            if self.chat_template is not None:
                self.tokenizer.chat_template = self.chat_template
            if not getattr(self.tokenizer, "chat_template", None):
                raise DataError(
                    f"{name} holds conversations, but the tokenizer "
                    f"({self.tokenizer.name_or_path or type(self.tokenizer).__name__}) has no chat "
                    "template; use a chat model's tokenizer or set data.chat_template"
                )
        tokenized, cached = tokenize_dataset(
            rows, self.tokenizer, chat, self.max_length, self.max_prompt_length, name, self.num_proc
        )
        prompt_tokens = list(tokenized["prompt_tokens"])
        completion_tokens = list(tokenized["completion_tokens"])
        kept_rows = tokenized.filter(
            lambda batch: [len(c) > 0 for c in batch["completion_ids"]],
            batched=True,
            desc=f"Filtering {name}",
        )
        labels = [bool(x) for x in kept_rows["label"]]
        prompt_kept = [min(n, self.max_prompt_length) for n in prompt_tokens]
        summary = SplitSummary(
            name=split,
            source=name,
            format=fmt,
            conversational=chat,
            rows_read=rows_read,
            desirable=sum(labels),
            undesirable=len(labels) - sum(labels),
            prompts_truncated=sum(n > self.max_prompt_length for n in prompt_tokens),
            completions_truncated=sum(
                c > self.max_length - p for p, c in zip(prompt_kept, completion_tokens, strict=True)
            ),
            prompt_lengths=percentiles(prompt_tokens),
            completion_lengths=percentiles(completion_tokens),
            tokenization=_tokenization_note(cached, in_memory=not rows.cache_files),
        )
        if len(tokenized) > len(kept_rows):
            summary.dropped[DROPPED_EMPTY] = len(tokenized) - len(kept_rows)
        partners = None
        if self.collator.with_kl:
            if len(kept_rows) < 2:
                raise DataError(
                    f"{name}: the KL estimate needs at least 2 rows, got {len(kept_rows)}"
                )
            try:
                partners = kl_partners(
                    kept_rows["prompt_ids"], kept_rows["completion_ids"], self.max_length, seed
                )
            except DataError as error:
                raise DataError(f"{name}: {error}") from None
        return KTODataset(kept_rows, partners, self.max_length), summary

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_name = self._name(self.source, self.split)
        rows, fmt, chat, n_read = self._read(self.source, self.split, self.seed)
        if self.val_source is not None or self.val_split is not None:
            val_source, val_split = self.val_source or self.source, self.val_split or self.split
            val_name = self._name(val_source, val_split)
            val_rows, val_fmt, val_chat, n_val_read = self._read(val_source, val_split, self.seed)
            train = (rows, fmt, chat, "train", train_name, n_read)
            val = (val_rows, val_fmt, val_chat, "validation", val_name, n_val_read)
        else:
            train_idx, val_idx, n_val_read = self._hold_out(rows, n_read, train_name)
            train = (rows.select(train_idx), fmt, chat, "train", train_name, n_read - n_val_read)
            held_out = (rows.select(val_idx), fmt, chat, "validation")
            val = (*held_out, f"{train_name} (held out)", n_val_read)
        train_set, train_summary = self._prepare(*train, self.seed)
        val_set, val_summary = self._prepare(*val, self.seed + 1)
        log.info(
            "%s",
            format_summary([train_summary, val_summary], self.max_length, self.max_prompt_length),
        )
        self._check(train_summary, val_summary)
        # Only now, after every check passed: a failed setup leaves nothing half-built behind.
        self.train_set, self.val_set = train_set, val_set
        self.summaries = {"train": train_summary, "validation": val_summary}

    def _check(self, train: SplitSummary, val: SplitSummary) -> None:
        if train.kept < self.batch_size:
            raise DataError(
                f"{train.source}: {train.kept} training rows are fewer than one batch "
                f"(data.batch_size={self.batch_size}); lower data.batch_size or add rows"
            )
        for summary in (train, val):
            if summary.desirable == 0 or summary.undesirable == 0:
                missing = "desirable" if summary.desirable == 0 else "undesirable"
                log.warning(
                    "%s set has no %s rows: KTO still trains, but only pushes one way, and the "
                    "reward AUROC is undefined (logged as NaN)",
                    summary.name, missing,
                )  # fmt: skip
            if summary.prompts_truncated:
                log.warning(
                    "%s set: %d prompt(s) longer than data.max_prompt_length=%d were cut from the "
                    "left (their start is lost)",
                    summary.name, summary.prompts_truncated, self.max_prompt_length,
                )  # fmt: skip

    @property
    def label_counts(self) -> tuple[int, int]:
        """(desirable, undesirable) training rows after filtering; call setup() first."""
        summary = self.summaries["train"]
        return summary.desirable, summary.undesirable

    @property
    def trained_label_counts(self) -> tuple[int, int]:
        """(desirable, undesirable) rows the training sampler draws per epoch; after setup().

        `label_counts`, except with `balanced_batches`: its epoch fills whole batches, each with
        a rounded share of each label and at least one row of each, so rows repeat (a label
        rarer than 1 in `batch_size` rows fills one slot of every batch). `auto` class weights
        are resolved from these counts. They are counted for torch.distributed's world size at
        the call (1 before DDP starts); an epoch on more ranks differs by rounding at most.
        """
        if not self.balanced_batches:
            return self.label_counts
        return self._train_sampler().label_counts()

    # ------------------------------------------------------------------ loaders
    def _progress(self) -> tuple[int, int, int]:
        """(epoch, batches processed in it, world size), as Lightning counts them."""
        loop = self.trainer.fit_loop
        processed = loop.epoch_loop.batch_progress.current.processed
        return loop.epoch_progress.current.processed, processed, self.trainer.world_size

    def _train_sampler(self) -> EpochSampler:
        assert self.train_set is not None, "call setup() first"
        if self.balanced_batches:
            return LabelBalancedSampler(self.train_set.labels, self.batch_size, seed=self.seed)
        if self.group_by_length:
            return LengthGroupedSampler(self.train_set.lengths, self.batch_size, seed=self.seed)
        return EpochShuffleSampler(len(self.train_set), seed=self.seed)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "call setup() first"
        return ResumableDataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=self._train_sampler(),
            collate_fn=self.collator,
            num_workers=self.num_workers,
            drop_last=len(self.train_set) > self.batch_size,
            progress=self._progress if self.trainer is not None else None,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        # Our own shards: Lightning's DistributedSampler would pad the rows to a multiple of the
        # world size and score up to world - 1 of them twice.
        sampler = ShardedEvalBatches(len(self.val_set), self.eval_batch_size, world, rank)
        return DataLoader(
            _Batches(self.val_set),
            batch_size=None,  # the sampler yields whole batches
            sampler=sampler,
            collate_fn=self.collator,
            num_workers=self.num_workers,
        )
