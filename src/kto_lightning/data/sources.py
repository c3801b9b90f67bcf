"""Loading raw rows: local files (jsonl, json, parquet, csv), a hub dataset, or rows in memory (a
`datasets.Dataset` or a list of dicts, from the Python API), through `datasets`.

`datasets` reads files fast but reports bad ones vaguely (a malformed JSON line is blamed on the
wrong row, bytes that are not UTF-8 pass silently, an empty file raises StopIteration). So text
files are checked for encoding and emptiness first, and a failed JSON load is diagnosed line by
line to name the line to fix.
"""

from __future__ import annotations

import codecs
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from kto_lightning.common.hub import looks_local, unavailable_reason
from kto_lightning.errors import DataError

log = logging.getLogger(__name__)

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
TEXT_BUILDERS = {"json", "csv"}


def _is_local(source: str) -> bool:
    return Path(source).suffix.lower() in BUILDERS or looks_local(source) or Path(source).exists()


# The first bytes of files that are not text at all: a message about UTF-8 would point the user
# at the wrong fix (saving as UTF-8), so such a file is named for what it is.
MAGIC = {
    b"\x1f\x8b": ("gzip-compressed file", "decompress it (gunzip -c {path} > {plain})"),
    b"PK\x03\x04": ("zip archive", "unzip it and name the data file in it"),
    b"BZh": ("bzip2-compressed file", "decompress it (bunzip2 -c {path} > {plain})"),
    b"\xfd7zXZ\x00": ("xz-compressed file", "decompress it (xz -dc {path} > {plain})"),
    b"\x28\xb5\x2f\xfd": ("zstd-compressed file", "decompress it (zstd -dc {path} -o {plain})"),
    b"PAR1": ("Parquet file", "rename it to {parquet}"),
}


def _check_not_binary(path: Path) -> None:
    """DataError when a .jsonl/.json/.csv file is compressed or Parquet, saying how to fix it."""
    with path.open("rb") as handle:
        head = handle.read(8)
    for magic, (what, fix) in MAGIC.items():
        if head.startswith(magic):
            plain = path.with_name(f"{path.stem}.plain{path.suffix}")
            todo = fix.format(path=path, plain=plain, parquet=path.with_suffix(".parquet"))
            raise DataError(f"{path}: a {what}, not {path.suffix} text; {todo}")


def _check_text_file(path: Path) -> None:
    """Raise naming the line of the first byte that is not UTF-8, or an empty file."""
    _check_not_binary(path)
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, seen_text = 1, False
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as error:
                line += chunk[: error.start].count(b"\n")
                raise DataError(
                    f"{path}, line {line}: bytes that are not UTF-8 text "
                    f"({chunk[error.start : error.start + 4]!r}); save the file as UTF-8"
                ) from None
            line += text.count("\n")
            seen_text = seen_text or bool(text.strip())
    if not seen_text:
        raise DataError(f"{path}: the file is empty")


def _diagnose_json(path: Path) -> str | None:
    """Where a JSON-lines file, or a file holding one JSON array, stops being JSON objects."""
    with path.open(encoding="utf-8-sig") as handle:
        is_array = handle.read(4096).lstrip().startswith("[")
    if is_array:  # one document over many lines: a line-by-line reading would blame line 1
        try:
            records = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as error:
            return (
                f"{path}, line {error.lineno}: malformed JSON ({error.msg}, column {error.colno})"
            )
        for number, record in enumerate(records, start=1):
            if not isinstance(record, dict):
                return (
                    f"{path}, item {number} of the JSON array: expected a JSON object, "
                    f"got {json.dumps(record)[:60]}"
                )
        return None if records else f"{path}: the file holds no rows"
    with path.open(encoding="utf-8-sig", newline="") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                return f"{path}, line {number}: malformed JSON ({error.msg}, column {error.colno})"
            if not isinstance(record, dict):
                return f"{path}, line {number}: expected a JSON object, got {line.strip()[:60]}"
    return None


def _holds_no_rows(path: Path, builder: str) -> bool:
    """A csv of only a header, or a parquet file of only a schema (datasets fails obscurely)."""
    try:
        if builder == "parquet":
            return pq.read_metadata(path).num_rows == 0
        if builder == "csv":
            with path.open(encoding="utf-8-sig") as handle:
                return sum(1 for line in handle if line.strip()) <= 1
    except Exception:  # unreadable in another way: the caller reports datasets' own error
        return False
    return False


def load_local(path: str | Path, cache_dir: str | None = None) -> datasets.Dataset:
    """Rows of a local jsonl, json, parquet or csv file."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p.name for p in path.iterdir() if p.suffix.lower() in BUILDERS)[:3]
        raise DataError(
            f"{path} is a folder; name one data file ({', '.join(sorted(BUILDERS))}) in it"
            + (f", e.g. {path / files[0]}" if files else "")
        )
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(BUILDERS)}"
        )
    if builder in TEXT_BUILDERS:
        _check_text_file(path)
    try:
        dataset = datasets.load_dataset(
            builder, data_files=str(path.resolve()), split="train", cache_dir=cache_dir
        )
    except Exception as error:
        detail = _diagnose_json(path) if builder == "json" else None
        if detail is None and _holds_no_rows(path, builder):
            detail = f"{path}: the file holds no rows"
        if detail is None:
            cause = error.__cause__ or error
            detail = f"{path}: cannot be read as {builder} ({type(cause).__name__}: {cause})"
        raise DataError(detail) from None
    if len(dataset) == 0:
        raise DataError(f"{path}: the file holds no rows")
    return dataset


def is_in_memory(value: object) -> bool:
    """Whether a `data.source` path is rows in memory (a `datasets.Dataset`, or a list or tuple
    of dicts) rather than a file, a hub dataset or a bundled task's name."""
    return isinstance(value, datasets.Dataset | list | tuple)


def _first_of_another_type(values: list[Any]) -> int | None:
    """The index of the first value whose type is not the first value's (None, and int beside
    float, mix freely, as in Arrow), or None."""
    first: type | None = None
    for index, value in enumerate(values):
        if value is None:
            continue
        kind = float if type(value) is int else type(value)
        if first is None:
            first = kind
        elif kind is not first:
            return index
    return None


def load_memory(
    rows: datasets.Dataset | Sequence[Mapping[str, Any]], name: str
) -> datasets.Dataset:
    """Rows given in memory, as the `datasets.Dataset` a file of the same rows reads as.

    A list of dicts is read as a JSON-lines file of them would be: its columns are every key of
    any row (in order of first appearance), a key a row lacks is null in it. (`Dataset.from_list`
    would take the first row's keys alone and drop the others' without a word.)

    Raises:
        DataError: naming `name` and the item, when there are no rows or an item is not a dict,
            or a column's values do not share one type.
    """
    if isinstance(rows, datasets.Dataset):
        if len(rows) == 0:
            raise DataError(f"{name}: the dataset holds no rows")
        return rows
    if len(rows) == 0:
        raise DataError(f"{name}: the list holds no rows")
    keys: dict[str, None] = {}
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, Mapping):
            raise DataError(
                f"{name}, item {number}: expected a dict (one row), got {type(row).__name__} "
                f"{str(row)[:60]}"
            )
        keys.update(dict.fromkeys(row))
    columns = {key: [row.get(key) for row in rows] for key in keys}
    try:
        return datasets.Dataset.from_dict(columns)
    except Exception as error:  # pyarrow: values of one column of different types
        for key, values in columns.items():
            odd = _first_of_another_type(values)
            if odd is not None:
                first = next(type(value) for value in values if value is not None)
                raise DataError(
                    f"{name}, row {odd + 1}: column {key!r} holds {type(values[odd]).__name__} "
                    f"{str(values[odd])[:60]!r} where the rows before hold {first.__name__}; "
                    "give the column one type in every row"
                ) from None
        raise DataError(
            f"{name}: cannot be read as rows ({type(error).__name__}: {error})"
        ) from None


def load_hub(
    name: str,
    subset: str | None,
    split: str,
    revision: str | None,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """One split of a hub dataset; a clear error when it is neither cached nor reachable."""
    reason = unavailable_reason()
    was_offline = datasets.config.HF_HUB_OFFLINE
    # Unreachable: let datasets go straight to its cache instead of retrying the network.
    datasets.config.HF_HUB_OFFLINE = was_offline or reason is not None
    try:
        dataset = datasets.load_dataset(
            name, subset, split=split, revision=revision, cache_dir=cache_dir
        )
    except Exception as error:
        if reason is not None:
            raise DataError(
                f"data.source.path={name!r} is not a local file, it is not in the datasets cache, "
                f"and {reason}. Download it where there is network and copy the cache "
                "(HF_HOME or HF_DATASETS_CACHE), or export it to a local file "
                "(`datasets.load_dataset(...).to_json('rows.jsonl')`) and set data.source.path "
                "to it."
            ) from None
        raise DataError(
            f"data.source.path={name!r} (subset {subset!r}, split {split!r}) could not be loaded: "
            f"{error}"
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = was_offline
    if len(dataset) == 0:
        raise DataError(f"data.source.path={name!r}, split {split!r}: no rows")
    return dataset


def load_source(
    source: str,
    subset: str | None = None,
    split: str = "train",
    revision: str | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """A local file when `source` names one (or looks like a path), else a hub dataset."""
    if _is_local(source):
        return load_local(source, cache_dir)
    return load_hub(source, subset, split, revision, cache_dir)
