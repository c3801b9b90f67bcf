"""A text row `{prompt, completion, label}`, the reading of labels, and whole columns."""

from __future__ import annotations

from dataclasses import dataclass

import datasets
import pyarrow as pa

from kto_lightning.errors import DataError

_TRUE = {"true", "1", "+1", "yes", "desirable"}
_FALSE = {"false", "0", "-1", "no", "undesirable"}


@dataclass(frozen=True)
class Row:
    prompt: str
    completion: str
    label: bool


def parse_label(value: object, where: str) -> bool:
    """Accept bool, 0/1, +1/-1 and their string forms; anything else names `where` and the value."""
    if value is None:
        raise DataError(f"{where}: the label is missing or null (None)")
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1, -1):
        return value == 1
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise DataError(
        f"{where}: cannot read {value!r} as a label; use true/false, 1/0 or +1/-1 "
        "(1 or true = desirable)"
    )


def arrow_column(rows: datasets.Dataset, name: str) -> pa.ChunkedArray:
    """Column `name` of `rows` (a selection of rows included) as Arrow, with no Python object
    per row: iterating `rows[name]` builds one for each."""
    return rows.select_columns([name]).with_format("arrow")[:][name]
