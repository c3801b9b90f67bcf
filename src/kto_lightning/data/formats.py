"""Every supported shape of binary-feedback data, normalised to `{prompt, completion, label}`.

Shapes (`data.columns.format`, or `auto` to tell them from the columns):
- `unpaired`: a prompt, a completion and a label (bool, 0/1, +1/-1, "true"/"false"); with
  `data.columns.label: null`, no label column and every row desirable (SFT data; a `label` column
  that marks a row undesirable is then refused, not ignored);
- `score`: a prompt, a completion and a number; label = score >= `data.columns.score_threshold`;
- `paired`: `chosen` and `rejected` completions, with an explicit prompt column or an implicit
  shared prefix; each pair becomes one desirable and one undesirable row. A pair whose two
  completions are the same is dropped, with a warning and a count (`dropped_rows`).
Prompt and completion are either text or conversations (lists of `{role, content}` messages, to be
rendered by the tokenizer's chat template); one file holds one kind.
Every error names the source, the row (counted from 1) and the column.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import datasets
import numpy as np

from kto_lightning.data.config import Columns
from kto_lightning.data.rows import arrow_column, parse_label
from kto_lightning.errors import DataError

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
# The column `data.columns.label: null` must not find: labels the rows would be read without.
LABEL_COLUMN = Columns().label
# The summary's row for source rows dropped because both completions are the same.
DROPPED_SAME_PAIR = "chosen == rejected"


def resolve_format(columns: Columns, names: list[str], where: str) -> str:
    """The concrete format of a dataset whose columns are `names`."""
    required: dict[str, list[tuple[str, str | None]]] = {  # format -> [(config key, column)]
        "unpaired": [
            ("data.columns.prompt", columns.prompt),
            ("data.columns.completion", columns.completion),
            # No label column at all with `label: null`: every row is desirable.
            *([("data.columns.label", columns.label)] if columns.label is not None else []),
        ],
        "score": [
            ("data.columns.prompt", columns.prompt),
            ("data.columns.completion", columns.completion),
            ("data.columns.score", columns.score),
        ],
        "paired": [
            ("data.columns.chosen", columns.chosen),
            ("data.columns.rejected", columns.rejected),
        ],
    }
    if columns.format != "auto":
        for key, column in required[columns.format]:
            if column is None or column not in names:
                name = "(none: data.columns.prompt is null)" if column is None else repr(column)
                raise DataError(
                    f"{where}: missing column {name} for data.columns.format={columns.format}; "
                    f"the columns found are {sorted(names)}; set {key} to the column that holds it"
                    + (" (or to null: every row desirable)" if key == "data.columns.label" else "")
                )
        return columns.format
    for fmt in ("unpaired", "paired", "score"):
        needed = [column for _, column in required[fmt]]
        if None not in needed and all(c in names for c in needed):
            return fmt
    raise DataError(
        f"{where}: cannot tell the data's shape from its columns {sorted(names)}. Expected "
        f"{columns.prompt!r}/{columns.completion!r}/{columns.label!r} (unpaired), "
        f"{columns.chosen!r}/{columns.rejected!r} (paired), or a score column with "
        "data.columns.score and data.columns.score_threshold. Set the data.columns keys to your "
        "column names; for prompt/completion rows without labels (SFT data), "
        "data.columns.label=null reads every row as desirable."
    )


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    """Validate a conversation: a non-empty list of {role, content} with known roles."""
    if not value:
        raise DataError(f"{where}: empty conversation")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}, message {i}: expected {{role, content}}, got {message!r}")
        if message["role"] not in ROLES:
            raise DataError(
                f"{where}, message {i}: unknown role {message['role']!r}; roles are {list(ROLES)}"
            )
        if not isinstance(message["content"], str):
            raise DataError(f"{where}, message {i}: content is not text ({message['content']!r})")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _assistant_turns(messages: Any, where: str) -> Any:
    """`messages`, a completion, unless it holds a turn that is not the model's.

    The completion is what the model is trained to write (or not to write); a user or system
    turn inside it would be trained as model output. Such a row is refused, not masked: its
    earlier turns belong in the prompt.
    """
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            raise DataError(
                f"{where}, message {i}: a {message['role']!r} turn inside the completion; a "
                "completion holds assistant turns only (the model's output). Move the turns "
                "before the last assistant reply into the prompt"
            )
    return messages


def _text_or_chat(value: Any, chat: bool, where: str) -> str | list[dict[str, str]]:
    if chat:
        if not isinstance(value, list):
            raise DataError(f"{where}: expected a conversation (as in earlier rows), got {value!r}")
        return _messages(value, where)
    if isinstance(value, list):
        raise DataError(f"{where}: a conversation, but earlier rows hold plain text")
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: empty or not text ({value!r})")
    return value


def split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """(prompt, chosen completion, rejected completion) from two texts with a common start.

    The prompt ends before the word where the two differ, and the completions begin with the
    whitespace before that word, as a tokenizer expects a word to begin. None when one text is a
    prefix of the other (a completion would be empty).
    """
    shortest = min(len(chosen), len(rejected))
    cut = next((i for i in range(shortest) if chosen[i] != rejected[i]), shortest)
    if cut in (len(chosen), len(rejected)):
        return None
    while cut > 0 and not chosen[cut - 1].isspace():
        cut -= 1
    while cut > 0 and chosen[cut - 1].isspace():
        cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _pair_rows(columns: Columns, row: dict, chat: bool, where: str) -> list[tuple[Any, Any]] | None:
    """[(prompt, chosen completion), (prompt, rejected completion)] of one paired row; None when
    chosen and rejected are the same: one text cannot be both desirable and undesirable, and
    kept, it would be trained both ways (the caller drops it and counts it)."""
    chosen_where = f"{where}, column {columns.chosen!r}"
    chosen = _text_or_chat(row[columns.chosen], chat, chosen_where)
    rejected_where = f"{where}, column {columns.rejected!r}"
    rejected = _text_or_chat(row[columns.rejected], chat, rejected_where)
    if chosen == rejected:
        return None
    explicit = row.get(columns.prompt) if columns.prompt else None
    if chat:
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        prompt: Any = chosen[:shared]
        if not prompt and explicit is not None:
            prompt_where = f"{where}, column {columns.prompt!r}"
            prompt = (
                _messages(explicit, prompt_where)
                if isinstance(explicit, list)
                else [{"role": "user", "content": _text_or_chat(explicit, False, prompt_where)}]
            )
        completions = (chosen[shared:], rejected[shared:])
        if not prompt or not all(completions):
            raise DataError(
                f"{where}: chosen and rejected must share a prompt and differ after it "
                f"({shared} shared messages); set data.columns.prompt if the prompt is apart"
            )
        _assistant_turns(completions[0], chosen_where)
        _assistant_turns(completions[1], rejected_where)
        return [(prompt, completions[0]), (prompt, completions[1])]
    assert isinstance(chosen, str) and isinstance(rejected, str)  # text rows (not chat)
    if explicit is not None:
        prompt = _text_or_chat(explicit, False, f"{where}, column {columns.prompt!r}")
        # Some datasets repeat the prompt at the start of each completion.
        cut = len(prompt) if chosen.startswith(prompt) and rejected.startswith(prompt) else 0
        if not chosen[cut:].strip() or not rejected[cut:].strip():
            raise DataError(f"{where}: chosen or rejected holds nothing beyond the prompt")
        return [(prompt, chosen[cut:]), (prompt, rejected[cut:])]
    split = split_shared_prefix(chosen, rejected)
    if split is None or not split[0].strip():
        raise DataError(
            f"{where}: no shared prompt found at the start of chosen and rejected; "
            "set data.columns.prompt to the column that holds the prompt"
        )
    return [(split[0], split[1]), (split[0], split[2])]


def _row_normaliser(columns: Columns, fmt: str, chat: bool, name: str) -> Callable:
    def normalise(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"prompt": [], "completion": [], "label": [], "row": []}
        rows = [
            dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)
        ]
        for index, row in zip(indices, rows, strict=True):
            where = f"{name}, row {index + 1}"
            if fmt == "paired":
                pair = _pair_rows(columns, row, chat, where)
                if pair is None:  # chosen == rejected: dropped, counted by `dropped_rows`
                    continue
                (prompt, good), (_, bad) = pair
                out["prompt"] += [prompt, prompt]
                out["completion"] += [good, bad]
                out["label"] += [True, False]
                out["row"] += [index, index]
                continue
            out["row"].append(index)
            prompt_col, completion_col = columns.prompt, columns.completion
            assert prompt_col is not None, "resolve_format requires a prompt column here"
            out["prompt"].append(
                _text_or_chat(row[prompt_col], chat, f"{where}, column {prompt_col!r}")
            )
            completion_where = f"{where}, column {completion_col!r}"
            completion = _text_or_chat(row[completion_col], chat, completion_where)
            out["completion"].append(
                _assistant_turns(completion, completion_where) if chat else completion
            )
            if fmt == "score":
                out["label"].append(_score_label(columns, row, where))
            elif columns.label is None:  # no label column: every row is desirable
                _refuse_unread_label(row, where)
                out["label"].append(True)
            else:
                label_where = f"{where}, column {columns.label!r}"
                out["label"].append(parse_label(row[columns.label], label_where))
        return out

    return normalise


def _refuse_unread_label(row: dict, where: str) -> None:
    """DataError when `data.columns.label: null` would read an undesirable row as desirable.

    A file with a `label` column read with `label: null` would train every row as desirable,
    its undesirable ones included: refused at the first row the column marks otherwise (or
    cannot be read as a label). A column of desirable labels only changes nothing.
    """
    if LABEL_COLUMN not in row:
        return
    value = row[LABEL_COLUMN]
    try:
        desirable = parse_label(value, where)
    except DataError:
        desirable = False
    if not desirable:
        raise DataError(
            f"{where}, column {LABEL_COLUMN!r}: data.columns.label=null reads every row as "
            f"desirable, but this row's {LABEL_COLUMN!r} is {value!r}, so it would be trained "
            f"as desirable; set data.columns.label={LABEL_COLUMN} to read the labels, or remove "
            f"the {LABEL_COLUMN!r} column from the file to train on every row as desirable"
        )


def _score_label(columns: Columns, row: dict, where: str) -> bool:
    assert columns.score is not None and columns.score_threshold is not None  # Columns checks
    score = row[columns.score]
    if isinstance(score, bool) or not isinstance(score, int | float) or score != score:
        raise DataError(f"{where}, column {columns.score!r}: not a number ({score!r})")
    return score >= columns.score_threshold


def is_conversational(dataset: datasets.Dataset, columns: Columns, fmt: str) -> bool:
    column = columns.chosen if fmt == "paired" else columns.completion
    return isinstance(dataset[0][column], list)


def normalise(
    dataset: datasets.Dataset,
    columns: Columns,
    name: str,
    seed: int,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, str, bool]:
    """Rows of any shape -> `{prompt, completion, label, row}`; returns (rows, format, chat).

    `row` is the index of the source row each output row came from (a pair gives two rows with
    the same `row`), so that a later split can keep pairs together and messages can name rows.
    Paired data is shuffled after the split into two rows (seeded) so that labels mix.
    """
    fmt = resolve_format(columns, dataset.column_names, name)
    chat = is_conversational(dataset, columns, fmt)
    text: Any = (
        datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
        if chat
        else datasets.Value("string")
    )
    # Explicit features: without them `map` keeps the input's type for an output column of the
    # same name, so an int64 `label` column would stay 1/0 (and a float -1.0 would become 0.0).
    features = datasets.Features(
        {
            "prompt": text,
            "completion": text,
            "label": datasets.Value("bool"),
            "row": datasets.Value("int64"),
        }
    )
    rows = dataset.map(
        _row_normaliser(columns, fmt, chat, name),
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        features=features,
        num_proc=num_proc,
        desc=f"Reading {name}",
    )
    if fmt == "paired":
        dropped = len(dataset) - len(rows) // 2
        if dropped:
            log.warning(
                "%s: %d of %d pair(s) dropped: their %r and %r completions are the same, so "
                "neither is better (a pair needs two different completions)",
                name, dropped, len(dataset), columns.chosen, columns.rejected,
            )  # fmt: skip
        rows = rows.shuffle(seed=seed).flatten_indices()
    return rows, fmt, chat


def dropped_rows(rows: datasets.Dataset, n_source: int) -> np.ndarray:
    """Indices of the source rows that `normalise` dropped (pairs with chosen == rejected)."""
    present = np.zeros(n_source, dtype=bool)
    present[arrow_column(rows, "row").to_numpy()] = True
    return np.flatnonzero(~present)
