"""Tests for kto_lightning.data.formats: every supported shape -> {prompt, completion, label}.

Rows are hand-written and expectations hand-worked. Conversations are rendered with the byte-level
tokenizer's chat template: "<role>\\n" + content for each message, EOS after an assistant's
content, "\\n" after every message, and "<assistant>\\n" as the generation prompt.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kto_lightning.data.config import Columns
from kto_lightning.data.formats import normalise, resolve_format, split_shared_prefix
from kto_lightning.data.sources import load_source
from kto_lightning.data.tokenize import encode
from kto_lightning.errors import ConfigError, DataError
from kto_lightning.models.byte_tokenizer import byte_level_tokenizer

EOS = 257


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def b(text: str) -> list[int]:
    """The byte tokenizer's ids for `text`, written out independently of the tokenizer."""
    return list(text.encode("utf-8"))


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def norm(
    rows: list[dict] | datasets.Dataset, schema: Columns | None = None, seed: int = 0
) -> tuple[list[dict], str, bool]:
    data = rows if isinstance(rows, datasets.Dataset) else datasets.Dataset.from_list(rows)
    out, fmt, chat = normalise(data, schema or Columns(), "rows.jsonl", seed)
    rows_out = out.to_list()
    # `row` names each output row's source row: every source row is named (twice for a pair).
    source_rows = [row.pop("row") for row in rows_out]
    assert sorted(set(source_rows)) == list(range(len(data)))
    return rows_out, fmt, chat


def labels_of(rows: list[dict]) -> list[bool]:
    labels = [row["label"] for row in rows]
    assert all(type(label) is bool for label in labels), labels
    return labels


# ------------------------------------------------------------------------------------ unpaired

PROMPTS = ["Q1", "Q2", "Q3", "Q4"]
COMPLETIONS = ["A1", "A2", "A3", "A4"]
EXPECTED_LABELS = [True, False, False, True]
LABEL_ENCODINGS = {
    "bool": [True, False, False, True],
    "0/1": [1, 0, 0, 1],
    "true/false": ["true", "false", "False", "TRUE"],
    "+1/-1": [1, -1, -1, 1],
    "'+1'/'-1'": ["+1", "-1", "-1", "+1"],
}


def write(path: Path, frame: pd.DataFrame) -> Path:
    """Write `frame` as jsonl (datasets), csv (pandas) or parquet (pyarrow), by suffix."""
    if path.suffix == ".jsonl":
        datasets.Dataset.from_pandas(frame).to_json(path)
    elif path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
@pytest.mark.parametrize("encoding", list(LABEL_ENCODINGS))
def test_unpaired_text_labels_in_every_encoding_and_file_type(tmp_path, suffix, encoding):
    frame = pd.DataFrame(
        {"prompt": PROMPTS, "completion": COMPLETIONS, "label": LABEL_ENCODINGS[encoding]}
    )
    path = write(tmp_path / f"rows{suffix}", frame)
    rows, fmt, chat = norm(load_source(str(path)))
    assert (fmt, chat) == ("unpaired", False)
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["completion"] for r in rows] == COMPLETIONS
    assert labels_of(rows) == EXPECTED_LABELS


def test_unpaired_custom_columns_and_extra_columns_dropped():
    rows, fmt, _ = norm(
        [{"q": "Why?", "a": "Because.", "ok": 0, "extra": 1}],
        Columns(prompt="q", completion="a", label="ok"),
    )
    assert fmt == "unpaired"
    assert rows == [{"prompt": "Why?", "completion": "Because.", "label": False}]


def test_unpaired_keeps_order_and_text_exactly():
    text = "  leading and trailing spaces \n"
    rows, _, _ = norm(
        [
            {"prompt": text, "completion": "\u00e9\u2028x", "label": 1},
            {"prompt": "b", "completion": "c", "label": 0},
        ]
    )
    assert rows == [
        {"prompt": text, "completion": "\u00e9\u2028x", "label": True},
        {"prompt": "b", "completion": "c", "label": False},
    ]


def test_rows_without_a_label_column_are_all_desirable_with_label_null():
    # Prompt/completion data (for loss=sft): no label column, every row desirable.
    data = [{"prompt": "Q1", "completion": "A1"}, {"prompt": "Q2", "completion": "A2"}]
    rows, fmt, _ = norm(data, Columns(label=None))
    assert fmt == "unpaired"
    assert rows == [
        {"prompt": "Q1", "completion": "A1", "label": True},
        {"prompt": "Q2", "completion": "A2", "label": True},
    ]
    # Without the setting, the missing column's message says how to read such data.
    with pytest.raises(DataError, match=r"data\.columns\.label=null reads every row as desirable"):
        norm(data)


# ------------------------------------------------------------------------------ conversational


def test_conversational_unpaired_rows_keep_their_messages():
    rows, fmt, chat = norm(
        [
            {"prompt": [user("hi")], "completion": [assistant("hello")], "label": True},
            {"prompt": [user("yo")], "completion": [assistant("bye")], "label": False},
        ]
    )
    assert (fmt, chat) == ("unpaired", True)
    assert rows == [
        {"prompt": [user("hi")], "completion": [assistant("hello")], "label": True},
        {"prompt": [user("yo")], "completion": [assistant("bye")], "label": False},
    ]


def test_conversational_extra_message_keys_are_dropped():
    message = {"role": "user", "content": "hi", "name": "ann"}
    rows, _, _ = norm([{"prompt": [message], "completion": [assistant("x")], "label": 1}])
    assert rows[0]["prompt"] == [user("hi")]


def test_conversational_rendering_splits_exactly_at_the_assistant_turn(tokenizer):
    system = {"role": "system", "content": "Be brief."}
    rows, _, chat = norm(
        [
            {"prompt": [system, user("hi")], "completion": [assistant("hello")], "label": 1},
            {
                "prompt": [user("a"), assistant("b"), user("c")],
                "completion": [assistant("d e")],
                "label": 0,
            },
        ]
    )
    out = encode(
        [r["prompt"] for r in rows],
        [r["completion"] for r in rows],
        tokenizer,
        chat=chat,
        max_length=128,
        max_prompt_length=64,
    )
    # The template adds no BOS; the generation prompt "<assistant>\n" ends the prompt.
    assert out["prompt_ids"][0] == b("<system>\nBe brief.\n<user>\nhi\n<assistant>\n")
    assert out["prompt_ids"][1] == [
        *b("<user>\na\n<assistant>\nb"),
        EOS,
        *b("<user>\nc\n<assistant>\n"),
    ]
    # The completion is the assistant's content and the template's end of turn, EOS; the
    # template writes no newline after an assistant turn.
    assert out["completion_ids"][0] == [*b("hello"), EOS]
    assert out["completion_ids"][1] == [*b("d e"), EOS]
    assert tokenizer.decode(out["completion_ids"][0]) == "hello<|eos|>"
    assert (
        tokenizer.decode(out["prompt_ids"][0]) == "<system>\nBe brief.\n<user>\nhi\n<assistant>\n"
    )
    assert out["prompt_tokens"] == [len(p) for p in out["prompt_ids"]]


def test_conversational_prompt_is_cut_from_the_left(tokenizer):
    out = encode([[user("abcdef")]], [[assistant("z")]], tokenizer, True, 64, 8)
    rendered = b("<user>\nabcdef\n<assistant>\n")
    assert out["prompt_ids"] == [rendered[-8:]]
    assert out["prompt_tokens"] == [len(rendered)]


def test_unknown_role_names_the_row_column_and_role():
    rows = [
        {"prompt": [user("hi")], "completion": [assistant("hello")], "label": 1},
        {"prompt": [user("yo")], "completion": [{"role": "bot", "content": "x"}], "label": 0},
    ]
    with pytest.raises(DataError) as info:
        norm(rows)
    message = str(info.value)
    assert "rows.jsonl, row 2, column 'completion', message 0: unknown role 'bot'" in message
    assert "'assistant'" in message  # the roles that are known


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ([], "row 1, column 'prompt': empty conversation"),
        ([{"role": "user"}], "row 1, column 'prompt', message 0: expected {role, content}"),
        ([{"role": "user", "content": 5}], "message 0: content is not text (5)"),
    ],
)
def test_malformed_conversation_names_the_row(prompt, expected):
    with pytest.raises(DataError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        norm([{"prompt": prompt, "completion": [assistant("x")], "label": 1}])


def test_text_and_conversations_mixed_in_one_file_names_the_row(tmp_path):
    chat = {"prompt": [user("hi")], "completion": [assistant("yo")], "label": 1}
    text = {"prompt": "hi", "completion": "yo", "label": 0}
    for first, second, expected in [
        (chat, text, "expected a conversation (as in earlier rows), got 'hi'"),
        (text, chat, "a conversation, but earlier rows hold plain text"),
    ]:
        path = tmp_path / "mixed.jsonl"
        path.write_text(json.dumps(first) + "\n" + json.dumps(second) + "\n", encoding="utf-8")
        with pytest.raises(DataError) as info:
            normalise(load_source(str(path)), Columns(), str(path), 0)
        assert f"{path}, row 2, column 'prompt': {expected}" in str(info.value)


# ------------------------------------------------------------------------------------ paired


def by_prompt(rows: list[dict]) -> dict:
    """{prompt (hashable): {label: completion}}; checks each prompt has one row of each label."""
    groups: dict = {}
    for row in rows:
        key = json.dumps(row["prompt"])
        assert row["label"] not in groups.setdefault(key, {}), "two rows of one label"
        groups[key][row["label"]] = row["completion"]
    assert all(set(g) == {True, False} for g in groups.values())
    return groups


def test_paired_with_an_explicit_prompt():
    rows, fmt, chat = norm(
        [
            {"prompt": "Q1", "chosen": "good 1", "rejected": "bad 1"},
            {"prompt": "Q2", "chosen": "good 2", "rejected": "bad 2"},
        ]
    )
    assert (fmt, chat) == ("paired", False)
    assert len(rows) == 4
    assert by_prompt(rows) == {
        '"Q1"': {True: "good 1", False: "bad 1"},
        '"Q2"': {True: "good 2", False: "bad 2"},
    }


def test_paired_completions_that_repeat_the_prompt_lose_it():
    rows, _, _ = norm([{"prompt": "Q: hi", "chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"}])
    assert by_prompt(rows) == {'"Q: hi"': {True: " A: yes", False: " A: no"}}


def test_paired_with_an_implicit_shared_prefix_anthropic_hh_style():
    chosen = "\n\nHuman: hi\n\nAssistant: hello there"
    rejected = "\n\nHuman: hi\n\nAssistant: go away"
    rows, fmt, _ = norm([{"chosen": chosen, "rejected": rejected}])
    assert fmt == "paired"
    prompt = "\n\nHuman: hi\n\nAssistant:"
    assert by_prompt(rows) == {json.dumps(prompt): {True: " hello there", False: " go away"}}
    for row in rows:
        assert row["prompt"] + row["completion"] in (chosen, rejected)


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        # The texts differ inside "hel|lo"/"hel|p": the cut moves back to the word's start.
        ("Q: say hello", "Q: say help", ("Q: say", " hello", " help")),
        # Differing after a run of whitespace: the whole run begins the completions.
        ("Q:\n\n  yes", "Q:\n\n  no", ("Q:", "\n\n  yes", "\n\n  no")),
        ("same start, then A", "same start, then B", ("same start, then", " A", " B")),
        ("Q: yes", "Q: yes please", None),  # one is a prefix of the other
        ("identical", "identical", None),
    ],
)
def test_split_shared_prefix(chosen, rejected, expected):
    assert split_shared_prefix(chosen, rejected) == expected


def test_paired_without_a_shared_prefix_names_the_row_and_the_key():
    rows = [
        {"chosen": "Q: a yes", "rejected": "Q: a no"},
        {"chosen": "yes", "rejected": "no"},
    ]
    with pytest.raises(DataError) as info:
        norm(rows)
    message = str(info.value)
    assert "rows.jsonl, row 2: no shared prompt" in message
    assert "data.columns.prompt" in message


def test_paired_conversational_ultrafeedback_style():
    rows, fmt, chat = norm(
        [
            {
                "prompt": "hi",
                "chosen": [user("hi"), assistant("hello")],
                "rejected": [user("hi"), assistant("go away")],
            },
            {
                "prompt": "2+2?",
                "chosen": [user("2+2?"), assistant("4")],
                "rejected": [user("2+2?"), assistant("5")],
            },
        ]
    )
    assert (fmt, chat) == ("paired", True)
    assert by_prompt(rows) == {
        json.dumps([user("hi")]): {True: [assistant("hello")], False: [assistant("go away")]},
        json.dumps([user("2+2?")]): {True: [assistant("4")], False: [assistant("5")]},
    }


def test_paired_conversational_with_only_assistant_turns_takes_the_prompt_column():
    rows, _, chat = norm(
        [{"prompt": "hi", "chosen": [assistant("hello")], "rejected": [assistant("go")]}]
    )
    assert chat
    assert by_prompt(rows) == {
        json.dumps([user("hi")]): {True: [assistant("hello")], False: [assistant("go")]}
    }


def test_paired_conversational_without_any_prompt_names_the_row():
    with pytest.raises(DataError, match=r"rows\.jsonl, row 1: chosen and rejected must share"):
        norm([{"chosen": [assistant("hello")], "rejected": [assistant("go")]}])


def test_paired_empty_completion_names_the_row_and_column():
    rows = [
        {"prompt": "Q1", "chosen": "good", "rejected": "bad"},
        {"prompt": "Q2", "chosen": "good", "rejected": " "},
    ]
    with pytest.raises(
        DataError, match=r"rows\.jsonl, row 2, column 'rejected': empty or not text"
    ):
        norm(rows)


def paired_rows(count: int) -> list[dict]:
    return [
        {"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(count)
    ]


def test_paired_rows_are_shuffled_deterministically_per_seed():
    rows, _, _ = norm(paired_rows(10), seed=0)
    labels = labels_of(rows)
    assert Counter(labels) == {True: 10, False: 10}
    assert labels != [True, False] * 10  # not left in the order of the split
    assert labels != [True] * 10 + [False] * 10
    assert by_prompt(rows) == {
        json.dumps(f"Q{i}"): {True: f"good {i}", False: f"bad {i}"} for i in range(10)
    }
    assert norm(paired_rows(10), seed=0)[0] == rows
    assert norm(paired_rows(10), seed=1)[0] != rows


# ------------------------------------------------------------------------------------ score


def test_score_at_or_above_the_threshold_is_desirable():
    scores = [0.5, 2.0, 3, -1.0, 1.99]
    rows, fmt, _ = norm(
        [{"prompt": f"Q{i}", "completion": f"A{i}", "rating": s} for i, s in enumerate(scores)],
        Columns(format="score", score="rating", score_threshold=2.0),
    )
    assert fmt == "score"
    assert labels_of(rows) == [False, True, True, False, False]
    assert [r["completion"] for r in rows] == [f"A{i}" for i in range(5)]


@pytest.mark.parametrize(
    ("scores", "row", "shown"),
    [
        (["3", "1"], 1, "'3'"),  # numbers written as text
        ([3.0, None], 2, "None"),
        ([True, False], 1, "True"),  # a bool is not a score
    ],
)
def test_score_that_is_not_a_number_names_the_row(scores, row, shown):
    data = [{"prompt": "Q", "completion": "A", "rating": s} for s in scores]
    with pytest.raises(DataError) as info:
        norm(data, Columns(format="score", score="rating", score_threshold=2.0))
    assert f"rows.jsonl, row {row}, column 'rating': not a number ({shown})" in str(info.value)


def test_score_of_mixed_types_in_a_jsonl_file_names_the_row(tmp_path):
    path = tmp_path / "scores.jsonl"
    lines = [{"prompt": "Q", "completion": "A", "rating": 3.5}, {"prompt": "Q", "completion": "B"}]
    lines[1]["rating"] = "high"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    schema = Columns(score="rating", score_threshold=1.0)  # format auto
    with pytest.raises(DataError, match=f"{path}, row 2, column 'rating': not a number"):
        normalise(load_source(str(path)), schema, str(path), 0)


@pytest.mark.parametrize(
    ("schema", "key"),
    [
        ({"format": "score"}, "data.columns.score and data.columns.score_threshold"),
        ({"format": "score", "score": "s"}, "data.columns.score_threshold"),
        ({"format": "ranked"}, "data.columns.format"),
    ],
)
def test_schema_config_errors_name_the_key(schema, key):
    with pytest.raises(ConfigError, match=key):
        Columns(**schema)


# ------------------------------------------------------------------------------ auto-detection


@pytest.mark.parametrize(
    ("columns", "schema", "expected"),
    [
        (["prompt", "completion", "label"], Columns(), "unpaired"),
        (["prompt", "completion", "label", "chosen", "rejected"], Columns(), "unpaired"),
        (["chosen", "rejected"], Columns(), "paired"),
        (["prompt", "chosen", "rejected", "score"], Columns(), "paired"),
        (
            ["prompt", "completion", "rating"],
            Columns(score="rating", score_threshold=1.0),
            "score",
        ),
        (
            ["q", "a", "y"],
            Columns(prompt="q", completion="a", label="y"),
            "unpaired",
        ),
    ],
)
def test_format_auto_detection(columns, schema, expected):
    assert resolve_format(schema, columns, "rows.jsonl") == expected


def test_auto_detection_error_lists_the_columns_found_and_the_keys():
    rows = [{"question": "Q", "answer": "A", "thumbs": 1}]
    with pytest.raises(DataError) as info:
        norm(rows)
    message = str(info.value)
    assert "rows.jsonl: cannot tell the data's shape" in message
    assert "['answer', 'question', 'thumbs']" in message
    assert "'prompt'/'completion'/'label'" in message
    assert "'chosen'/'rejected'" in message
    assert "data.columns.score" in message


@pytest.mark.parametrize(
    ("schema", "missing", "key"),
    [
        (Columns(format="unpaired"), "'label'", "data.columns.label"),
        (
            Columns(format="unpaired", completion="answer"),
            "'answer'",
            "data.columns.completion",
        ),
        (Columns(format="paired"), "'chosen'", "data.columns.chosen"),
        (Columns(format="score", score="s", score_threshold=0), "'s'", "data.columns.score"),
        (Columns(format="unpaired", prompt=None), "(none", "data.columns.prompt"),
    ],
)
def test_explicit_format_missing_column_names_it_the_key_and_the_columns_found(
    schema, missing, key
):
    with pytest.raises(DataError) as info:
        norm([{"prompt": "Q", "completion": "A", "rating": 1}], schema)
    message = str(info.value)
    assert f"rows.jsonl: missing column {missing}" in message
    assert "the columns found are ['completion', 'prompt', 'rating']" in message
    assert f"set {key}" in message


@pytest.mark.parametrize(
    ("row", "where"),
    [
        (
            {"prompt": [user("hi")], "completion": [assistant("a"), user("b")], "label": True},
            "rows.jsonl, row 1, column 'completion', message 1: a 'user' turn",
        ),
        (
            {
                "chosen": [user("hi"), assistant("a")],
                "rejected": [user("hi"), {"role": "system", "content": "s"}, assistant("b")],
            },
            "rows.jsonl, row 1, column 'rejected', message 0: a 'system' turn",
        ),
    ],
    ids=["unpaired", "paired"],
)
def test_a_completion_holding_a_non_assistant_turn_is_refused(row: dict, where: str) -> None:
    # It would be trained as model output; the row is refused, naming the turn.
    with pytest.raises(DataError) as info:
        norm([row])
    assert str(info.value).startswith(where)
    assert "a completion holds assistant turns only" in str(info.value)
