"""Tests for kto_lightning.data: reading files, tokenizing, KL pairing, collating, the data module.

The byte-level tokenizer makes every expectation hand-checkable: ids 0-255 are the UTF-8 bytes,
BOS=256, EOS=257, PAD=258.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch.testing import assert_close

from kto_lightning.data import (
    Example,
    KTOCollator,
    KTODataModule,
    Row,
    assign_kl_partners,
    tokenize_rows,
    toy_rows,
)
from kto_lightning.data.config import Columns, Source, check_lengths
from kto_lightning.data.formats import normalise
from kto_lightning.data.pairing import (
    RowDigest,
    TokenIds,
    cached_kl_partners,
    kl_partners,
    kl_partners_of,
)
from kto_lightning.data.rows import parse_label
from kto_lightning.data.sources import load_source
from kto_lightning.data.tokenize import fit_beside, token_ids
from kto_lightning.errors import ConfigError, DataError
from kto_lightning.models.byte_tokenizer import BYTE_CHAT_TEMPLATE, byte_level_tokenizer

BOS, EOS, PAD = 256, 257, 258


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def b(text: str) -> list[int]:
    """The byte tokenizer's ids for `text`, written out independently of the tokenizer."""
    return list(text.encode("utf-8"))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def record(prompt: str, completion: str, label: object) -> str:
    return json.dumps({"prompt": prompt, "completion": completion, "label": label})


# ------------------------------------------------------------------------------------ parse_label


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (False, False),
        (1, True),
        (0, False),
        (-1, False),
        (1.0, True),
        ("true", True),
        ("False", False),
        (" TRUE ", True),
        ("1", True),
        ("0", False),
        ("+1", True),
        ("-1", False),
        ("yes", True),
        ("no", False),
        ("desirable", True),
        ("undesirable", False),
    ],
)
def test_parse_label_accepts(value, expected):
    assert parse_label(value, "here") is expected


@pytest.mark.parametrize("value", [2, 0.5, "maybe", None, "", [1]])
def test_parse_label_rejects_naming_where_and_value(value):
    with pytest.raises(DataError) as info:
        parse_label(value, "train.jsonl, line 7, column 'label'")
    message = str(info.value)
    assert "train.jsonl, line 7, column 'label'" in message
    assert repr(value) in message


# ------------------------------------------------------------------------------------ reading files
# A local file is read by load_source and brought to {prompt, completion, label} by normalise;
# errors name the file and its line (while reading) or its row, counted from 1 (while normalising).


def read(path: Path, columns: Columns | None = None) -> list[Row]:
    rows, fmt, chat = normalise(load_source(str(path)), columns or Columns(), str(path), seed=0)
    assert (fmt, chat) == ("unpaired", False)
    out = [Row(row["prompt"], row["completion"], row["label"]) for row in rows]
    assert all(type(row.label) is bool for row in out)  # not 1/0 carried over from the file
    return out


def test_read_good_file(tmp_path):
    path = write_lines(
        tmp_path / "data.jsonl",
        [record("Q1", "A1", True), record("Q2", "A2", -1), record("Q3", "A3", "+1")],
    )
    assert read(path) == [
        Row("Q1", "A1", True),
        Row("Q2", "A2", False),
        Row("Q3", "A3", True),
    ]


def test_read_integer_labels_become_bools(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [record("Q1", "A1", 1), record("Q2", "A2", 0)])
    assert read(path) == [Row("Q1", "A1", True), Row("Q2", "A2", False)]


def test_read_custom_columns(tmp_path):
    line = json.dumps({"q": "Why?", "a": "Because.", "ok": 0, "extra": 1})
    path = write_lines(tmp_path / "data.jsonl", [line])
    columns = Columns(prompt="q", completion="a", label="ok")
    assert read(path, columns) == [Row("Why?", "Because.", False)]


def test_read_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(DataError, match="not found") as info:
        read(path)
    assert str(path) in str(info.value)


def test_read_malformed_line_names_the_line(tmp_path):
    path = write_lines(
        tmp_path / "data.jsonl",
        [record("Q1", "A1", 1), record("Q2", "A2", 0), '{"prompt": "Q3", "completion": '],
    )
    with pytest.raises(DataError, match="line 3: malformed JSON") as info:
        read(path)
    assert str(path) in str(info.value)


def test_read_line_numbers_count_blank_lines(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [record("Q1", "A1", 1), "", "   ", "not json"])
    with pytest.raises(DataError, match="line 4: malformed JSON"):
        read(path)


def test_read_blank_lines_are_skipped(tmp_path):
    path = write_lines(
        tmp_path / "data.jsonl", ["", record("Q1", "A1", 1), "  ", "", record("Q2", "A2", 0)]
    )
    assert read(path) == [Row("Q1", "A1", True), Row("Q2", "A2", False)]


def test_read_non_object_line(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [record("Q1", "A1", 1), "[1, 2]"])
    with pytest.raises(DataError, match=r"line 2: expected a JSON object, got \[1, 2\]"):
        read(path)


def test_read_missing_column_names_it_and_lists_the_columns(tmp_path):
    path = write_lines(
        tmp_path / "data.jsonl",
        [json.dumps({"prompt": f"Q{i}", "completion": f"A{i}", "rating": 1}) for i in range(2)],
    )
    with pytest.raises(DataError) as info:
        read(path, Columns(format="unpaired"))
    message = str(info.value)
    assert f"{path}: missing column 'label'" in message
    assert "['completion', 'prompt', 'rating']" in message
    assert "data.columns.label" in message
    # Left to tell the shape itself, it lists the columns it found and the ones it looked for.
    with pytest.raises(DataError) as info:
        read(path)
    message = str(info.value)
    assert f"{path}: cannot tell the data's shape" in message
    assert "['completion', 'prompt', 'rating']" in message
    assert "'prompt'/'completion'/'label'" in message


def test_read_column_missing_from_one_row_names_the_row(tmp_path):
    # A JSON-lines file's columns are those of all its rows; a row without one reads as null.
    path = write_lines(
        tmp_path / "data.jsonl",
        [record("Q1", "A1", 1), json.dumps({"prompt": "Q2", "completion": "A2", "rating": 1})],
    )
    with pytest.raises(DataError) as info:
        read(path)
    message = str(info.value)
    assert f"{path}, row 2, column 'label'" in message
    assert "None" in message


@pytest.mark.parametrize(
    ("line", "column", "value"),
    [
        ({"prompt": "", "completion": "A", "label": 1}, "prompt", "''"),
        ({"prompt": "Q", "completion": "   ", "label": 1}, "completion", "'   '"),
        ({"prompt": 5, "completion": "A", "label": 1}, "prompt", "5"),
        ({"prompt": "Q", "completion": None, "label": 1}, "completion", "None"),
    ],
)
def test_read_empty_or_non_text_field_names_row_and_column(tmp_path, line, column, value):
    path = write_lines(tmp_path / "data.jsonl", [record("Q1", "A1", 1), json.dumps(line)])
    with pytest.raises(DataError) as info:
        read(path)
    message = str(info.value)
    assert f"{path}, row 2, column {column!r}: empty or not text ({value})" in message


def test_read_bad_label_names_row_column_and_value(tmp_path):
    path = write_lines(
        tmp_path / "data.jsonl", [record("Q1", "A1", 1), record("Q2", "A2", "maybe")]
    )
    with pytest.raises(DataError) as info:
        read(path)
    message = str(info.value)
    assert f"{path}, row 2, column 'label'" in message
    assert "'maybe'" in message


def test_read_non_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    line = json.dumps({"prompt": "caf\u00e9", "completion": "ok", "label": 1}, ensure_ascii=False)
    # \xe9 alone is not UTF-8.
    path.write_bytes((record("Q1", "A1", 0) + "\n" + line + "\n").encode("latin-1"))
    with pytest.raises(DataError, match="line 2: bytes that are not UTF-8") as info:
        read(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_read_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="the file is empty") as info:
        read(path)
    assert str(path) in str(info.value)


def test_read_keeps_unicode_line_separators_inside_strings(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028 and U+0085 raw; they are not record breaks.
    text = "one\u2028two\x85three"
    line = json.dumps({"prompt": text, "completion": "A", "label": 1}, ensure_ascii=False)
    path = write_lines(tmp_path / "data.jsonl", [line, record("Q2", "A2", 0)])
    assert read(path) == [Row(text, "A", True), Row("Q2", "A2", False)]


def test_read_crlf_and_byte_order_mark(tmp_path):
    path = tmp_path / "windows.jsonl"
    content = record("Q1", "A1", 1) + "\r\n" + record("Q2", "A2", 0) + "\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + content.encode("utf-8"))
    assert read(path) == [Row("Q1", "A1", True), Row("Q2", "A2", False)]


# ------------------------------------------------------------------------------------ tokenize


def test_tokenize_prompt_gets_bos_and_completion_gets_eos(tokenizer):
    rows = [Row("ab", "cd", True), Row("\u00e9", "x y", False)]
    examples, dropped = tokenize_rows(rows, tokenizer, max_length=32, max_prompt_length=16)
    assert dropped == 0
    assert examples == [
        Example([BOS, 97, 98], [99, 100, EOS], True),
        Example([BOS, 0xC3, 0xA9], [120, 32, 121, EOS], False),
    ]


def test_tokenize_truncates_the_prompt_from_the_left_keeping_bos(tokenizer):
    examples, _ = tokenize_rows(
        [Row("abcdef", "z", True)], tokenizer, max_length=32, max_prompt_length=4
    )
    # Room for BOS and the last 3 prompt bytes, "def".
    assert examples[0].prompt_ids == [BOS, 100, 101, 102]
    assert examples[0].completion_ids == [122, EOS]


def test_tokenize_prompt_of_exactly_max_prompt_length_is_untouched(tokenizer):
    examples, _ = tokenize_rows(
        [Row("abc", "z", True)], tokenizer, max_length=32, max_prompt_length=4
    )
    assert examples[0].prompt_ids == [BOS, 97, 98, 99]


def test_tokenize_truncates_the_completion_from_the_right(tokenizer):
    examples, _ = tokenize_rows(
        [Row("ab", "wxyz", True), Row("ab", "wx", True)],
        tokenizer,
        max_length=6,
        max_prompt_length=3,
    )
    # Prompt [BOS, a, b] leaves 3 tokens: "wxy" (EOS cut off); "wx" + EOS fits exactly.
    assert examples[0].completion_ids == [119, 120, 121]
    assert examples[1].completion_ids == [119, 120, EOS]


def test_tokenize_completion_room_grows_when_the_prompt_is_short(tokenizer):
    examples, _ = tokenize_rows(
        [Row("a", "wxyz", True)], tokenizer, max_length=6, max_prompt_length=3
    )
    assert examples[0].prompt_ids == [BOS, 97]
    assert examples[0].completion_ids == [119, 120, 121, 122]


@pytest.mark.parametrize(("max_length", "max_prompt_length"), [(2, 1), (5, 1), (5, 4), (9, 3)])
def test_tokenize_length_guarantees(tokenizer, max_length, max_prompt_length):
    rows = [
        Row(p, c, i % 2 == 0)
        for i, (p, c) in enumerate(
            [
                ("q", "a"),
                ("a long prompt here", "x"),
                ("q", "a long completion"),
                ("\u00e9\u00e9", "\u2713"),
            ]
        )
    ]
    examples, dropped = tokenize_rows(rows, tokenizer, max_length, max_prompt_length)
    # max_prompt_length < max_length leaves at least one completion token, and the byte
    # tokenizer has an EOS, so no row can end up empty.
    assert dropped == 0
    assert len(examples) == len(rows)
    for example, row in zip(examples, rows, strict=True):
        assert example.prompt_ids[0] == BOS
        assert len(example.prompt_ids) <= max_prompt_length
        assert len(example.completion_ids) >= 1
        assert len(example.prompt_ids) + len(example.completion_ids) <= max_length
        assert example.label == row.label
        # The kept tokens are the prompt's end and the completion's start.
        prompt_tail = example.prompt_ids[1:]
        assert prompt_tail == b(row.prompt)[len(b(row.prompt)) - len(prompt_tail) :]
        full = [*b(row.completion), EOS]
        assert example.completion_ids == full[: len(example.completion_ids)]


def test_tokenize_max_prompt_length_one_keeps_only_bos(tokenizer):
    examples, _ = tokenize_rows(
        [Row("abc", "de", True)], tokenizer, max_length=3, max_prompt_length=1
    )
    assert examples[0].prompt_ids == [BOS]
    assert examples[0].completion_ids == [100, 101]


class _NoEosTokenizer:
    """A tokenizer without BOS/EOS that ignores '#': a completion of only '#' has no tokens."""

    bos_token_id = None
    eos_token_id = None

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(ch) for ch in text if ch != "#"] for text in texts]}


def test_token_ids_straight_from_the_rust_tokenizer_equal_transformers_call():
    texts = ["Hello there", "", "héllo <|eot|> wörld", "a" * 50]
    expected = byte_level_tokenizer()(texts, add_special_tokens=False)["input_ids"]
    plain = byte_level_tokenizer()
    assert token_ids(plain, texts) == expected
    # A tokenizer file may switch truncation and padding on in the backend; transformers' call
    # switches them off, so the ids stay those of the whole texts.
    configured = byte_level_tokenizer()
    configured.backend_tokenizer.enable_truncation(max_length=3)
    configured.backend_tokenizer.enable_padding(length=60, pad_id=0)
    assert token_ids(configured, texts) == expected


def test_dataset_lengths_are_the_longer_of_each_row_and_its_kl_row(tokenizer, tmp_path):
    rows = [record(f"Q{i}" * (1 + i % 9), "A" * (1 + (7 * i) % 40), i % 2) for i in range(60)]
    path = write_lines(tmp_path / "rows.jsonl", rows)
    lengths = {"max_length": 32, "max_prompt_length": 16}  # KL completions are cut
    dm = make_datamodule(tokenizer, source={"path": str(path)}, lengths=lengths)
    expected = [
        len(e.prompt_ids) + max(len(e.completion_ids), len(e.kl_completion_ids))
        for e in dm.train_set.examples
    ]
    assert dm.train_set.lengths == expected
    assert any(len(e.kl_completion_ids) > len(e.completion_ids) for e in dm.train_set.examples)


def test_tokenize_drops_and_counts_rows_left_without_completion_tokens():
    rows = [Row("ab", "##", True), Row("ab", "cd", False), Row("q", "#", True)]
    examples, dropped = tokenize_rows(rows, _NoEosTokenizer(), max_length=8, max_prompt_length=4)
    assert dropped == 2
    assert examples == [Example([97, 98], [99, 100], False)]


def test_tokenize_no_rows(tokenizer):
    assert tokenize_rows([], tokenizer, max_length=8, max_prompt_length=4) == ([], 0)


@pytest.mark.parametrize(
    ("max_length", "max_prompt_length", "key"),
    [
        (1, 1, "data.lengths.max_length"),
        (8, 0, "data.lengths.max_prompt_length"),
        (8, 8, "data.lengths.max_prompt_length"),
        (8, 9, "data.lengths.max_prompt_length"),
    ],
)
def test_check_lengths_errors_name_the_key(tokenizer, max_length, max_prompt_length, key):
    with pytest.raises(ConfigError, match=key):
        check_lengths(max_length, max_prompt_length)
    with pytest.raises(ConfigError, match=key):
        tokenize_rows([Row("a", "b", True)], tokenizer, max_length, max_prompt_length)


# ------------------------------------------------------------------------------------ KL partners


def ex(prompt: list[int], completion: list[int], label: bool = True) -> Example:
    return Example(prompt, completion, label)


def partners(examples: list[Example]) -> list[list[int]]:
    return [e.kl_completion_ids for e in examples]


def test_kl_partner_is_never_the_own_completion_with_many_duplicates():
    # 90 of 100 examples share one completion; each of those must be paired with one of the 10.
    same = [7, 7, EOS]
    examples = [ex([BOS, i % 50], same, i % 2 == 0) for i in range(90)]
    examples += [ex([BOS, 1], [i, EOS]) for i in range(10)]
    minority = {(i, EOS) for i in range(10)}
    for seed in range(5):
        paired = assign_kl_partners(examples, max_length=64, seed=seed)
        for original, example in zip(examples, paired, strict=True):
            assert example.kl_completion_ids != example.completion_ids
            # Everything else is carried over unchanged.
            assert example.prompt_ids == original.prompt_ids
            assert example.completion_ids == original.completion_ids
            assert example.label == original.label
        for example in paired[:90]:
            assert tuple(example.kl_completion_ids) in minority


def test_kl_partner_is_another_examples_completion():
    examples = [ex([BOS], [i, i + 1, EOS]) for i in range(20)]
    completions = [e.completion_ids for e in examples]
    for example in assign_kl_partners(examples, max_length=64, seed=3):
        assert example.kl_completion_ids in completions
        assert example.kl_completion_ids != example.completion_ids


def test_kl_pairing_is_deterministic_per_seed():
    examples = [ex([BOS, i], [i, EOS]) for i in range(50)]
    first = partners(assign_kl_partners(examples, 64, seed=0))
    assert partners(assign_kl_partners(examples, 64, seed=0)) == first
    assert partners(assign_kl_partners(examples, 64, seed=1)) != first


def test_kl_partner_is_cut_to_fit_beside_the_prompt():
    long = [*range(10), EOS]
    examples = [ex([BOS, 1, 2, 3], [5, EOS]), ex([BOS], long)]
    paired = assign_kl_partners(examples, max_length=6, seed=0)
    # Example 0 has 6 - 4 = 2 tokens of room: the first two of the long completion.
    assert paired[0].kl_completion_ids == [0, 1]
    assert paired[1].kl_completion_ids == [5, EOS]
    for example in paired:
        assert len(example.prompt_ids) + len(example.kl_completion_ids) <= 6


def test_kl_partner_that_equals_the_own_completion_after_the_cut_is_not_used():
    # [7, 8, 9, EOS] cut to the 2 tokens beside example 0's prompt is [7, 8]: its own completion.
    examples = [ex([BOS, 1, 2, 3], [7, 8]), ex([BOS], [7, 8, 9, EOS]), ex([BOS], [5, EOS])]
    for seed in range(10):
        paired = assign_kl_partners(examples, max_length=6, seed=seed)
        assert paired[0].kl_completion_ids == [5, EOS]


def test_kl_pairing_error_when_no_partner_differs_after_the_cut():
    examples = [ex([BOS, 1, 2, 3], [7, 8]), ex([BOS], [7, 8, 9, EOS])]
    with pytest.raises(DataError, match="example 0") as info:
        assign_kl_partners(examples, max_length=6, seed=0)
    assert "data.lengths.max_length" in str(info.value)


@pytest.mark.parametrize("count", [0, 1])
def test_kl_pairing_needs_two_examples(count):
    with pytest.raises(DataError, match="at least 2 examples"):
        assign_kl_partners([ex([BOS], [1, EOS])] * count, 64, seed=0)


def test_kl_pairing_error_when_all_completions_are_identical():
    examples = [ex([BOS, i], [1, EOS]) for i in range(5)]
    with pytest.raises(DataError, match="same completion"):
        assign_kl_partners(examples, 64, seed=0)


# ------------------------------------------------------------------------------------ collator


def collator_examples() -> list[Example]:
    return [
        Example([BOS, 1, 2], [3, EOS], True, [4, 5, 6, 7, 8, EOS]),  # main 5, KL 9
        Example([BOS, 9], [10, 11, 12, 13, EOS], False, [14]),  # main 7, KL 3
    ]


def test_collator_pads_main_and_kl_rows_to_one_length():
    batch = KTOCollator(pad_token_id=PAD)(collator_examples())
    P = PAD
    assert_close(
        batch["input_ids"],
        torch.tensor(
            [
                [BOS, 1, 2, 3, EOS, P, P, P, P],
                [BOS, 9, 10, 11, 12, 13, EOS, P, P],
            ]
        ),
    )
    assert_close(
        batch["attention_mask"],
        torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0, 0]]),
    )
    assert_close(
        batch["completion_mask"],
        torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1, 0, 0]]).bool(),
    )
    assert_close(
        batch["kl_input_ids"],
        torch.tensor(
            [
                [BOS, 1, 2, 4, 5, 6, 7, 8, EOS],
                [BOS, 9, 14, P, P, P, P, P, P],
            ]
        ),
    )
    assert_close(
        batch["kl_attention_mask"],
        torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0, 0, 0]]),
    )
    assert_close(
        batch["kl_completion_mask"],
        torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 0, 0, 0, 0, 0]]).bool(),
    )
    assert batch["labels"].dtype == torch.bool
    assert batch["labels"].tolist() == [True, False]
    assert batch["input_ids"].dtype == torch.long
    assert batch["completion_mask"].dtype == torch.bool
    # Flat positions row * (L - 1) + t - 1 of the states that predict each completion token t.
    assert batch["completion_index"].tolist() == [2, 3, 8 + 1, 8 + 2, 8 + 3, 8 + 4, 8 + 5]
    assert batch["kl_completion_index"].tolist() == [2, 3, 4, 5, 6, 7, 8 + 1]


@pytest.mark.parametrize(
    ("multiple", "max_length", "length"),
    [(1, None, 9), (4, None, 12), (8, None, 16), (8, 12, 12), (8, 4, 9)],
)
def test_collator_pads_to_a_multiple_but_not_past_max_length(multiple, max_length, length):
    # The longest row (a KL row) has 9 tokens; a multiple rounds the batch up, max_length caps
    # the rounding (but never cuts a row: rows were cut to max_length when tokenized).
    collate = KTOCollator(pad_token_id=PAD, pad_to_multiple_of=multiple, max_length=max_length)
    batch = collate(collator_examples())
    plain = KTOCollator(pad_token_id=PAD)(collator_examples())
    assert batch["input_ids"].shape == (2, length)
    assert_close(batch["input_ids"][:, :9], plain["input_ids"])
    assert (batch["input_ids"][:, 9:] == PAD).all() and not batch["attention_mask"][:, 9:].any()
    # The listed completion positions follow the new row length.
    for prefix in ("", "kl_"):
        mask = batch[f"{prefix}completion_mask"]
        expected = mask[:, 1:].flatten().nonzero().flatten()
        assert batch[f"{prefix}completion_index"].tolist() == expected.tolist()


def test_collator_masks_recover_the_tokens():
    examples = collator_examples()
    batch = KTOCollator(pad_token_id=PAD)(examples)
    for row, example in enumerate(examples):
        ids = batch["input_ids"][row]
        assert ids[batch["completion_mask"][row]].tolist() == example.completion_ids
        assert ids[batch["attention_mask"][row].bool()].tolist() == (
            example.prompt_ids + example.completion_ids
        )
        assert (ids[~batch["attention_mask"][row].bool()] == PAD).all()
        kl_ids = batch["kl_input_ids"][row]
        assert kl_ids[batch["kl_completion_mask"][row]].tolist() == example.kl_completion_ids


def test_collator_without_kl_omits_kl_keys_and_pads_to_the_main_rows():
    batch = KTOCollator(pad_token_id=PAD, needs_kl_rows=False)(collator_examples())
    assert set(batch) == {
        "input_ids",
        "attention_mask",
        "completion_mask",
        "completion_index",
        "labels",
        "index",
    }
    assert batch["input_ids"].shape == (2, 7)
    assert batch["input_ids"][0].tolist() == [BOS, 1, 2, 3, EOS, PAD, PAD]


# ------------------------------------------------------------------------------------ data module


def numbered_rows(path: Path, count: int, start: int = 0) -> Path:
    """A JSON-lines file whose prompts are all different, so rows can be told apart."""
    return write_lines(
        path,
        [record(f"Question {i}?", f"Answer {i % 7}.", i % 2) for i in range(start, start + count)],
    )


def decoded_prompts(dataset, tokenizer) -> list[str]:
    return [tokenizer.decode(e.prompt_ids, skip_special_tokens=True) for e in dataset.examples]


DEFAULTS = {
    "source": {"path": "toy", "toy_rows": 60, "val_fraction": 0.2},
    "lengths": {"max_length": 96, "max_prompt_length": 48},
    "batching": {"batch_size": 4},
}


def make_datamodule(
    tokenizer, seed: int = 0, needs_kl_rows: bool = True, **groups
) -> KTODataModule:
    """A set-up data module: DEFAULTS, with the keys of each group in `groups` replaced."""
    settings = {
        name: {**DEFAULTS.get(name, {}), **groups.get(name, {})}
        for name in ("source", "columns", "lengths", "batching")
    }
    dm = KTODataModule(tokenizer, **settings, seed=seed, needs_kl_rows=needs_kl_rows)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize(("device", "setting", "multiple"), [
    ("cpu", None, 1), ("cuda", None, 64), ("cuda", 8, 8), ("cpu", 16, 16)
])  # fmt: skip
def test_batches_are_padded_to_a_multiple_chosen_for_the_device(
    tokenizer, device, setting, multiple
):
    dm = make_datamodule(tokenizer, batching={"pad_to_multiple_of": setting})
    strategy = SimpleNamespace(root_device=torch.device(device))
    dm.trainer = SimpleNamespace(strategy=strategy, world_size=1, global_rank=0)
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        lengths = {batch["input_ids"].shape[1] for batch in loader}
        assert all(n % multiple == 0 or n == 96 for n in lengths), lengths  # 96: max_length


def test_datamodule_toy_split_sizes(tokenizer):
    dm = make_datamodule(tokenizer)
    assert len(dm.train_set) == 48
    assert len(dm.val_set) == 12


def test_datamodule_split_is_seeded_and_disjoint(tokenizer, tmp_path):
    path = numbered_rows(tmp_path / "rows.jsonl", 40)
    every = {f"Question {i}?" for i in range(40)}

    def split(seed):
        dm = make_datamodule(tokenizer, source={"path": str(path), "val_fraction": 0.25}, seed=seed)
        return decoded_prompts(dm.train_set, tokenizer), decoded_prompts(dm.val_set, tokenizer)

    train, val = split(seed=0)
    assert len(train) == 30
    assert len(val) == 10
    assert set(train).isdisjoint(val)
    assert set(train) | set(val) == every
    assert split(seed=0) == (train, val)
    assert set(split(seed=1)[1]) != set(val)


def test_datamodule_toy_is_the_same_for_the_same_seed(tokenizer):
    first = make_datamodule(tokenizer, seed=5)
    second = make_datamodule(tokenizer, seed=5)
    other = make_datamodule(tokenizer, seed=6)
    assert first.train_set.examples == second.train_set.examples
    assert first.val_set.examples == second.val_set.examples
    assert first.train_set.examples != other.train_set.examples


@pytest.mark.parametrize("batch_size", [1, 4])
def test_datamodule_every_train_batch_has_unrelated_kl_rows(tokenizer, batch_size):
    dm = make_datamodule(tokenizer, batching={"batch_size": batch_size})
    loader = dm.train_dataloader()
    batches = 0
    for batch in loader:
        batches += 1
        assert len(batch["labels"]) == batch_size
        for row in range(batch_size):
            own = batch["input_ids"][row][batch["completion_mask"][row]].tolist()
            kl = batch["kl_input_ids"][row][batch["kl_completion_mask"][row]].tolist()
            assert kl
            assert kl != own
            # The KL row keeps the row's own prompt.
            prompt = batch["attention_mask"][row].bool() & ~batch["completion_mask"][row]
            kl_prompt = batch["kl_attention_mask"][row].bool() & ~batch["kl_completion_mask"][row]
            assert batch["input_ids"][row][prompt].tolist() == (
                batch["kl_input_ids"][row][kl_prompt].tolist()
            )
    assert batches == 48 // batch_size


def test_datamodule_train_loader_is_shuffled_and_seeded(tokenizer):
    dm = make_datamodule(tokenizer, batching={"batch_size": 48})
    first = next(iter(dm.train_dataloader()))["input_ids"]
    in_order = KTOCollator(PAD)(dm.train_set.examples)["input_ids"]
    assert not torch.equal(first, in_order)
    # Same seed, fresh data module: the same order.
    twin = make_datamodule(tokenizer, batching={"batch_size": 48})
    assert torch.equal(first, next(iter(twin.train_dataloader()))["input_ids"])
    # The order is a function of (seed, epoch), so a resumed run can replay it exactly:
    # the same epoch gives the same order, the next epoch another.
    loader = dm.train_dataloader()
    assert torch.equal(first, next(iter(loader))["input_ids"])
    loader.sampler.set_epoch(1)
    assert not torch.equal(first, next(iter(loader))["input_ids"])


def _indices(batches) -> list[list[int]]:
    return [batch["index"].tolist() for batch in batches]


def test_datamodule_state_resumes_the_train_order_after_the_last_batch(tokenizer):
    # Epoch 1 of 12 batches; a checkpoint after the 5th. Lightning sets the epoch (again) after
    # restoring, before the first batch; the resumed loader gives exactly the 7 batches left.
    whole = make_datamodule(tokenizer).train_dataloader()
    whole.sampler.set_epoch(1)
    order = _indices(whole)
    run = make_datamodule(tokenizer)
    loader = run.train_dataloader()
    loader.sampler.set_epoch(1)
    batches = iter(loader)
    assert _indices(next(batches) for _ in range(5)) == order[:5]
    state = run.state_dict()
    assert state == {"train_order": {"epoch": 1, "samples_seen": 20}}

    restored_first = make_datamodule(tokenizer)  # restored, then the loader built
    restored_first.load_state_dict(state)
    resumed = restored_first.train_dataloader()
    resumed.sampler.set_epoch(1)
    assert _indices(resumed) == order[5:]

    built_first = make_datamodule(tokenizer)  # loader and iterator made, then restored
    early = built_first.train_dataloader()
    iterator = iter(early)
    built_first.load_state_dict(state)
    early.sampler.set_epoch(1)
    assert _indices(iterator) == order[5:]


def test_datamodule_cannot_apply_a_position_to_an_order_already_drawn(tokenizer):
    dm = make_datamodule(tokenizer)
    next(iter(dm.train_dataloader()))  # as worker processes do when the iterator is made
    with pytest.raises(ConfigError, match=r"data\.batching\.num_workers=0"):
        dm.load_state_dict({"train_order": {"epoch": 0, "samples_seen": 8}})


def test_settings_groups_accept_mappings_and_name_an_unknown_key(tokenizer):
    from omegaconf import OmegaConf

    from kto_lightning.data import Batching, Lengths

    dm = KTODataModule(
        tokenizer,
        lengths=Lengths(max_length=64, max_prompt_length=32),
        batching=OmegaConf.create({"batch_size": 3}),
    )
    assert (dm.lengths.max_length, dm.batching, dm.source.path) == (64, Batching(3), "toy")
    with pytest.raises(ConfigError, match=r"data\.batching\.batch_sise is not a setting"):
        KTODataModule(tokenizer, batching={"batch_sise": 3})


def test_datamodule_val_loader_keeps_order_and_eval_batch_size(tokenizer):
    dm = make_datamodule(tokenizer, batching={"eval_batch_size": 5})
    batches = list(dm.val_dataloader())
    assert [len(b["labels"]) for b in batches] == [5, 5, 2]
    labels = torch.cat([b["labels"] for b in batches]).tolist()
    assert labels == [e.label for e in dm.val_set.examples]


def test_datamodule_jsonl_source(tokenizer, tmp_path):
    path = numbered_rows(tmp_path / "rows.jsonl", 20)
    dm = make_datamodule(tokenizer, source={"path": str(path), "val_fraction": 0.1})
    assert len(dm.train_set) == 18
    assert len(dm.val_set) == 2
    example = dm.train_set.examples[0]
    assert example.prompt_ids[0] == BOS
    assert example.completion_ids[-1] == EOS
    assert tokenizer.decode(example.prompt_ids, skip_special_tokens=True).startswith("Question ")


def test_datamodule_val_source(tokenizer, tmp_path):
    train = numbered_rows(tmp_path / "train.jsonl", 10)
    val = numbered_rows(tmp_path / "val.jsonl", 4, start=100)
    dm = make_datamodule(
        tokenizer, source={"path": str(train), "val_path": str(val), "val_fraction": 0.0}
    )
    assert sorted(decoded_prompts(dm.train_set, tokenizer)) == sorted(
        f"Question {i}?" for i in range(10)
    )
    assert decoded_prompts(dm.val_set, tokenizer) == [f"Question {i}?" for i in range(100, 104)]


def test_datamodule_without_kl_rows(tokenizer, tmp_path):
    train = numbered_rows(tmp_path / "train.jsonl", 10)
    val = numbered_rows(tmp_path / "val.jsonl", 1, start=100)
    # One validation row cannot be paired, but without KL rows it need not be.
    dm = make_datamodule(
        tokenizer, source={"path": str(train), "val_path": str(val)}, needs_kl_rows=False
    )
    batch = next(iter(dm.train_dataloader()))
    assert not any(key.startswith("kl_") for key in batch)
    assert len(dm.val_set) == 1


def test_datamodule_kl_pairing_error_names_the_validation_source(tokenizer, tmp_path):
    train = numbered_rows(tmp_path / "train.jsonl", 10)
    val = numbered_rows(tmp_path / "val.jsonl", 1, start=100)
    with pytest.raises(DataError, match="at least 2 rows, got 1") as info:
        make_datamodule(tokenizer, source={"path": str(train), "val_path": str(val)})
    assert str(info.value).startswith(f"{val}: ")


def test_datamodule_too_few_rows_to_split(tokenizer, tmp_path):
    path = numbered_rows(tmp_path / "rows.jsonl", 2)
    with pytest.raises(DataError, match=r"data\.source\.val_fraction") as info:
        make_datamodule(tokenizer, source={"path": str(path), "val_fraction": 0.5})
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("group", "overrides", "key"),
    [
        ("source", {"val_fraction": 0.0}, "data.source.val_fraction"),
        ("source", {"val_fraction": 1.0}, "data.source.val_fraction"),
        ("source", {"val_fraction": -0.1}, "data.source.val_fraction"),
        ("batching", {"batch_size": 0}, "data.batching.batch_size"),
        ("batching", {"eval_batch_size": 0}, "data.batching.eval_batch_size"),
        ("lengths", {"max_prompt_length": 96}, "data.lengths.max_prompt_length"),
        ("lengths", {"max_length": 1, "max_prompt_length": 1}, "data.lengths.max_length"),
    ],
)
def test_datamodule_bad_settings_name_the_key(tokenizer, group, overrides, key):
    settings = {
        "source": {"path": "toy"},
        "lengths": {"max_length": 96, "max_prompt_length": 48},
    }
    settings[group] = {**settings.get(group, {}), **overrides}
    with pytest.raises(ConfigError, match=key):
        KTODataModule(tokenizer, **settings)


def test_datamodule_missing_source_file(tokenizer, tmp_path):
    path = tmp_path / "missing.jsonl"
    dm = KTODataModule(tokenizer, source={"path": str(path)})
    with pytest.raises(DataError, match="not found"):
        dm.setup("fit")


def test_datamodule_label_counts_and_summary(tokenizer, tmp_path):
    train = numbered_rows(tmp_path / "train.jsonl", 10)  # labels 0, 1, 0, ...: 5 of each
    val = numbered_rows(tmp_path / "val.jsonl", 4, start=100)
    dm = make_datamodule(tokenizer, source={"path": str(train), "val_path": str(val)})
    assert dm.label_counts == (5, 5)
    summary = dm.summaries["train"]
    assert (summary.format, summary.conversational) == ("unpaired", False)
    assert (summary.rows_read, summary.kept, summary.dropped) == (10, 10, {})
    assert (dm.summaries["validation"].desirable, dm.summaries["validation"].undesirable) == (2, 2)
    assert sorted(dm.train_set.labels) == [False] * 5 + [True] * 5


# ------------------------------------------------------------------------------------ bad input
# What a user's data can get wrong, as setup() reports it.


def chat_rows(path: Path, count: int, start: int = 0) -> Path:
    return write_lines(
        path,
        [
            json.dumps(
                {
                    "prompt": [{"role": "user", "content": f"Question {i}?"}],
                    "completion": [{"role": "assistant", "content": f"Answer {i % 7}."}],
                    "label": i % 2 == 0,
                }
            )
            for i in range(start, start + count)
        ],
    )


def test_datamodule_conversations_need_a_chat_template(tmp_path):
    path = chat_rows(tmp_path / "chat.jsonl", 10)
    plain = byte_level_tokenizer()
    plain.chat_template = None
    with pytest.raises(DataError) as info:
        make_datamodule(plain, source={"path": str(path)})
    message = str(info.value)
    assert str(path) in message
    assert "no chat template" in message
    assert "data.columns.chat_template" in message
    # data.columns.chat_template supplies one.
    fixed = byte_level_tokenizer()
    fixed.chat_template = None
    dm = make_datamodule(
        fixed, source={"path": str(path)}, columns={"chat_template": BYTE_CHAT_TEMPLATE}
    )
    assert dm.summaries["train"].conversational
    example = dm.train_set.examples[0]
    assert tokenizer_text(fixed, example.prompt_ids).startswith("<user>\nQuestion ")
    assert tokenizer_text(fixed, example.prompt_ids).endswith("?\n<assistant>\n")


def tokenizer_text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_datamodule_fewer_rows_than_one_batch(tokenizer, tmp_path):
    path = numbered_rows(tmp_path / "rows.jsonl", 10)  # 8 training rows after the split
    with pytest.raises(DataError) as info:
        make_datamodule(
            tokenizer, source={"path": str(path), "val_fraction": 0.2}, batching={"batch_size": 9}
        )
    message = str(info.value)
    assert str(path) in message
    assert "8 training rows are fewer than one batch" in message
    assert "data.batching.batch_size=9" in message
    make_datamodule(
        tokenizer, source={"path": str(path), "val_fraction": 0.2}, batching={"batch_size": 8}
    )  # exactly one


def test_datamodule_single_class_data_trains_with_a_warning(tokenizer, tmp_path, caplog):
    path = write_lines(
        tmp_path / "rows.jsonl", [record(f"Q{i}?", f"A{i}.", True) for i in range(10)]
    )
    with caplog.at_level(logging.WARNING, logger="kto_lightning"):
        dm = make_datamodule(tokenizer, source={"path": str(path)})
    assert dm.label_counts == (8, 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("train set has no undesirable rows" in w for w in warnings), warnings
    assert any("validation set has no undesirable rows" in w for w in warnings), warnings


def test_datamodule_long_prompt_is_cut_from_the_left_with_a_warning(tokenizer, tmp_path, caplog):
    long_prompt = "".join(f"{i:03d}" for i in range(40))  # 120 bytes, more than max_length
    train = write_lines(
        tmp_path / "train.jsonl",
        [record(long_prompt, "end.", 1)] + [record(f"Q{i}?", f"A{i}.", i % 2) for i in range(7)],
    )
    val = numbered_rows(tmp_path / "val.jsonl", 4, start=100)
    with caplog.at_level(logging.WARNING, logger="kto_lightning"):
        dm = make_datamodule(
            tokenizer,
            source={"path": str(train), "val_path": str(val)},
            lengths={"max_length": 64, "max_prompt_length": 16},
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    cut_warning = (
        "train set: 1 prompt(s) longer than data.lengths.max_prompt_length=16 were cut "
        "from the left"
    )
    assert any(cut_warning in w for w in warnings), warnings
    assert dm.summaries["train"].prompts_truncated == 1
    assert dm.summaries["validation"].prompts_truncated == 0
    cut = [e for e in dm.train_set.examples if e.completion_ids == [*b("end."), EOS]]
    assert len(cut) == 1
    # BOS stays in front of the prompt's last 15 bytes.
    assert cut[0].prompt_ids == [BOS, *b(long_prompt)[-15:]]


def test_datamodule_bad_row_names_the_file_and_row(tokenizer, tmp_path):
    rows = [record(f"Q{i}", f"A{i}", i % 2) for i in range(10)]
    rows[6] = record("Q6", "A6", "maybe")
    train = write_lines(tmp_path / "train.jsonl", rows)
    val = numbered_rows(tmp_path / "val.jsonl", 4, start=100)
    with pytest.raises(DataError, match=f"{train}, row 7, column 'label'"):
        make_datamodule(tokenizer, source={"path": str(train), "val_path": str(val)})


def test_datamodule_bad_row_in_a_held_out_split_names_the_file_row(tokenizer, tmp_path):
    rows = [record(f"Q{i}", f"A{i}", i % 2) for i in range(20)]
    rows[6] = record("Q6", "A6", "maybe")
    path = write_lines(tmp_path / "rows.jsonl", rows)
    for seed in range(3):
        with pytest.raises(DataError, match=r", row 7, column 'label'"):
            make_datamodule(tokenizer, source={"path": str(path), "val_fraction": 0.25}, seed=seed)


# ------------------------------------------------------------------------------------ caching
# Tokenized splits are cached beside the source's datasets cache, keyed on the rows, the
# tokenizer and the length settings.


def tokenization(dm: KTODataModule) -> tuple[str, str]:
    return dm.summaries["train"].tokenization, dm.summaries["validation"].tokenization


def test_datamodule_tokenization_is_cached_and_keyed_on_settings_and_content(tokenizer, tmp_path):
    path = numbered_rows(tmp_path / "rows.jsonl", 20)
    first = make_datamodule(tokenizer, source={"path": str(path)})
    assert tokenization(first) == ("computed", "computed")
    again = make_datamodule(tokenizer, source={"path": str(path)})
    assert tokenization(again) == ("cached", "cached")
    assert again.train_set.examples == first.train_set.examples
    assert again.val_set.examples == first.val_set.examples
    longer = make_datamodule(tokenizer, source={"path": str(path)}, lengths={"max_length": 97})
    assert tokenization(longer) == ("computed", "computed")
    shorter_prompts = make_datamodule(
        tokenizer, source={"path": str(path)}, lengths={"max_prompt_length": 47}
    )
    assert tokenization(shorter_prompts) == ("computed", "computed")
    numbered_rows(path, 20, start=1)  # new content, same path
    edited = make_datamodule(tokenizer, source={"path": str(path)})
    assert tokenization(edited) == ("computed", "computed")
    assert decoded_prompts(edited.train_set, tokenizer) != decoded_prompts(
        first.train_set, tokenizer
    )


def test_datamodule_tokenization_cache_is_keyed_on_the_chat_template(tmp_path):
    path = chat_rows(tmp_path / "chat.jsonl", 20)
    first = make_datamodule(byte_level_tokenizer(), source={"path": str(path)})
    assert tokenization(first) == ("computed", "computed")
    assert tokenization(make_datamodule(byte_level_tokenizer(), source={"path": str(path)})) == (
        "cached",
        "cached",
    )
    # Role headers in [brackets] instead of <angle brackets>, the generation prompt included.
    other_template = BYTE_CHAT_TEMPLATE.replace(
        "'<' + message['role'] + '>", "'[' + message['role'] + ']"
    ).replace("'<assistant>", "'[assistant]")
    assert "'<" not in other_template
    other = make_datamodule(
        byte_level_tokenizer(),
        source={"path": str(path)},
        columns={"chat_template": other_template},
    )
    assert tokenization(other) == ("computed", "computed")
    prompt = tokenizer_text(byte_level_tokenizer(), other.train_set.examples[0].prompt_ids)
    assert prompt.startswith("[user]\n")


def test_datamodule_toy_task_is_tokenized_in_memory(tokenizer):
    assert tokenization(make_datamodule(tokenizer)) == ("in memory", "in memory")


def test_datamodule_num_proc_gives_the_same_examples(tokenizer, tmp_path):
    path = numbered_rows(tmp_path / "rows.jsonl", 40)
    serial = make_datamodule(
        tokenizer, source={"path": str(path), "cache_dir": str(tmp_path / "serial")}
    )
    parallel = make_datamodule(
        tokenizer,
        source={"path": str(path), "cache_dir": str(tmp_path / "parallel"), "num_proc": 2},
    )
    # A fresh cache folder: the two processes really tokenized.
    assert tokenization(parallel) == ("computed", "computed")
    assert parallel.train_set.examples == serial.train_set.examples
    assert parallel.val_set.examples == serial.val_set.examples


def test_datamodule_caches_the_kl_pairing_per_seed(tokenizer, tmp_path):
    path = numbered_rows(tmp_path / "rows.jsonl", 40)
    source = {"path": str(path), "cache_dir": str(tmp_path / "cache")}
    first = make_datamodule(tokenizer, source=source)
    files = sorted((tmp_path / "cache").rglob("kl-partners-*.npy"))
    assert len(files) == 2  # training and validation rows
    again = make_datamodule(tokenizer, source=source)
    assert sorted((tmp_path / "cache").rglob("kl-partners-*.npy")) == files  # read back
    assert again.train_set.examples == first.train_set.examples
    make_datamodule(tokenizer, source=source, seed=43)
    assert len(list((tmp_path / "cache").rglob("kl-partners-*.npy"))) > 2


_PREPARE_WHEN_BOTH_READY = """
import json, sys, time
from pathlib import Path
from kto_lightning.models.byte_tokenizer import byte_level_tokenizer
from kto_lightning.data import KTODataModule

path, cache, me, other = sys.argv[1:]
Path(me).touch()
while not Path(other).exists():  # both processes start preparing together
    time.sleep(0.01)
data = KTODataModule(byte_level_tokenizer(), source={"path": path, "cache_dir": cache})
data.setup("fit")
examples = [(e.prompt_ids, e.completion_ids, e.kl_completion_ids) for e in data.train_set.examples]
print(json.dumps([data.summaries["train"].tokenization, examples]))
"""


def test_processes_preparing_the_same_data_together_tokenize_it_once(tmp_path):
    # DDP ranks (torchrun starts them together) or sweep jobs on one machine: one process
    # tokenizes and pairs, the other waits for its lock, then reads the cache.
    path = numbered_rows(tmp_path / "rows.jsonl", 20_000)  # a second or so to tokenize
    ready = [tmp_path / "ready-0", tmp_path / "ready-1"]
    cmd = [sys.executable, "-c", _PREPARE_WHEN_BOTH_READY, str(path), str(tmp_path / "cache")]
    procs = [
        subprocess.Popen(
            [*cmd, str(ready[i]), str(ready[1 - i])], stdout=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    results = [json.loads(p.communicate(timeout=120)[0].splitlines()[-1]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(r[0] for r in results) == ["cached", "computed"]
    assert results[0][1] == results[1][1]  # the same rows and KL partners
    assert len(list((tmp_path / "cache").rglob("kl-partners-*.npy"))) == 2  # train, validation


def test_unset_num_proc_uses_every_cpu_from_20k_rows(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(12)), raising=False)
    unset = Source(path="rows.jsonl")
    assert unset.processes_for(19_999) is None
    assert unset.processes_for(20_000) == 8  # at most 8
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert unset.processes_for(10**6) is None  # one CPU: no pool
    assert Source(path="rows.jsonl", num_proc=3).processes_for(10) == 3  # set: as set


def test_datamodule_num_proc_errors_name_the_row_of_the_file(tokenizer, tmp_path):
    rows = [record(f"Q{i}", f"A{i}", str(i % 2)) for i in range(20)]
    rows[15] = record("Q15", "A15", "maybe")  # in the second process's half
    train = write_lines(tmp_path / "train.jsonl", rows)
    val = numbered_rows(tmp_path / "val.jsonl", 4, start=100)
    with pytest.raises(DataError, match=f"{train}, row 16, column 'label'"):
        make_datamodule(tokenizer, source={"path": str(train), "val_path": str(val), "num_proc": 2})


# ------------------------------------------------------------------------------------ toy task


def test_toy_rows_are_balanced():
    for count in (100, 101):
        rows = toy_rows(count, seed=0)
        assert len(rows) == count
        assert sum(r["label"] for r in rows) == (count + 1) // 2


def test_toy_rows_are_deterministic_per_seed():
    assert toy_rows(50, seed=1) == toy_rows(50, seed=1)
    assert toy_rows(50, seed=1) != toy_rows(50, seed=2)


def test_toy_desirable_and_undesirable_completions_are_disjoint():
    rows = toy_rows(600, seed=0)
    desirable = {r["completion"] for r in rows if r["label"]}
    undesirable = {r["completion"] for r in rows if not r["label"]}
    assert desirable.isdisjoint(undesirable)
    assert len(desirable) > 10
    assert len(undesirable) > 10


def test_toy_rows_are_valid_rows():
    for row in toy_rows(40, seed=3):
        assert set(row) == {"prompt", "completion", "label"}
        assert isinstance(row["label"], bool)
        Row(**row)
        assert row["prompt"].strip()
        assert row["completion"].strip()


def test_kl_partner_has_another_prompt_where_one_exists():
    # Paired data: two rows per prompt, with different completions. A row's partner must answer
    # another prompt, although the other reply to its own prompt differs from its completion.
    examples = [ex([BOS, i // 2], [i, EOS], i % 2 == 0) for i in range(40)]
    for seed in range(5):
        prompts, completions = (
            [e.prompt_ids for e in examples],
            [e.completion_ids for e in examples],
        )
        for i, j in enumerate(kl_partners(prompts, completions, 64, seed)):
            assert examples[j].prompt_ids != examples[i].prompt_ids


def test_kl_pairing_guarantees_hold_on_many_rows_with_duplicates():
    rng = random.Random(0)
    prompts = [[BOS, rng.randrange(30)] for _ in range(3000)]
    completions = [[rng.randrange(20)] * rng.randint(1, 6) + [EOS] for _ in range(3000)]
    max_length = 6
    first = kl_partners(prompts, completions, max_length, seed=11)
    assert kl_partners(prompts, completions, max_length, seed=11) == first
    assert kl_partners(prompts, completions, max_length, seed=12) != first
    for i, j in enumerate(first):
        own = fit_beside(len(prompts[i]), completions[i], max_length)
        assert fit_beside(len(prompts[i]), completions[j], max_length) != own
        assert prompts[j] != prompts[i]  # 30 prompts: another one always exists


def test_token_ids_from_arrow_and_take_match_the_lists():
    rows = [[1, 2, 3], [], [4], [5, 6]]
    chunked = pa.chunked_array([pa.array(rows[:2]), pa.array(rows[2:])])
    for ids in (TokenIds.from_arrow(chunked), TokenIds.from_arrow(pa.array(rows).slice(1))):
        expected = rows if len(ids.lengths) == 4 else rows[1:]
        bounds = zip(ids.offsets[:-1], ids.offsets[1:], strict=True)
        got = [ids.values[a:b].tolist() for a, b in bounds]
        assert got == expected
    taken = TokenIds.from_lists(rows).take(np.array([3, 0]))
    assert taken.values.tolist() == [5, 6, 1, 2, 3]
    assert taken.offsets.tolist() == [0, 2, 5]


def test_kl_pairing_of_arrow_columns_equals_the_pairing_of_lists():
    # The data module pairs from the tokenized Arrow columns, in chunks, fetching tokens only
    # where a cut must be compared (max_length 6 cuts most completions here).
    rng = random.Random(1)
    prompts = [[BOS, rng.randrange(30)] for _ in range(500)]
    completions = [[rng.randrange(20)] * rng.randint(1, 6) + [EOS] for _ in range(500)]

    def column(rows):
        int32 = pa.list_(pa.int32())
        return pa.chunked_array([pa.array(rows[:123], int32), pa.array(rows[123:], int32)])

    keep = np.arange(0, 500, 3)
    digests = RowDigest.of_arrow(column(prompts)), RowDigest.of_arrow(column(completions))
    got = cached_kl_partners(*digests, keep, 6, 5, ("rows",), None)
    lists = TokenIds.from_lists(prompts), TokenIds.from_lists(completions)
    expected = kl_partners_of(lists[0].take(keep), lists[1].take(keep), 6, 5)
    assert got.tolist() == expected.tolist()
    assert digests[1].take(keep).ids(np.array([2, 0])).values.tolist() == [
        *completions[6],
        *completions[0],
    ]


def test_cached_kl_partners_are_keyed_by_seed_and_lengths(tmp_path):
    prompts = TokenIds.from_lists([[BOS, i] for i in range(50)])
    completions = TokenIds.from_lists([[i, i + 1, EOS] for i in range(50)])
    keep = np.arange(0, 50, 2)
    args = (prompts, completions, keep)
    first = cached_kl_partners(*args, 64, 0, ("tokenized",), tmp_path)
    assert len(list(tmp_path.glob("kl-partners-*.npy"))) == 1
    # The pairing of the kept rows alone, read back from the file on the second call.
    subset = kl_partners_of(prompts.take(keep), completions.take(keep), 64, 0)
    assert first.tolist() == subset.tolist()
    assert cached_kl_partners(*args, 64, 0, ("tokenized",), tmp_path).tolist() == first.tolist()
    cached_kl_partners(*args, 64, 1, ("tokenized",), tmp_path)
    cached_kl_partners(*args, 32, 0, ("tokenized",), tmp_path)
    cached_kl_partners(*args, 64, 0, ("other rows",), tmp_path)
    assert len(list(tmp_path.glob("kl-partners-*.npy"))) == 4
