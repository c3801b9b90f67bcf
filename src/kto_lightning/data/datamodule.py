"""KTODataModule: rows of any supported source and shape -> tokenized examples -> batches.

Mid-epoch resume. The training loader is torchdata's StatefulDataLoader over a RankShard of the
epoch's order, whose state (the epoch, and the samples drawn by all ranks together) it keeps as of
the last batch it yielded. Lightning saves that state with its fit loop and restores it into a
loader it builds after the restore. One case escapes it: `configure_optimizers` asks for
`trainer.estimated_stepping_batches` (the LR schedule's length), which builds the train loader and
makes its iterator *before* the checkpoint is restored, and Lightning then never applies the saved
state (Lightning issue #20550). So the data module also carries the position, through Lightning's
public `state_dict` / `load_state_dict` hooks, and hands it to the RankShard: when it builds the
loader (single device and DDP restore before that), or to the loader already built (FSDP and
DeepSpeed restore after setup), whose RankShard draws nothing before the first batch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import datasets
import lightning as L
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from kto_lightning.core.packing import pack_budget
from kto_lightning.data.collate import KTOCollator
from kto_lightning.data.config import (
    GPU_PAD_MULTIPLE,
    Batching,
    Columns,
    Lengths,
    Source,
    as_group,
)
from kto_lightning.data.dataset import BatchesOf, KTODataset
from kto_lightning.data.kept_rows import (
    check_splits,
    keep_and_pair,
)
from kto_lightning.data.preparing import preparing
from kto_lightning.data.sampler import (
    EpochSampler,
    EpochShuffleSampler,
    LabelBalancedSampler,
    LengthGroupedSampler,
)
from kto_lightning.data.sharding import (
    RankShard,
    ResumableTrainOrder,
    ShardedEvalBatches,
)
from kto_lightning.data.splits import ReadSplit, read_splits
from kto_lightning.data.summary import SplitSummary, format_summary
from kto_lightning.data.tokenize import tokenize_dataset
from kto_lightning.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Names other modules import from here.
__all__ = [
    "KTODataModule",
]


def _tokenization_note(cached: bool, in_memory: bool) -> str:
    if in_memory:
        return "in memory"  # rows made in this process (the toy task) have no cache to reuse
    return "cached" if cached else "computed"


class KTODataModule(ResumableTrainOrder, L.LightningDataModule):
    """Binary-feedback data for KTO, from a local file, a hub dataset or the bundled toy task.

    Each settings group is its dataclass (kto_lightning.data.config) or a mapping of its keys,
    as Hydra passes it; conf/data/local.yaml documents every key.

    Args:
        tokenizer: the policy's tokenizer (passed by the entry point, not from YAML).
        source: where the rows come from: path, splits, validation rows, cache (`Source`).
        columns: the rows' shape and which columns hold what (`Columns`).
        lengths: the token budgets of prompt and completion (`Lengths`).
        batching: batch sizes, the training sampler and loader workers (`Batching`).
        seed: the seed of the validation split, of the pairing and of the shuffle.
        needs_kl_rows: build KL rows (needed by the `mismatched` reference point only).
        drop_undesirable: keep the desirable rows alone (SFT trains on them); the summary
            counts the rows dropped.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        source: Source | Mapping[str, Any] | None = None,
        columns: Columns | Mapping[str, Any] | None = None,
        lengths: Lengths | Mapping[str, Any] | None = None,
        batching: Batching | Mapping[str, Any] | None = None,
        seed: int = 42,
        needs_kl_rows: bool = True,
        drop_undesirable: bool = False,
    ) -> None:
        super().__init__()
        self.source = as_group(Source, source, "source")
        self.columns = as_group(Columns, columns, "columns")
        self.lengths = as_group(Lengths, lengths, "lengths")
        self.batching = as_group(Batching, batching, "batching")
        self.tokenizer = tokenizer
        self.seed = seed
        self.drop_undesirable = drop_undesirable
        if drop_undesirable and self.batching.balanced_batches:
            raise ConfigError(
                "data.batching.balanced_batches puts both labels in every batch, but this run "
                "trains on the desirable rows alone (loss=sft); set "
                "data.batching.balanced_batches=false"
            )
        self.collator = KTOCollator(
            tokenizer.pad_token_id,
            needs_kl_rows=needs_kl_rows,
            pad_to_multiple_of=self.batching.pad_to_multiple_of or 1,
            max_length=self.lengths.max_length,
        )
        self.train_set: KTODataset | None = None
        self.val_set: KTODataset | None = None
        self.summaries: dict[str, SplitSummary] = {}
        self.longest_row = 0  # of the training and validation rows, once set up
        self._train_loader: StatefulDataLoader | None = None
        self._train_shard: RankShard | None = None
        self._restored_position: dict[str, int] | None = None

    # ------------------------------------------------------------------ preparing
    def _tokenize(self, read: ReadSplit) -> tuple[datasets.Dataset, str]:
        """One split's rows tokenized, and how (computed, cached, in memory)."""
        chat, name = read.conversational, read.name
        if chat:
            if self.columns.chat_template is not None:
                self.tokenizer.chat_template = self.columns.chat_template
            if not getattr(self.tokenizer, "chat_template", None):
                raise DataError(
                    f"{name} holds conversations, but the tokenizer "
                    f"({self.tokenizer.name_or_path or type(self.tokenizer).__name__}) has no chat "
                    "template; use a chat model's tokenizer or set data.columns.chat_template"
                )
        max_length, max_prompt_length = self.lengths.max_length, self.lengths.max_prompt_length
        tokenized, cached = tokenize_dataset(
            read.rows, self.tokenizer, chat, max_length, max_prompt_length, name,
            self.source.processes_for(len(read.rows)),
        )  # fmt: skip
        return tokenized, _tokenization_note(cached, in_memory=not read.rows.cache_files)

    def _keep(
        self, read: ReadSplit, tokenized: datasets.Dataset, note: str, seed: int
    ) -> tuple[KTODataset, SplitSummary]:
        return keep_and_pair(
            read, tokenized, note, seed, self.lengths, self.drop_undesirable,
            self.collator.needs_kl_rows,
        )  # fmt: skip

    def prepare_data(self) -> None:
        """Read, tokenize and pair the rows, into the datasets cache.

        Lightning calls it on one process per node before `setup` on every process; `setup`
        then reads the caches. Called in that process, it also leaves the data set up.
        """
        self.setup("fit")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        # One process prepares, under a lock on the cache: any other process (a DDP rank, a
        # sweep job of the same data) waits, then reads the caches that one wrote.
        with preparing(self.source):
            train, val = read_splits(self.source, self.columns, self.seed)
            tokenized = [self._tokenize(read) for read in (train, val)]
            # The text rows are read no more: let them go, and their memory map with them (a
            # million rows map ~1 GB of text, which counts in this process's RSS).
            train, val = train.without_rows(), val.without_rows()
            train_set, train_summary = self._keep(train, *tokenized[0], self.seed)
            val_set, val_summary = self._keep(val, *tokenized[1], self.seed + 1)
        lengths = self.lengths
        log.info(
            "%s",
            format_summary(
                [train_summary, val_summary], lengths.max_length, lengths.max_prompt_length
            ),
        )
        check_splits(train_summary, val_summary, self.batching, lengths, self.drop_undesirable)
        longest = max(max(s.lengths, default=0) for s in (train_set, val_set))
        if self.batching.packing:  # a pack budget below the longest row: said before step 1
            pack_budget(self.batching.max_tokens_per_pack, max(longest, 1))
        # Only now, after every check passed: a failed setup leaves nothing half-built behind.
        self.train_set, self.val_set = train_set, val_set
        self.longest_row = longest  # tokens, as a batch pads it (its KL row's when longer)
        self.summaries = {"train": train_summary, "validation": val_summary}

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
        if not self.batching.balanced_batches:
            return self.label_counts
        order = self._epoch_order()
        assert isinstance(order, LabelBalancedSampler)
        return order.label_counts()

    # ------------------------------------------------------------------ loaders
    def _epoch_order(self) -> EpochSampler:
        assert self.train_set is not None, "call setup() first"
        batch_size = self.batching.batch_size
        if self.batching.balanced_batches:
            return LabelBalancedSampler(self.train_set.labels, batch_size, seed=self.seed)
        if self.batching.group_by_length:
            return LengthGroupedSampler(self.train_set.lengths, batch_size, seed=self.seed)
        return EpochShuffleSampler(len(self.train_set), seed=self.seed)

    def _pad_for_the_device(self) -> None:
        """An unset `data.batching.pad_to_multiple_of`: GPU_PAD_MULTIPLE when the trainer runs on
        a GPU, 1 elsewhere (see `Batching`)."""
        if self.batching.pad_to_multiple_of is not None:
            return
        trainer = self.trainer
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        self.collator.pad_to_multiple_of = GPU_PAD_MULTIPLE if on_gpu else 1

    def train_dataloader(self) -> StatefulDataLoader:
        assert self.train_set is not None, "call setup() first"
        self._pad_for_the_device()
        batch_size = self.batching.batch_size
        return self.resumable_loader(
            self.train_set,
            self._epoch_order(),
            batch_size,
            self.collator,
            self.batching.num_workers,
            drop_last=len(self.train_set) > batch_size,
        )

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None, "call setup() first"
        self._pad_for_the_device()
        # Our own shards: Lightning's DistributedSampler would pad the rows to a multiple of the
        # world size and score up to world - 1 of them twice.
        sampler = ShardedEvalBatches(
            len(self.val_set), self.batching.validation_batch_size, *self._ranks()
        )
        return DataLoader(
            BatchesOf(self.val_set),
            batch_size=None,  # the sampler yields whole batches
            sampler=sampler,
            collate_fn=self.collator,
            num_workers=self.batching.num_workers,
        )
