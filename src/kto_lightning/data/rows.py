"""Reading rows and normalising them to `{prompt, completion, label}`.

Every problem is reported with the file, the line and the column to fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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


def normalise_record(
    record: dict, where: str, prompt_column: str, completion_column: str, label_column: str
) -> Row:
    """One raw record -> Row, with an error naming `where` (file and row) and the column."""
    missing = [c for c in (prompt_column, completion_column, label_column) if c not in record]
    if missing:
        raise DataError(
            f"{where}: missing column {missing[0]!r}; the row has columns {sorted(record)}. "
            "Set data.prompt_column / data.completion_column / data.label_column to match."
        )
    texts = {}
    for column in (prompt_column, completion_column):
        value = record[column]
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"{where}: column {column!r} is empty or not text ({value!r})")
        texts[column] = value
    label = parse_label(record[label_column], f"{where}, column {label_column!r}")
    return Row(texts[prompt_column], texts[completion_column], label)


def read_jsonl(
    path: str | Path,
    prompt_column: str = "prompt",
    completion_column: str = "completion",
    label_column: str = "label",
) -> list[Row]:
    """Rows of a JSON-lines file; blank lines are skipped, line numbers start at 1."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    rows = []
    try:
        # Split on "\n" only: JSON Lines separates records by newlines, and str.splitlines would
        # also break at U+2028, U+0085 and others, which json.dumps(ensure_ascii=False) leaves
        # unescaped inside strings. "utf-8-sig" drops a byte-order mark some editors write.
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text ({error})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}, line {number}: malformed JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, got {record!r}")
        where = f"{path}, line {number}"
        rows.append(normalise_record(record, where, prompt_column, completion_column, label_column))
    if not rows:
        raise DataError(f"{path}: the file holds no rows")
    return rows
