"""Issue 19, items 8, 11 and 12: settings that were ignored or replaced without a word, messages
that pointed at the wrong fix, and tools that overwrote files silently.

Each test drives the module a user's input reaches (the data readers, the model loaders, the
tools' `main`) in this process, and asserts the message that now names what happened and what to
set, or the file left as it was.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import LlamaForCausalLM

from kto_lightning import export, generate
from kto_lightning.cli import generation
from kto_lightning.cli.arguments import parse
from kto_lightning.cli.config_files import config_dir
from kto_lightning.cli.evaluation import evaluate
from kto_lightning.cli.evaluation_target import refuse_guessed_run, resolve_target
from kto_lightning.cli.generate_options import GenerateOptions
from kto_lightning.core import packing
from kto_lightning.core.packing import pack_rows
from kto_lightning.data.config import Columns, Source
from kto_lightning.data.formats import DROPPED_SAME_PAIR
from kto_lightning.data.sources import load_local
from kto_lightning.data.splits import read_splits
from kto_lightning.errors import ConfigError, DataError, ModelLoadError
from kto_lightning.models import Pretrained, TinyLlama, check_context_window
from kto_lightning.models.byte_tokenizer import byte_level_tokenizer


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _unpaired(n: int) -> list[dict]:
    return [
        {"prompt": f"question {i}", "completion": f"answer number {i}", "label": i % 2 == 0}
        for i in range(n)
    ]


# ------------------------------------------------------------------ 8: settings ignored


def test_label_null_on_a_file_with_labels_is_refused_naming_the_row_and_the_key(tmp_path) -> None:
    path = _jsonl(tmp_path / "rows.jsonl", _unpaired(6))
    with pytest.raises(DataError) as info:
        read_splits(Source(path=str(path)), Columns(label=None), seed=0)
    message = str(info.value)
    # Row 2 is the first undesirable one: it would have been trained as desirable.
    assert f"{path}, row 2, column 'label'" in message
    assert "data.columns.label=null reads every row as desirable" in message
    assert "set data.columns.label=label" in message and "remove the 'label' column" in message
    # A label column that marks every row desirable changes nothing: read as before.
    every_row = [{**row, "label": True} for row in _unpaired(6)]
    _jsonl(path, every_row)
    train, val = read_splits(Source(path=str(path)), Columns(label=None), seed=0)
    assert len(train.rows) + len(val.rows) == 6


def test_pairs_whose_completions_are_the_same_are_dropped_and_counted(tmp_path, caplog) -> None:
    pairs = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10)]
    for i in (1, 4, 7):  # same completion on both sides: neither is better
        pairs[i]["rejected"] = pairs[i]["chosen"]
    path = _jsonl(tmp_path / "pairs.jsonl", pairs)
    with caplog.at_level(logging.WARNING):
        train, val = read_splits(Source(path=str(path), val_fraction=0.3), Columns(), seed=0)
    kept = train.rows.to_list() + val.rows.to_list()
    assert len(kept) == 2 * 7
    assert {row["row"] for row in kept} == set(range(10)) - {1, 4, 7}
    assert all(row["completion"] != f"good {i}" or row["label"] for i in (1, 4, 7) for row in kept)
    # The count, per split, for the data summary: the held-out rows included.
    dropped = train.dropped.get(DROPPED_SAME_PAIR, 0) + val.dropped.get(DROPPED_SAME_PAIR, 0)
    assert dropped == 3
    assert train.rows_read + val.rows_read == 10
    assert f"{path}: 3 of 10 pair(s) dropped" in caplog.text
    assert "'chosen' and 'rejected' completions are the same" in caplog.text


@pytest.mark.parametrize("how", ["val_path", "val_split"])
def test_validation_on_the_training_rows_is_refused_naming_both_keys(tmp_path, how) -> None:
    path = _jsonl(tmp_path / "rows.jsonl", _unpaired(8))
    if how == "val_path":  # the same file, spelt another way
        source = Source(path=str(path), val_path=str(tmp_path / "." / "rows.jsonl"))
        keys = "data.source.val_path="
    else:
        source = Source(path=str(path), val_split="train")
        keys = "data.source.val_split='train' is data.source.split"
    with pytest.raises(ConfigError) as info:
        read_splits(source, Columns(), seed=0)
    message = str(info.value)
    assert (
        keys in message and "validation would score the very rows training learns from" in message
    )
    assert f"data.source.val_fraction={source.val_fraction:g}" in message  # the share held out
    # Another file is fine.
    other = _jsonl(tmp_path / "val.jsonl", _unpaired(4))
    train, val = read_splits(Source(path=str(path), val_path=str(other)), Columns(), seed=0)
    assert (len(train.rows), len(val.rows)) == (8, 4)


def test_a_pack_budget_below_the_longest_row_is_raised_with_a_warning(caplog, monkeypatch) -> None:
    monkeypatch.setattr(packing, "_RAISED", set())  # as in a new process
    lengths = [40, 90, 20]  # rows of 90 tokens cannot fit packs of 64
    mask = torch.zeros(3, 90, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    ids = torch.arange(3 * 90).view(3, 90) % 250 + 1
    with caplog.at_level(logging.WARNING):
        packed = pack_rows(ids, mask, mask, budget=64)
        pack_rows(ids, mask, mask, budget=64)  # reported once, not at every batch
    assert packed.input_ids.shape[1] == 90  # the value used: the longest row
    warnings = [r.getMessage() for r in caplog.records if "max_tokens_per_pack" in r.getMessage()]
    assert len(warnings) == 1
    assert "data.batching.max_tokens_per_pack=64 is below a row of 90 tokens" in warnings[0]
    assert "data.lengths.max_length" in warnings[0]


def test_rows_past_a_rotary_models_positions_are_refused(caplog) -> None:
    # A Llama (rotary positions, no table) whose positions end at 64: nothing fails at run time.
    model = LlamaForCausalLM(TinyLlama(hidden_size=16, num_layers=1, max_seq_len=64).config())
    with pytest.raises(ConfigError) as info:
        check_context_window(model, 128, "data.lengths.max_length", longest=100)
    message = str(info.value)
    assert "the longest row holds 100 tokens (data.lengths.max_length=128)" in message
    assert "positions end at 64 (max_position_embeddings" in message
    assert "model.max_seq_len" in message and "Set data.lengths.max_length=64" in message
    check_context_window(model, 128, "data.lengths.max_length", longest=64)  # rows that fit
    # Without the rows' lengths, a budget that admits longer rows is a warning.
    with caplog.at_level(logging.WARNING):
        check_context_window(model, 128, "data.lengths.max_length")
    assert "data.lengths.max_length=128 admits rows longer than the model's context" in caplog.text


def _copied_hf_model(folder: Path) -> Path:
    """A tiny exported policy, as `<run>/hf_model` copied to a folder of no run."""
    torch.manual_seed(0)
    LlamaForCausalLM(TinyLlama(hidden_size=16, num_layers=1).config()).save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder


def test_an_hf_model_copied_out_of_its_run_must_name_its_reference_and_rows(tmp_path) -> None:
    folder = _copied_hf_model(tmp_path / "copied" / "hf_model")
    overrides = [f"ckpt_path={folder}", "data.source.toy_rows=160", "trainer.limit_val_batches=1"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("evaluate", overrides=[*overrides, f"paths.output_dir={tmp_path / 'eval'}"])
    with pytest.raises(ConfigError) as info:
        evaluate(cfg, overrides)
    message = str(info.value)
    assert "is a Hugging Face folder outside its run directory" in message
    assert "the reference would be model=TinyLlama under seed=42" in message
    assert "reference_model=" in message and "seed=<the run's seed>" in message
    assert "held out of data.source.path='toy' under seed=42" in message
    assert "data.source.test_path=" in message
    assert not (tmp_path / "eval" / "eval.json").exists()
    # Named, they are used: a reference model, and test rows (or the run's seed).
    target = resolve_target(str(folder))
    named = Source(test_path="test.jsonl")
    refuse_guessed_run(target, str(folder), cfg.model, named, 42, set())
    refuse_guessed_run(target, None, cfg.model, Source(), 7, {"model", "seed"})
    with pytest.raises(ConfigError, match="the rows would be held out") as info:
        refuse_guessed_run(target, str(folder), cfg.model, Source(), 42, set())
    assert "the reference would be" not in str(info.value)


# ------------------------------------------------------------------ 11: the right fix


def test_a_folder_that_is_not_a_model_says_so_not_sentencepiece(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    for load in (Pretrained(str(tmp_path)).load_tokenizer, Pretrained(str(tmp_path)).load_policy):
        with pytest.raises(ModelLoadError) as info:
            load()
        message = str(info.value)
        assert f"model.name_or_path={str(tmp_path)!r} is not a model folder" in message
        assert "sentencepiece" not in message
    # A model without its tokenizer: the key that names the tokenizer's folder.
    LlamaForCausalLM(TinyLlama(hidden_size=16, num_layers=1).config()).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"no tokenizer files.*model\.tokenizer_name_or_path"):
        Pretrained(str(tmp_path)).load_tokenizer()


def test_a_gzip_file_is_named_as_one_with_the_command_to_decompress_it(tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(gzip.compress(b'{"prompt": "a", "completion": "b", "label": true}\n'))
    with pytest.raises(DataError) as info:
        load_local(path)
    message = str(info.value)
    assert message.startswith(f"{path}: a gzip-compressed file, not .jsonl text")
    assert f"gunzip -c {path}" in message and "UTF-8" not in message


# ------------------------------------------------------------------ 12: no silent overwrite


def test_generate_refuses_an_existing_output_unless_overwrite(tmp_path, capsys) -> None:
    out = tmp_path / "generations.jsonl"
    out.write_text("earlier rows\n")
    args = [f"ckpt_path={tmp_path / 'any_model'}", "prompt=Hi", f"out={out}"]
    assert generate.main(args) == 1
    error = capsys.readouterr().err.strip()
    assert error == (
        f"error: out={str(out)!r} already exists; set overwrite=true to replace it, or name "
        "another file with out="
    )
    assert out.read_text() == "earlier rows\n"
    # overwrite=true lets it through (to the next check: here, the missing model).
    options = parse(GenerateOptions, [*args, "overwrite=true"], "generate")
    assert generation.output_file(options) == str(out)
    assert generate.main(["--help"]) == 0
    assert "overwrite=bool  (default: false)" in capsys.readouterr().out
    # A run directory's default output too.
    run = tmp_path / "run"
    (run / "hf_model").mkdir(parents=True)
    (run / "generations.jsonl").write_text("earlier rows\n")
    assert generate.main([f"ckpt_path={run}", "prompt=Hi"]) == 1
    assert "the default output" in capsys.readouterr().err


def test_export_refuses_a_folder_that_is_not_empty_unless_overwrite(tmp_path, capsys) -> None:
    out = tmp_path / "somebody_elses_model"
    out.mkdir()
    (out / "config.json").write_text('{"model_type": "theirs"}')
    ckpt = tmp_path / "last.ckpt"
    ckpt.write_bytes(b"not read before the folder is checked")
    assert export.main([f"ckpt_path={ckpt}", f"out={out}"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: out={str(out)!r} is not empty (it holds config.json)")
    assert "set overwrite=true" in error
    assert (out / "config.json").read_text() == '{"model_type": "theirs"}'
    # overwrite=true gets past the folder (to the checkpoint, unreadable here).
    assert export.main([f"ckpt_path={ckpt}", f"out={out}", "overwrite=true"]) == 1
    assert "could not read the checkpoint" in capsys.readouterr().err
    assert export.main(["--help"]) == 0
    assert "overwrite=bool  (default: false)" in capsys.readouterr().out
