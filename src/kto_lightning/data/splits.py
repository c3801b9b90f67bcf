"""A run's rows, read and normalised, as a training and a validation split (before tokenization).

Validation rows come from `data.source.val_path` or `data.source.val_split`; with neither, a
seeded `data.source.val_fraction` of the source rows is held out of the training rows. Test rows
(`data.source.test_path`, `data.source.test_split`) are read by `kto_lightning.evaluate` alone.
Each of the three paths may also be rows in memory (the Python API): they then take the same
road as a file's rows from `normalise` on, and messages name them by their key.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeAlias

import datasets
import numpy as np

from kto_lightning.data.config import TOY, Columns, InMemoryRows, Source
from kto_lightning.data.formats import DROPPED_SAME_PAIR, dropped_rows, normalise
from kto_lightning.data.rows import arrow_column
from kto_lightning.data.sources import is_in_memory, load_memory, load_source
from kto_lightning.data.toy import CONSISTENCY, consistency_rows, toy_rows
from kto_lightning.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReadSplit:
    """One split's rows as `{prompt, completion, label, row}` (see formats.normalise)."""

    rows: datasets.Dataset
    format: str  # the shape its source was read as
    conversational: bool
    split: str  # "train" or "validation"
    name: str  # where the rows came from, as messages name it
    rows_read: int  # source rows it holds (a pair is one)
    # Source rows read but dropped, by reason (formats.DROPPED_SAME_PAIR): for the data summary.
    dropped: dict[str, int] = field(default_factory=dict)

    def without_rows(self) -> ReadSplit:
        """This split's description with no rows: its rows, once tokenized, can be let go."""
        return replace(self, rows=datasets.Dataset.from_dict({}))


# What a data.source path key holds: a name (a file, a hub dataset, a bundled task) or rows.
DataPath: TypeAlias = str | InMemoryRows


def _name(path: DataPath, split: str, key: str = "path") -> str:
    if is_in_memory(path):  # no name of its own: the key it was given as
        return f"rows in memory (data.source.{key})"
    assert isinstance(path, str)
    return path if path == TOY or split == "train" else f"{path}[{split}]"


def _or_path(value: DataPath | None, path: DataPath) -> DataPath:
    """`value`, or `path` when it is None (not `or`: an empty list or dataset is not None)."""
    return path if value is None else value


def _same_data(path: DataPath, other: DataPath) -> bool:
    """Whether two `data.source` paths name the same data: the same file, the same name, or the
    same rows in memory (the same object)."""
    if is_in_memory(path) or is_in_memory(other):
        return path is other
    assert isinstance(path, str) and isinstance(other, str)
    if path == other:
        return True
    first, second = Path(path).expanduser(), Path(other).expanduser()
    return first.exists() and second.exists() and first.resolve() == second.resolve()


def _shown(path: DataPath) -> str:
    """A path for a message: its repr, or what rows in memory are (their repr could be huge)."""
    return f"<{len(path)} rows in memory>" if is_in_memory(path) else repr(path)


def refuse_training_rows_as_validation(source: Source) -> None:
    """ConfigError when the named validation data is the training data itself: validation would
    score the rows it trains on, and its metrics would say nothing of unseen rows."""
    if source.holds_out or source.val_split not in (None, source.split):
        return
    if source.val_path is None or _same_data(source.val_path, source.path):
        keys = (
            f"data.source.val_path={_shown(source.val_path)} is "
            f"data.source.path={_shown(source.path)}"
            if source.val_path is not None
            else f"data.source.val_split={source.val_split!r} is data.source.split"
        )
        raise ConfigError(
            f"{keys} (split {source.split!r}): validation would score the very rows training "
            "learns from. Name other rows (another file, or data.source.val_split), or remove "
            f"data.source.val_path and data.source.val_split to hold out "
            f"data.source.val_fraction={source.val_fraction} of the rows"
        )


def validation_data(source: Source) -> tuple[DataPath, str, str]:
    """(path, split, the data.source key naming the path) of the validation rows `source` names;
    only when it names them (not `source.holds_out`)."""
    key = "path" if source.val_path is None else "val_path"
    return _or_path(source.val_path, source.path), source.val_split or source.split, key


def read_source(
    source: Source, path: DataPath, split: str, seed: int, key: str = "path"
) -> tuple[datasets.Dataset, str]:
    """One source's rows as read, before any normalising, and its name for messages.

    `path` is a bundled task, rows in memory, a local file or a hub dataset; `key` is the
    data.source key that names it.
    """
    name = _name(path, split, key)
    if is_in_memory(path):
        return load_memory(path, name), name  # type: ignore[arg-type]
    if path == TOY:
        return datasets.Dataset.from_list(toy_rows(source.toy_rows, seed=seed)), name
    if path == CONSISTENCY:  # its validation split: an eighth as many rows, unseen objects
        n_rows = source.toy_rows if split == source.split else max(16, source.toy_rows // 8)
        return datasets.Dataset.from_list(consistency_rows(n_rows, split, seed=seed)), name
    assert isinstance(path, str)
    raw = load_source(path, source.subset, split, source.revision, source.cache_dir)
    return raw, name


def _read(
    source: Source, columns: Columns, path: DataPath, split: str, seed: int, key: str = "path"
) -> tuple[datasets.Dataset, str, bool, int, np.ndarray]:
    """Load and normalise one source (`key`: the data.source key that names it); returns (rows,
    format, conversational, rows read, the indices of the source rows dropped)."""
    raw, name = read_source(source, path, split, seed, key)
    num_proc = source.processes_for(len(raw))
    rows, fmt, chat = normalise(raw, columns, name, seed, num_proc)
    return rows, fmt, chat, len(raw), dropped_rows(rows, len(raw))


def _dropped(count: int) -> dict[str, int]:
    return {DROPPED_SAME_PAIR: count} if count else {}


def held_out_rows(n_source: int, fraction: float, seed: int, name: str) -> np.ndarray:
    """Which of `n_source` source rows are held out for validation (a mask): a seeded share.

    Raises:
        DataError: naming `name`, when too few rows would be left to train on.
    """
    order = list(range(n_source))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(n_source * fraction))
    if n_source - n_val < 2:
        raise DataError(
            f"{name}: {n_source} rows are too few to hold out "
            f"data.source.val_fraction={fraction} for validation and keep 2 to train on; add "
            "rows, or name validation data with data.source.val_path (a file) or "
            "data.source.val_split (a split of the same source)"
        )
    held_out = np.zeros(n_source, dtype=bool)
    held_out[order[:n_val]] = True
    return held_out


def _hold_out(
    rows: datasets.Dataset, n_source: int, fraction: float, seed: int, name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training and validation row indices, and which source rows are held out (a mask).

    A seeded share of the *source* rows is held out (`held_out_rows`).

    The split is made over source rows, after they were read and checked, so error messages
    name rows as they stand in the file and both rows of a pair land on the same side.
    """
    held_out = held_out_rows(n_source, fraction, seed, name)
    in_val = held_out[arrow_column(rows, "row").to_numpy()]
    # Arrays, not lists: `select` fingerprints its indices, and hashes an array's bytes at once.
    return np.flatnonzero(~in_val), np.flatnonzero(in_val), held_out


def read_splits(source: Source, columns: Columns, seed: int) -> tuple[ReadSplit, ReadSplit]:
    """(training, validation) rows of `source`, read with `columns`; `seed` seeds the hold-out."""
    refuse_training_rows_as_validation(source)
    train_name = _name(source.path, source.split)
    rows, fmt, chat, n_read, dropped = _read(source, columns, source.path, source.split, seed)
    if not source.holds_out:
        val_path, val_split, val_key = validation_data(source)
        val_rows, val_fmt, val_chat, n_val_read, val_dropped = _read(
            source, columns, val_path, val_split, seed, val_key
        )
        return (
            ReadSplit(rows, fmt, chat, "train", train_name, n_read, _dropped(len(dropped))),
            ReadSplit(val_rows, val_fmt, val_chat, "validation",
                      _name(val_path, val_split, val_key), n_val_read,
                      _dropped(len(val_dropped))),
        )  # fmt: skip
    train_idx, val_idx, held_out = _hold_out(rows, n_read, source.val_fraction, seed, train_name)
    n_val_read, n_val_dropped = int(held_out.sum()), int(held_out[dropped].sum())
    return (
        ReadSplit(rows.select(train_idx), fmt, chat, "train", train_name, n_read - n_val_read,
                  _dropped(len(dropped) - n_val_dropped)),
        ReadSplit(rows.select(val_idx), fmt, chat, "validation", f"{train_name} (held out)",
                  n_val_read, _dropped(n_val_dropped)),
    )  # fmt: skip


def read_evaluation_split(source: Source, columns: Columns, seed: int) -> ReadSplit:
    """The rows `kto_lightning.evaluate` scores: the test rows when `source` names them
    (`test_path`, `test_split`), else the validation rows exactly as `read_splits` gives them.

    Named test or validation data is read alone; held-out validation rows need the training rows
    read too, to hold out the same seeded share.
    """
    if source.names_test:
        role, key = "test", "path" if source.test_path is None else "test_path"
        path, split = _or_path(source.test_path, source.path), source.test_split or source.split
    elif not source.holds_out:
        role = "validation"
        path, split, key = validation_data(source)
    else:
        return read_splits(source, columns, seed)[1]
    rows, fmt, chat, n_read, dropped = _read(source, columns, path, split, seed, key)
    name = _name(path, split, key)
    return ReadSplit(rows, fmt, chat, role, name, n_read, _dropped(len(dropped)))
