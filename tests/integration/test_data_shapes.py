"""Every supported data shape, and every preset's schema, trains end to end from local files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pytest
import torch

from cli import train_in_process
from kto_lightning.cli.run_build import build
from kto_lightning.cli.run_fit import train
from kto_lightning.data.toy import toy_rows

N_PAIRS = 48


def _pairs() -> list[tuple[str, str, str]]:
    """(prompt, good completion, bad completion) triples from the toy task."""
    rows = toy_rows(4 * N_PAIRS, seed=3)
    good = [r for r in rows if r["label"]]
    bad = [r for r in rows if not r["label"]][: len(good)]
    triples = [
        (g["prompt"], g["completion"], b["completion"]) for g, b in zip(good, bad, strict=True)
    ]
    return triples[:N_PAIRS]


def _chat(role: str, text: str) -> list[dict[str, str]]:
    return [{"role": role, "content": text}]


def _hh(prompt: str, reply: str) -> str:
    """A dialogue in Anthropic HH's text layout."""
    return f"\n\nHuman: {prompt}\n\nAssistant: {reply}"


def _write(path: Path, rows: list[dict]) -> Path:
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    elif suffix == ".csv":
        datasets.Dataset.from_list(rows).to_csv(str(path), index=False)
    return path


def _unpaired(signed: bool = False) -> list[dict]:
    """Unpaired rows, labels as bools or, with `signed`, as +1/-1."""
    yes, no = (1, -1) if signed else (True, False)
    rows = []
    for prompt, good, bad in _pairs():
        rows.append({"prompt": prompt, "completion": good, "label": yes})
        rows.append({"prompt": prompt, "completion": bad, "label": no})
    return rows


def _unpaired_chat() -> list[dict]:
    return [
        {
            "prompt": _chat("user", r["prompt"]),
            "completion": _chat("assistant", r["completion"]),
            "label": r["label"],
        }
        for r in _unpaired()
    ]


def _paired_hh() -> list[dict]:
    return [{"chosen": _hh(p, g), "rejected": _hh(p, b)} for p, g, b in _pairs()]


def _paired_chat() -> list[dict]:
    """UltraFeedback's layout: a text prompt, and conversations that repeat it as the user turn."""
    return [
        {
            "prompt": p,
            "prompt_id": str(i),
            "chosen": _chat("user", p) + _chat("assistant", g),
            "rejected": _chat("user", p) + _chat("assistant", b),
            "score_chosen": 8.0,
            "score_rejected": 3.0,
        }
        for i, (p, g, b) in enumerate(_pairs())
    ]


def _scored() -> list[dict]:
    return [
        {"prompt": r["prompt"], "completion": r["completion"], "rating": 8.5 if r["label"] else 2.0}
        for r in _unpaired()
    ]


SHAPES = {
    # shape: (file name, rows, overrides)
    "unpaired text, jsonl": ("rows.jsonl", _unpaired, []),
    "unpaired text, +1/-1 labels, csv": ("rows.csv", lambda: _unpaired(signed=True), []),
    "unpaired text, parquet": ("rows.parquet", _unpaired, []),
    "unpaired conversational": ("rows.jsonl", _unpaired_chat, []),
    "paired text, explicit prompt": (
        "pairs.jsonl",
        lambda: [{"question": p, "chosen": g, "rejected": b} for p, g, b in _pairs()],
        ["data.columns.prompt=question"],
    ),
    "paired text, implicit prompt": ("pairs.jsonl", _paired_hh, ["data.columns.prompt=null"]),
    "paired conversational": ("pairs.jsonl", _paired_chat, []),
    "score threshold": (
        "scored.jsonl",
        _scored,
        ["data.columns.score=rating", "data.columns.score_threshold=5"],
    ),
}


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train(make_config, overrides: list[str]):
    run = build(make_config(*overrides))
    before = _snapshot(run.module.policy)
    objective = train(make_config(*overrides), run=run)
    after = run.module.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the policy did not move"
    return run, objective


@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_shape_trains_from_a_local_file(make_config, tmp_path, shape: str) -> None:
    filename, make_rows, extra = SHAPES[shape]
    rows = make_rows()
    path = _write(tmp_path / filename, rows)
    overrides = ["data=local", f"data.source.path={path}", "data.source.val_fraction=0.25", *extra]
    run, objective = _train(make_config, overrides)
    summary = run.datamodule.summaries["train"]
    expected_rows = 2 * N_PAIRS if shape.startswith("paired") else len(rows)
    assert summary.kept + run.datamodule.summaries["validation"].kept == expected_rows
    assert summary.desirable > 0 and summary.undesirable > 0
    assert summary.conversational == ("conversational" in shape)
    assert objective is not None


# Each preset's hub schema, written to a local file.
PRESETS = {"kto_mix": _unpaired_chat, "ultrafeedback": _paired_chat, "hh_rlhf": _paired_hh}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_schema_trains_from_a_local_file(make_config, tmp_path, preset: str) -> None:
    train_file = _write(tmp_path / "train.jsonl", PRESETS[preset]())
    test_file = _write(tmp_path / "test.jsonl", PRESETS[preset]()[:12])
    cfg = make_config(f"data={preset}")
    assert "/" in cfg.data.source.path, "a preset names a hub dataset"
    overrides = [
        f"data={preset}",
        f"data.source.path={train_file}",
        f"data.source.val_path={test_file}",
        "data.lengths.max_length=192",
        "data.lengths.max_prompt_length=64",
    ]
    run, _ = _train(make_config, overrides)
    assert run.datamodule.summaries["validation"].kept == 12 * (1 if preset == "kto_mix" else 2)


def test_preset_on_the_command_line(tmp_path) -> None:
    path = _write(tmp_path / "hh.jsonl", PRESETS["hh_rlhf"]())
    result = train_in_process(
        "data=hh_rlhf", f"data.source.path={path}", "data.source.val_split=null",
        "data.source.val_fraction=0.25", "data.lengths.max_length=192",
        "data.lengths.max_prompt_length=64", "debug=fast", f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "data summary" in output
    assert "paired" in output
    assert "KTO training finished" in output


def test_bad_row_stops_before_training_with_the_line_named(tmp_path) -> None:
    path = tmp_path / "rows.jsonl"
    good = json.dumps({"prompt": "a", "completion": "b", "label": True})
    path.write_text(f'{good}\n{good}\n{{"prompt": "a",\n{good}\n', encoding="utf-8")
    result = train_in_process(
        "data=local", f"data.source.path={path}", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"{path}, line 3: malformed JSON" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists(), "no partial training"


def test_auto_class_weight_balances_the_classes(make_config, tmp_path, caplog) -> None:
    # 3 desirable rows for every undesirable one.
    rows = _unpaired()
    rows = [r for r in rows if r["label"]] + [r for r in rows if not r["label"]][: N_PAIRS // 3]
    path = _write(tmp_path / "skewed.jsonl", rows)
    base = ["data=local", f"data.source.path={path}", "data.source.val_fraction=0.2"]
    run = build(make_config(*base, "loss.desirable_weight=1.0", "loss.undesirable_weight=auto"))
    n_d, n_u = run.datamodule.label_counts
    loss = run.module.loss
    assert loss.desirable_weight == 1.0
    assert loss.undesirable_weight == pytest.approx(n_d / n_u)
    assert loss.desirable_weight * n_d / (loss.undesirable_weight * n_u) == pytest.approx(1.0)

    with caplog.at_level(logging.WARNING):
        build(make_config(*base, "loss.desirable_weight=1.0", "loss.undesirable_weight=1.0"))
    assert "outside the recommended [1, 4/3]" in caplog.text


def test_balanced_batches_hold_both_labels(make_config, tmp_path) -> None:
    rows = _unpaired()
    rows = [r for r in rows if r["label"]] + [r for r in rows if not r["label"]][:10]
    path = _write(tmp_path / "skewed.jsonl", rows)
    balanced = "data.batching.balanced_batches=true"
    run = build(make_config("data=local", f"data.source.path={path}", balanced))
    for batch in run.datamodule.train_dataloader():
        assert batch["labels"].any() and not batch["labels"].all()
    train(make_config("data=local", f"data.source.path={path}"), run=run)


def test_a_sweep_reuses_the_tokenization(make_config, tmp_path) -> None:
    path = _write(tmp_path / "rows.jsonl", _unpaired())
    notes = []
    for beta in (0.05, 0.3):
        run = build(make_config("data=local", f"data.source.path={path}", f"loss.beta={beta}"))
        notes.append(run.datamodule.summaries["train"].tokenization)
    assert notes == ["computed", "cached"]
