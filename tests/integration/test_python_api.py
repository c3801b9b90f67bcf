"""The Python API (docs/python_api.md): each python block of the page runs as written, and rows
in memory read as the same rows in a file do."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from kto_lightning import KTODataModule, Lengths, Source, TinyLlama
from kto_lightning.errors import ConfigError, DataError

PAGE = Path(__file__).resolve().parents[2] / "docs" / "python_api.md"


def _blocks() -> list[str]:
    """The page's ```python blocks, in order (one per section)."""
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)


def _run_block(number: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Run block `number` in a fresh namespace, in `tmp_path`; returns its variables."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(_blocks()[number], f"{PAGE}:block{number + 1}", "exec"), namespace)
    return namespace


def test_the_page_has_one_block_per_part() -> None:
    assert len(_blocks()) == 3


def test_own_lightning_script_trains_the_policy_against_a_frozen_reference(tmp_path, monkeypatch):
    run = _run_block(0, tmp_path, monkeypatch)
    assert run["trainer"].global_step == 4
    policy, reference = run["module"].policy, run["module"].reference.model
    moved = [
        not torch.equal(p, r)
        for p, r in zip(policy.parameters(), reference.parameters(), strict=True)
    ]
    assert any(moved)  # the policy trained; the reference is the initial copy
    assert all(not p.requires_grad for p in reference.parameters())
    assert 0.0 <= float(run["trainer"].callback_metrics["val/rewards/auroc"]) <= 1.0


def test_run_training_returns_the_run_folder_objective_and_last_checkpoint(tmp_path, monkeypatch):
    result = _run_block(1, tmp_path, monkeypatch)["result"]
    assert result.run_dir.is_dir()
    assert result.run_dir.resolve().parent == (tmp_path / "outputs" / "kto" / "runs").resolve()
    assert result.last_checkpoint == result.run_dir / "checkpoints" / "last.ckpt"
    assert result.last_checkpoint.is_file()
    assert isinstance(result.objective, float) and 0.0 <= result.objective <= 1.0
    recorded = json.loads((result.run_dir / "objective.json").read_text())
    assert recorded == {"objective": "val/rewards/auroc", "value": result.objective}
    assert result.hf_model is not None and (result.hf_model / "config.json").is_file()
    assert (result.run_dir / ".hydra" / "config.yaml").is_file()  # what evaluate reads
    assert result.config.loss.beta == 0.2


def test_rows_in_memory_block_reads_both_shapes(tmp_path, monkeypatch):
    run = _run_block(2, tmp_path, monkeypatch)
    train, val = run["train"], run["val"]
    assert (train.format, train.desirable, train.undesirable) == ("unpaired", 36, 36)
    assert (val.format, val.desirable, val.undesirable, val.rows_read) == ("paired", 2, 2, 2)
    assert train.source == "rows in memory (data.source.path)"
    assert train.tokenization == "in memory"
    assert not list(tmp_path.iterdir())  # nothing written for rows in memory


ROWS = [
    {
        "prompt": f"Q{i}: what is {i} squared?",
        "completion": str(i * i) if i % 3 else "no",
        "label": bool(i % 3),
    }
    for i in range(40)
]


def _data(source: Source) -> KTODataModule:
    data = KTODataModule(
        TinyLlama().load_tokenizer(),
        source=source,
        lengths=Lengths(48, 24),
        batching={"batch_size": 4},
    )
    data.setup("fit")
    return data


def _tokenized(data: KTODataModule, split: str) -> list:
    """Every example of a split as the model gets it: its tokens, label and KL partner's tokens."""
    dataset = data.train_set if split == "train" else data.val_set
    assert dataset is not None
    return [dataset[i] for i in range(len(dataset))]


@pytest.mark.parametrize("as_dataset", [False, True], ids=["list", "Dataset"])
def test_rows_in_memory_give_the_rows_and_counts_of_the_same_rows_in_a_jsonl_file(
    tmp_path, as_dataset
):
    import datasets

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS), encoding="utf-8")
    from_file = _data(Source(path=str(path), val_fraction=0.25))
    rows = datasets.Dataset.from_list(ROWS) if as_dataset else list(ROWS)
    in_memory = _data(Source(path=rows, val_fraction=0.25))
    for split in ("train", "validation"):
        file_summary, memory_summary = from_file.summaries[split], in_memory.summaries[split]
        counts = ("rows_read", "kept", "desirable", "undesirable", "format", "dropped",
                  "prompt_lengths", "completion_lengths", "prompts_truncated")  # fmt: skip
        for count in counts:
            assert getattr(memory_summary, count) == getattr(file_summary, count), (split, count)
        assert _tokenized(in_memory, split) == _tokenized(from_file, split)  # KL partners too
    assert from_file.summaries["train"].rows_read == 30


def test_a_bad_row_in_memory_is_named_by_its_key_and_row(tmp_path):
    rows = [dict(row) for row in ROWS]
    rows[2]["label"] = "maybe"
    with pytest.raises(DataError, match=r"rows in memory \(data.source.path\), row 3"):
        _data(Source(path=rows))
    with pytest.raises(
        DataError, match=r"rows in memory \(data.source.val_path\), item 2: expected a dict"
    ):
        _data(Source(path=ROWS, val_path=[ROWS[0], "not a row"]))
    with pytest.raises(
        DataError, match=r"rows in memory \(data.source.path\): the list holds no rows"
    ):
        _data(Source(path=[]))


def test_a_path_that_is_neither_a_name_nor_rows_names_the_key():
    with pytest.raises(ConfigError, match=r"data.source.path must be a file path.*got 12"):
        Source(path=12)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"data.source.val_path"):
        Source(val_path=3.5)  # type: ignore[arg-type]


def test_the_same_rows_in_memory_as_validation_are_refused():
    with pytest.raises(ConfigError, match="validation would score the very rows"):
        _data(Source(path=ROWS, val_path=ROWS))
