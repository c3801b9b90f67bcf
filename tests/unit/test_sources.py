"""Tests for kto_lightning.data.sources: reading local files and hub datasets, and their errors."""

from __future__ import annotations

import json
import time

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kto_lightning.data.sources import load_source
from kto_lightning.errors import DataError

ROWS = [
    {"prompt": "Q1", "completion": "A1", "label": True},
    {"prompt": "Q2", "completion": "A2", "label": False},
]


# ------------------------------------------------------------------------------------ hub names


def test_hub_name_offline_and_not_cached_fails_at_once_naming_the_key(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        load_source("some-org/some-dataset")
    assert time.monotonic() - start < 10  # no network retries
    message = str(info.value)
    assert "data.source.path='some-org/some-dataset'" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "not in the datasets cache" in message


def test_hub_name_offline_leaves_the_datasets_offline_flag_as_it_was(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = datasets.config.HF_HUB_OFFLINE
    with pytest.raises(DataError):
        load_source("some-org/some-dataset")
    after = datasets.config.HF_HUB_OFFLINE
    assert after == before


# ------------------------------------------------------------------------------------ local files


def test_each_file_type_reads_the_same_rows(tmp_path):
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    array = tmp_path / "rows.json"
    array.write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    csv = tmp_path / "rows.csv"
    pd.DataFrame(ROWS).to_csv(csv, index=False)
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), parquet)
    for path in (jsonl, array, csv, parquet):
        assert load_source(str(path)).to_list() == ROWS, path.name


def test_unsupported_extension_names_the_file_and_the_supported_types(tmp_path):
    path = tmp_path / "rows.txt"
    path.write_text("Q1\tA1\t1\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_source(str(path))
    message = str(info.value)
    assert f"{path}: unsupported file type '.txt'" in message
    assert "['.csv', '.json', '.jsonl', '.parquet']" in message


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.parquet", "no/such/folder/rows"])
def test_missing_file_names_the_path(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(DataError, match="data file not found") as info:
        load_source(str(path))
    assert str(path) in str(info.value)


def test_a_folder_is_named_with_a_file_to_pick(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": "b", "label": true}\n')
    with pytest.raises(DataError) as info:
        load_source(str(tmp_path))
    assert str(info.value) == (
        f"{tmp_path} is a folder; name one data file (.csv, .json, .jsonl, .parquet) in it, "
        f"e.g. {tmp_path / 'train.jsonl'}"
    )


@pytest.mark.parametrize("source", ["./data/missing", "~/no-such-kto-dir/rows", "a/b/c"])
def test_path_looking_names_are_read_as_paths_not_hub_names(source):
    # Not a hub lookup (which would say HF_HUB_OFFLINE): these cannot be hub ids.
    with pytest.raises(DataError, match="data file not found") as info:
        load_source(source)
    assert source.lstrip("./~") in str(info.value)
    assert "HF_HUB_OFFLINE" not in str(info.value)


def test_non_utf8_csv_names_the_line(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes("prompt,completion,label\nQ1,A1,1\ncaf\u00e9,A2,0\n".encode("latin-1"))
    with pytest.raises(DataError, match="line 3: bytes that are not UTF-8") as info:
        load_source(str(path))
    assert str(path) in str(info.value)


def test_non_utf8_byte_past_the_first_read_chunk_names_its_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    line = json.dumps({"prompt": "x" * 1000, "completion": "A", "label": 1}) + "\n"
    count = (1 << 20) // len(line) + 10  # the bad byte lies in the second 1 MiB chunk
    path.write_bytes(line.encode() * count + b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=f"line {count + 1}: bytes that are not UTF-8"):
        load_source(str(path))


@pytest.mark.parametrize(
    ("name", "content"),
    [("rows.jsonl", ""), ("rows.jsonl", "\n \n"), ("rows.csv", ""), ("rows.json", "  ")],
)
def test_empty_text_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="the file is empty") as info:
        load_source(str(path))
    assert str(path) in str(info.value)


def test_files_with_a_header_or_schema_but_no_rows(tmp_path):
    csv = tmp_path / "header.csv"
    csv.write_text("prompt,completion,label\n", encoding="utf-8")
    parquet = tmp_path / "schema.parquet"
    schema = pa.schema(
        [("prompt", pa.string()), ("completion", pa.string()), ("label", pa.bool_())]
    )
    pq.write_table(schema.empty_table(), parquet)
    array = tmp_path / "empty.json"
    array.write_text("[]", encoding="utf-8")
    for path in (csv, parquet, array):
        with pytest.raises(DataError, match=f"{path}: the file holds no rows"):
            load_source(str(path))


def test_malformed_json_array_names_the_line_of_the_error(tmp_path):
    path = tmp_path / "rows.json"
    lines = json.dumps(ROWS, indent=2).splitlines()
    bad = next(i for i, line in enumerate(lines) if '"A2"' in line)
    lines[bad] = lines[bad].replace('"A2"', '"A2",,')
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=f"{path}, line {bad + 1}: malformed JSON"):
        load_source(str(path))


def test_json_array_item_that_is_not_an_object(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([ROWS[0], 3]), encoding="utf-8")
    with pytest.raises(DataError, match="item 2 of the JSON array: expected a JSON object, got 3"):
        load_source(str(path))


def test_unreadable_csv_and_parquet_say_which_reader_failed(tmp_path):
    csv = tmp_path / "ragged.csv"
    csv.write_text("prompt,completion,label\nQ1,A1,1\nQ2,A2,0,extra\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"{csv}: cannot be read as csv"):
        load_source(str(csv))
    parquet = tmp_path / "broken.parquet"
    parquet.write_bytes(b"not a parquet file")
    with pytest.raises(DataError, match=f"{parquet}: cannot be read as parquet"):
        load_source(str(parquet))
