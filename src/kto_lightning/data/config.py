"""The data module's settings, in four groups: `data.source`, `data.columns`, `data.lengths`,
`data.batching` (conf/data/local.yaml documents every key).

The defaults here and conf/data/local.yaml's values are one set, kept equal by
tests/unit/test_config_defaults.py: the YAML is what command-line users read and override, these
are what `KTODataModule(tokenizer)` takes from Python. The one difference is deliberate:
`source.path` is `toy` here (the bundled task, so a data module builds with no file) and `???` in
local.yaml (a local run must name its file).

Each group is a frozen dataclass that checks itself on construction and names the full key of a
bad value (`data.lengths.max_length`). KTODataModule takes each group as the dataclass or as the
mapping Hydra gives (`as_group` converts it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeAlias, TypeVar

import datasets
from omegaconf import DictConfig, OmegaConf

from kto_lightning.core.packing import Packing
from kto_lightning.errors import ConfigError

TOY = "toy"
FORMATS = ("auto", "unpaired", "paired", "score")
# Rows from which an unset `data.source.num_proc` runs datasets.map in one process per CPU.
AUTO_NUM_PROC_ROWS = 20_000
# An unset data.batching.pad_to_multiple_of on a GPU: 16 lengths up to 1024 tokens.
GPU_PAD_MULTIPLE = 64
# data.source.lock_timeout's default, in seconds: two hours. The lock's holder reads, tokenizes
# and pairs the rows (a download of a hub dataset too) while the others wait: at the speeds of
# benchmarks/RESULTS.md ("Data preparation") even tens of millions of rows stay well inside it,
# while a holder that is stopped or hung is reported within a working session, not never.
LOCK_TIMEOUT = 7200.0

# Rows given in memory in place of a file (the Python API): a `datasets.Dataset`, or a list of
# dicts of any shape a file may hold (kto_lightning.data.formats). A config file cannot hold them.
InMemoryRows: TypeAlias = datasets.Dataset | Sequence[Mapping[str, Any]]


def _check_path(key: str, value: object, optional: bool) -> None:
    """ConfigError unless `value` is a name (a string), rows in memory, or None where allowed."""
    if value is None and optional:
        return
    if not isinstance(value, str | datasets.Dataset | list | tuple):
        raise ConfigError(
            f"data.source.{key} must be a file path, a hub dataset name, a bundled task's name, "
            f"or rows in memory (a datasets.Dataset or a list of dicts), got {value!r}"
        )


@dataclass(frozen=True)
class Source:
    """Where the rows come from (`data.source`).

    Args:
        path: "toy" or "toy_consistency" (bundled tasks, see data/toy.py), a local
            .jsonl/.json/.parquet/.csv file, a hub dataset name, or, from Python, the rows in
            memory: a `datasets.Dataset` or a list of dicts, read as a file of the same rows.
        subset: the hub dataset's configuration (subset) name.
        split: the split of `path` to train on.
        revision: the hub dataset's branch, tag or commit.
        val_path: a file, hub dataset or rows in memory for validation; None uses `path`.
        val_split: the split for validation; None (with no `val_path`) holds out `val_fraction`
            of the training rows, seeded.
        val_fraction: share of rows held out for validation when no validation data is named.
        test_path: a file, hub dataset or rows in memory for evaluation; None uses `path`.
        test_split: the split `kto_lightning.evaluate` scores; with neither test key set, it
            scores the validation rows. Training never reads the test rows.
        toy_rows: how many rows a bundled task generates for training (toy_consistency's
            validation split: an eighth as many).
        cache_dir: the datasets cache folder; None is HF_DATASETS_CACHE.
        num_proc: processes for reading and tokenizing (datasets.map); None: one per CPU (at
            most 8) for 20,000 rows or more, one below (`processes_for`).
        lock_timeout: seconds to wait for another process preparing the same rows (a DDP rank,
            a sweep job) before giving up with the lock file and its holder's process id; None
            waits for ever, 0 gives up at once.
    """

    path: str | InMemoryRows = TOY
    subset: str | None = None
    split: str = "train"
    revision: str | None = None
    val_path: str | InMemoryRows | None = None
    val_split: str | None = None
    val_fraction: float = 0.05
    test_path: str | InMemoryRows | None = None
    test_split: str | None = None
    toy_rows: int = 1200
    cache_dir: str | None = None
    num_proc: int | None = None
    lock_timeout: float | None = LOCK_TIMEOUT

    def __post_init__(self) -> None:
        _check_path("path", self.path, optional=False)
        _check_path("val_path", self.val_path, optional=True)
        _check_path("test_path", self.test_path, optional=True)
        if self.holds_out and not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(
                f"data.source.val_fraction must be in (0, 1), got {self.val_fraction}"
            )
        if self.lock_timeout is not None and not self.lock_timeout >= 0:  # NaN fails too
            raise ConfigError(
                "data.source.lock_timeout must be >= 0 seconds, or null to wait for ever, got "
                f"{self.lock_timeout}"
            )

    def processes_for(self, rows: int) -> int | None:
        """`num_proc` for a datasets.map over `rows` rows.

        Unset, one process per CPU for 20,000 rows or more: the tokenizer's own threads already
        use every CPU, but the Python around it (rows in and out, the Arrow writes) runs in one
        (benchmarks/RESULTS.md, "Data preparation").
        Below that, starting the processes costs more than it saves.
        """
        if self.num_proc is not None or rows < AUTO_NUM_PROC_ROWS:
            return self.num_proc
        affinity = getattr(os, "sched_getaffinity", None)
        cpus = len(affinity(0)) if affinity is not None else os.cpu_count() or 1
        return min(cpus, 8) if cpus > 1 else None

    @property
    def holds_out(self) -> bool:
        """Validation rows are held out of the training rows (no validation data is named)."""
        return self.val_path is None and self.val_split is None

    @property
    def names_test(self) -> bool:
        """Test rows are named (`test_path` or `test_split`): evaluation scores them."""
        return self.test_path is not None or self.test_split is not None


@dataclass(frozen=True)
class Columns:
    """The shape of the rows and which columns hold what (`data.columns`).

    Args:
        format: "auto", "unpaired", "paired" or "score" (see kto_lightning.data.formats).
        prompt, completion, label: columns of unpaired rows; `prompt` may be None for paired
            data whose prompt is the shared start of `chosen` and `rejected`, and `label` None
            for rows without labels, every one desirable (prompt/completion data for loss=sft).
        chosen, rejected: columns of paired rows.
        score, score_threshold: a numeric column, and the threshold from which a row is
            desirable (`format: score`).
        chat_template: a Jinja chat template replacing the tokenizer's own.
    """

    format: str = "auto"
    prompt: str | None = "prompt"
    completion: str = "completion"
    label: str | None = "label"
    chosen: str = "chosen"
    rejected: str = "rejected"
    score: str | None = None
    score_threshold: float | None = None
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(
                f"data.columns.format must be one of {list(FORMATS)}, got {self.format!r}"
            )
        if self.format == "score" and (self.score is None or self.score_threshold is None):
            raise ConfigError(
                "data.columns.format=score needs data.columns.score and "
                "data.columns.score_threshold"
            )
        if self.score is not None and self.score_threshold is None:
            raise ConfigError(
                f"data.columns.score={self.score!r} needs data.columns.score_threshold (rows "
                "scoring at least that are desirable)"
            )


def check_lengths(max_length: int, max_prompt_length: int) -> None:
    """Raise ConfigError unless a prompt of `max_prompt_length` leaves room for a completion."""
    if max_length < 2:
        raise ConfigError(f"data.lengths.max_length must be >= 2, got {max_length}")
    if not 1 <= max_prompt_length < max_length:
        raise ConfigError(
            "data.lengths.max_prompt_length must be >= 1 and below data.lengths.max_length "
            f"({max_length}), got {max_prompt_length}"
        )


@dataclass(frozen=True)
class Lengths:
    """Token budgets (`data.lengths`); kto_lightning.data.tokenize applies them.

    Args:
        max_length: prompt plus completion, in tokens.
        max_prompt_length: the prompt's share, in tokens (truncated from the left).
    """

    max_length: int = 512
    max_prompt_length: int = 256

    def __post_init__(self) -> None:
        check_lengths(self.max_length, self.max_prompt_length)


@dataclass(frozen=True)
class Batching:
    """How rows are grouped into batches (`data.batching`).

    Args:
        batch_size: rows per device per step (each row also brings its KL row).
        eval_batch_size: validation rows per device; None means `batch_size`.
        balanced_batches: every training batch holds both labels (LabelBalancedSampler).
        group_by_length: batch rows of similar length together to cut padding
            (LengthGroupedSampler); not together with `balanced_batches`.
        num_workers: DataLoader worker processes.
        packing: run the model over the rows' real tokens packed end to end, without padding
            (core/packing.py), for the policy, KL and live reference passes; the log-probs
            are the padded path's up to float rounding.
        max_tokens_per_pack: tokens per packed sequence; None packs up to the batch's longest
            row (a pack is then never longer than the padded rows, so attention per pack costs
            no more than per padded row). Only with `packing`.
        pad_to_multiple_of: batches are padded to their longest row rounded up to a multiple
            of this many tokens (never past `data.lengths.max_length`). None: GPU_PAD_MULTIPLE
            (64) when the trainer runs on a GPU, where each new batch length makes the
            attention kernels plan anew, and 1 on a CPU, where padding is only cost.
    """

    batch_size: int = 8
    eval_batch_size: int | None = None
    balanced_batches: bool = False
    group_by_length: bool = False
    num_workers: int = 0
    packing: bool = False
    max_tokens_per_pack: int | None = None
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"data.batching.batch_size must be >= 1, got {self.batch_size}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ConfigError(
                f"data.batching.eval_batch_size must be >= 1, got {self.eval_batch_size}"
            )
        if self.balanced_batches and self.group_by_length:
            raise ConfigError(
                "data.batching.balanced_batches and data.batching.group_by_length each choose "
                "the batches' rows; set at most one of them to true"
            )
        if self.num_workers < 0:
            raise ConfigError(f"data.batching.num_workers must be >= 0, got {self.num_workers}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ConfigError(
                "data.batching.pad_to_multiple_of must be >= 1 or null, got "
                f"{self.pad_to_multiple_of}"
            )
        if self.max_tokens_per_pack is not None and self.max_tokens_per_pack < 1:
            raise ConfigError(
                "data.batching.max_tokens_per_pack must be >= 1 or null, got "
                f"{self.max_tokens_per_pack}"
            )

    @property
    def validation_batch_size(self) -> int:
        return self.eval_batch_size or self.batch_size

    @property
    def packed(self) -> Packing | None:
        """How the model runs the batches: packed (a `Packing`), or padded (None)."""
        return Packing(self.max_tokens_per_pack) if self.packing else None


Group = TypeVar("Group", Source, Columns, Lengths, Batching)


def as_group(cls: type[Group], value: Group | Mapping[str, Any] | None, key: str) -> Group:
    """`value` (the dataclass, a dict, a DictConfig or None for the defaults) as a `cls`."""
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    if isinstance(value, DictConfig):
        # A key left at ??? raises MissingMandatoryValue, naming it (data.source.path).
        value = OmegaConf.to_container(value, resolve=True, throw_on_missing=True)  # type: ignore[assignment]
    names = [f.name for f in fields(cls)]
    if not isinstance(value, Mapping):
        raise ConfigError(f"data.{key} must be a mapping with the keys {names}, got {value!r}")
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ConfigError(f"data.{key}.{unknown[0]} is not a setting; data.{key} takes {names}")
    return cls(**value)
