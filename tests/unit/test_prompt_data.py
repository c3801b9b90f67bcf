"""Online KTO's prompt data (online/prompt_data.py): reading prompts and their fields as the offline
data reads rows, encoding them as offline training does, and batching them in the offline order."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import datasets
import pandas as pd
import pytest

from kto_lightning.data.config import Columns, Source
from kto_lightning.data.splits import read_splits
from kto_lightning.data.tokenize import encode, encode_prompts
from kto_lightning.data.toy import stated_object
from kto_lightning.errors import ConfigError, DataError
from kto_lightning.models.byte_tokenizer import byte_level_tokenizer
from kto_lightning.online.prompt_data import PromptDataModule, PromptRow, read_prompt_splits


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def numbered(count: int) -> list[dict]:
    """Rows whose prompts are all different, each with fields a reward function could read."""
    return [
        {"prompt": f"Question {i}?", "answer": str(i * 7), "tests": [i, i + 1]}
        for i in range(count)
    ]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def data_module(tokenizer, source: Source | dict, seed: int = 0, **kwargs) -> PromptDataModule:
    """A set-up PromptDataModule: 4 prompts a step unless `kwargs` says otherwise."""
    settings = {"prompts_per_step": 4, "max_prompt_length": 64, "seed": seed, **kwargs}
    dm = PromptDataModule(tokenizer, source, **settings)
    dm.setup("fit")
    return dm


def on_ranks(dm: PromptDataModule, world: int, rank: int) -> PromptDataModule:
    """`dm` as the process of rank `rank` of `world` sees it (the trainer is all it asks)."""
    dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
    return dm


def texts(rows: list[PromptRow]) -> list[str]:
    return [str(row.prompt) for row in rows]


def loaded(loader) -> list[list[str]]:
    return [texts(batch) for batch in loader]


# ---------------------------------------------------------------------------------------- reading


def test_jsonl_rows_keep_their_other_columns_as_fields(tokenizer, tmp_path):
    rows = numbered(20)
    dm = data_module(tokenizer, Source(str(write_jsonl(tmp_path / "p.jsonl", rows))))
    by_prompt = {row["prompt"]: row for row in rows}
    read = dm.train_rows + dm.val_rows
    assert sorted(texts(read)) == sorted(by_prompt)
    for row in read:
        assert row.fields == {"answer": by_prompt[row.prompt]["answer"],
                              "tests": by_prompt[row.prompt]["tests"]}  # fmt: skip
    assert [row.index for row in dm.train_rows] == list(range(len(dm.train_rows)))
    assert [row.index for row in dm.val_rows] == list(range(len(dm.val_rows)))


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_parquet_and_csv_files_are_read_with_their_fields(tokenizer, tmp_path, suffix):
    rows = [{"prompt": f"Say {i}.", "answer": f"{i}"} for i in range(10)]
    path = tmp_path / f"p{suffix}"
    if suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        pd.DataFrame(rows).to_csv(path, index=False)
    train, val = read_prompt_splits(Source(str(path), val_fraction=0.2), Columns(), seed=0)
    read = dict(zip(train.prompts + val.prompts, train.fields + val.fields, strict=True))
    # csv reads a column of digits as numbers, as the offline data reads it.
    answers = {prompt: str(fields["answer"]) for prompt, fields in read.items()}
    assert answers == {row["prompt"]: row["answer"] for row in rows}
    assert (len(train.prompts), len(val.prompts)) == (8, 2)


@pytest.mark.parametrize("as_dataset", [False, True])
def test_rows_in_memory_are_read_as_a_file_of_them(tokenizer, tmp_path, as_dataset):
    rows = numbered(12)
    in_memory = datasets.Dataset.from_list(rows) if as_dataset else rows
    from_memory = read_prompt_splits(Source(in_memory), Columns(), seed=3)
    from_file = read_prompt_splits(
        Source(str(write_jsonl(tmp_path / "p.jsonl", rows))), Columns(), seed=3
    )
    for memory, file in zip(from_memory, from_file, strict=True):
        assert (memory.prompts, memory.fields) == (file.prompts, file.fields)
    assert from_memory[1].name == "rows in memory (data.source.path) (held out)"


def test_a_custom_prompt_column_and_a_named_validation_file(tokenizer, tmp_path):
    train = [{"question": f"Q{i}", "answer": i} for i in range(6)]
    val = [{"question": f"V{i}", "answer": -i} for i in range(3)]
    source = Source(
        str(write_jsonl(tmp_path / "t.jsonl", train)),
        val_path=str(write_jsonl(tmp_path / "v.jsonl", val)),
    )
    dm = PromptDataModule(tokenizer, source, {"prompt": "question"}, prompts_per_step=2)
    dm.setup()
    assert texts(dm.train_rows) == [row["question"] for row in train]
    assert [row.fields for row in dm.val_rows] == [{"answer": row["answer"]} for row in val]


def test_held_out_prompts_are_the_offline_validation_rows(tokenizer, tmp_path):
    # Offline data (prompt, completion, label) read as prompts: the same seeded rows held out.
    rows = [
        {"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": i % 2 == 0}
        for i in range(30)
    ]
    source = Source(str(write_jsonl(tmp_path / "rows.jsonl", rows)), val_fraction=0.2)
    for seed in (0, 1):
        offline_val = read_splits(source, Columns(), seed)[1].rows["prompt"]
        online_val = read_prompt_splits(source, Columns(), seed)[1]
        assert online_val.prompts == offline_val
        # Not a bundled task: the completion and label columns are fields like any other.
        assert set(online_val.fields[0]) == {"completion", "label"}
    assert read_prompt_splits(source, Columns(), 0)[1].prompts != (
        read_prompt_splits(source, Columns(), 1)[1].prompts
    )


def test_toy_consistency_gives_prompts_of_disjoint_object_pools(tokenizer):
    source = Source("toy_consistency", val_split="validation", toy_rows=160)
    dm = data_module(tokenizer, source)
    assert (len(dm.train_rows), len(dm.val_rows)) == (160, 20)
    assert all(row.fields == {} for row in dm.train_rows + dm.val_rows)  # no completion, label
    train_objects = {stated_object(str(row.prompt)) for row in dm.train_rows}
    val_objects = {stated_object(str(row.prompt)) for row in dm.val_rows}
    assert None not in train_objects | val_objects
    assert train_objects.isdisjoint(val_objects)


def test_the_toy_task_gives_its_prompts_alone(tokenizer):
    train, val = read_prompt_splits(Source("toy", toy_rows=40, val_fraction=0.25), Columns(), 0)
    assert (len(train.prompts), len(val.prompts)) == (30, 10)
    assert all(fields == {} for fields in train.fields + val.fields)


# ----------------------------------------------------------------------------------------- errors


def test_a_missing_prompt_column_names_the_file_and_the_columns_found(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "Q?", "answer": "A"}] * 4)
    with pytest.raises(DataError) as error:
        read_prompt_splits(Source(str(path)), Columns(), seed=0)
    message = str(error.value)
    assert message.startswith(f"{path}: no prompt column 'prompt'")
    assert "['answer', 'question']" in message
    assert "data.columns.prompt" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("   ", "empty or not text ('   ')"),
        ([], "empty conversation"),
        ([{"role": "narrator", "content": "Hi"}], "message 0: unknown role 'narrator'"),
    ],
)
def test_an_empty_or_malformed_prompt_names_the_file_row_and_column(tokenizer, tmp_path, bad, says):
    good = "Fine?" if isinstance(bad, str) else [{"role": "user", "content": "Fine?"}]
    rows = [{"prompt": good}, {"prompt": good}, {"prompt": bad}, {"prompt": good}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError) as error:
        read_prompt_splits(Source(str(path)), Columns(), seed=0)
    assert str(error.value).startswith(f"{path}, row 3, column 'prompt'")
    assert says in str(error.value)


@pytest.mark.parametrize("value", [7, {"text": "Hi"}])
def test_a_prompt_neither_text_nor_a_conversation_names_the_row_and_column(tokenizer, value):
    rows = [{"prompt": value, "answer": "a"} for _ in range(5)]
    with pytest.raises(DataError) as error:
        read_prompt_splits(Source(rows), Columns(), seed=0)
    assert str(error.value).startswith(
        "rows in memory (data.source.path), row 1, column 'prompt': a prompt is text or a "
        "conversation"
    )


def test_a_null_prompt_column_and_bad_arguments_name_the_setting(tokenizer):
    with pytest.raises(ConfigError, match=r"data\.columns\.prompt is null"):
        read_prompt_splits(Source(numbered(5)), Columns(prompt=None, label=None), seed=0)
    with pytest.raises(ConfigError, match=r"prompts_per_step must be an integer >= 1, got 0"):
        PromptDataModule(tokenizer, prompts_per_step=0)
    with pytest.raises(ConfigError, match=r"max_prompt_length must be an integer >= 1"):
        PromptDataModule(tokenizer, max_prompt_length=0)


def test_conversations_without_a_chat_template_name_the_source(tmp_path):
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = None
    rows = [{"prompt": [{"role": "user", "content": f"Hi {i}"}]} for i in range(6)]
    with pytest.raises(DataError, match=r"^rows in memory \(data\.source\.path\) holds conversa"):
        data_module(tokenizer, Source(rows))


# --------------------------------------------------------------------------------------- encoding

TEXT_PROMPTS = ["Hi?", "What does Mia keep in the box?", "x" * 90, "Ünïcödé prompt ✓"]
CHAT_PROMPTS = [
    [{"role": "user", "content": "Hi?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
    [{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"},
     {"role": "user", "content": "y" * 90}],
]  # fmt: skip


def offline_prompt_ids(tokenizer, prompt, chat: bool, max_prompt_length: int) -> list[int]:
    completion = [{"role": "assistant", "content": "Done."}] if chat else "Done."
    encoded = encode([prompt], [completion], tokenizer, chat, 512, max_prompt_length)
    return encoded["prompt_ids"][0]


@pytest.mark.parametrize("max_prompt_length", [256, 40, 1])
@pytest.mark.parametrize(("prompts", "chat"), [(TEXT_PROMPTS, False), (CHAT_PROMPTS, True)])
def test_prompt_ids_are_the_offline_prompt_ids(tokenizer, prompts, chat, max_prompt_length):
    expected = [offline_prompt_ids(tokenizer, p, chat, max_prompt_length) for p in prompts]
    assert encode_prompts(prompts, tokenizer, chat, max_prompt_length) == expected
    rows = [{"prompt": prompt, "n": i} for i, prompt in enumerate(prompts)]
    source = Source(rows, val_path=rows[:1])
    dm = data_module(tokenizer, source, max_prompt_length=max_prompt_length)
    assert [row.prompt_ids for row in dm.train_rows] == expected
    if max_prompt_length == 40:  # the long prompts were cut, keeping their end (and text's BOS)
        ids = dm.train_rows[2].prompt_ids
        assert len(ids) == 40
        assert (ids[0] == tokenizer.bos_token_id) is not chat
        end = "y" * 20 + "\n<assistant>\n" if chat else "x" * 39  # the generation prompt last
        assert tokenizer.decode(ids, skip_special_tokens=True).endswith(end)


def test_a_chat_template_setting_replaces_the_tokenizers(tmp_path):
    tokenizer = byte_level_tokenizer()
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}>"
    rows = [{"prompt": [{"role": "user", "content": f"Hi {i}"}]} for i in range(4)]
    dm = PromptDataModule(tokenizer, Source(rows, val_path=rows[:2]), {"chat_template": template})
    dm.setup()
    assert tokenizer.decode(dm.train_rows[1].prompt_ids) == "[Hi 1]>"


# --------------------------------------------------------------------------------------- batching


@pytest.fixture
def prompts_16(tmp_path) -> Source:
    """16 training prompts, 6 validation prompts."""
    return Source(numbered(16), val_path=[{"prompt": f"Val {i}?"} for i in range(6)])


def test_an_epoch_gives_every_prompt_once_in_a_seeded_order(tokenizer):
    # 13 prompts, 4 a step: the last batch holds the one left.
    source = Source(numbered(13), val_path=numbered(2))
    dm = data_module(tokenizer, source, seed=0)
    batches = list(dm.train_dataloader())
    assert [len(batch) for batch in batches] == [4, 4, 4, 1]
    assert all(isinstance(row, PromptRow) for batch in batches for row in batch)
    order = [row.index for batch in batches for row in batch]
    assert sorted(order) == list(range(13))
    assert order != sorted(order)
    assert loaded(data_module(tokenizer, source, seed=0).train_dataloader()) == loaded(batches)
    assert loaded(data_module(tokenizer, source, seed=1).train_dataloader()) != loaded(batches)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    assert loaded(loader) != loaded(batches)


def test_two_ranks_share_the_training_prompts_without_overlap(tokenizer, prompts_16):
    shares = []
    for rank in (0, 1):
        dm = on_ranks(data_module(tokenizer, prompts_16, seed=2), world=2, rank=rank)
        shares.append([row.index for batch in dm.train_dataloader() for row in batch])
    assert [len(share) for share in shares] == [8, 8]
    assert set(shares[0]).isdisjoint(shares[1])
    assert set(shares[0]) | set(shares[1]) == set(range(16))
    # Rank r's k-th prompt is position k * 2 + r of the one-process order.
    alone = [row.index for batch in data_module(tokenizer, prompts_16, seed=2).train_dataloader()
             for row in batch]  # fmt: skip
    assert shares == [alone[0::2], alone[1::2]]


def test_validation_prompts_are_each_validated_once_across_ranks_in_order(tokenizer, prompts_16):
    alone = loaded(data_module(tokenizer, prompts_16).val_dataloader())
    assert alone == [[f"Val {i}?" for i in range(4)], ["Val 4?", "Val 5?"]]
    ranks = [
        loaded(on_ranks(data_module(tokenizer, prompts_16), 2, rank).val_dataloader())
        for rank in (0, 1)
    ]
    assert ranks == [[["Val 0?", "Val 2?", "Val 4?"]], [["Val 1?", "Val 3?", "Val 5?"]]]


def test_a_resumed_loader_gives_the_rest_of_the_epochs_order(tokenizer, prompts_16):
    whole = data_module(tokenizer, prompts_16).train_dataloader()
    whole.sampler.set_epoch(1)
    order = loaded(whole)
    run = data_module(tokenizer, prompts_16)
    loader = run.train_dataloader()
    loader.sampler.set_epoch(1)
    batches = iter(loader)
    assert [texts(next(batches)) for _ in range(2)] == order[:2]
    state = run.state_dict()
    assert state == {"train_order": {"epoch": 1, "samples_seen": 8}}

    restored_first = data_module(tokenizer, prompts_16)  # restored, then the loader built
    restored_first.load_state_dict(state)
    resumed = restored_first.train_dataloader()
    resumed.sampler.set_epoch(1)  # as Lightning sets it again after restoring
    assert loaded(resumed) == order[2:]

    built_first = data_module(tokenizer, prompts_16)  # loader and iterator made, then restored
    early = built_first.train_dataloader()
    iterator = iter(early)
    built_first.load_state_dict(state)
    early.sampler.set_epoch(1)
    assert loaded(iterator) == order[2:]

    from_loader = data_module(tokenizer, prompts_16).train_dataloader()  # the loader's own state
    from_loader.load_state_dict(loader.state_dict())
    assert loaded(from_loader) == order[2:]


def test_a_position_cannot_be_applied_to_an_order_already_drawn(tokenizer, prompts_16):
    dm = data_module(tokenizer, prompts_16)
    next(iter(dm.train_dataloader()))
    with pytest.raises(ConfigError, match=r"num_workers=0"):
        dm.load_state_dict({"train_order": {"epoch": 0, "samples_seen": 4}})
