"""`auto` class weights under data.batching.balanced_batches=true: resolved from what the sampler
draws."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from kto_lightning.cli.run_build import build


def _skewed(path: Path, n_desirable: int, n_undesirable: int) -> Path:
    rows = [
        {"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}.", "label": True}
        for i in range(n_desirable)
    ]
    rows += [
        {"prompt": f"What is {i} times {i}?", "completion": "Ask someone else.", "label": False}
        for i in range(n_undesirable)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("n_desirable", "n_undesirable", "weights"),
    [
        (950, 50, ["loss.desirable_weight=auto", "loss.undesirable_weight=1.0"]),
        (50, 950, ["loss.desirable_weight=1.0", "loss.undesirable_weight=auto"]),
    ],
)
def test_auto_weight_balances_the_balanced_batches(
    make_config, tmp_path, caplog, n_desirable, n_undesirable, weights
) -> None:
    path = _skewed(tmp_path / "skewed.jsonl", n_desirable, n_undesirable)
    overrides = [
        "data=local",
        f"data.source.path={path}",
        "data.batching.balanced_batches=true",
        *weights,
    ]
    with caplog.at_level(logging.INFO, logger="kto_lightning"):
        run = build(make_config(*overrides))
    labels = run.datamodule.train_set.labels
    drawn = Counter(labels[i] for i in run.datamodule.train_dataloader().sampler)
    loss = run.module.loss
    ratio = loss.desirable_weight * drawn[True] / (loss.undesirable_weight * drawn[False])
    assert ratio == pytest.approx(1.0, abs=1e-6)
    # The data summary still reports the dataset's own counts; a note says why they differ.
    n_d, n_u = run.datamodule.label_counts
    assert n_d + n_u == len(labels) < drawn[True] + drawn[False]
    assert f"{drawn[True]} desirable and {drawn[False]} undesirable" in caplog.text
    assert run.module.run_config["resolved_loss"]["desirable_weight"] == loss.desirable_weight


def test_plain_shuffle_resolves_from_the_dataset_counts(make_config, tmp_path, caplog) -> None:
    path = _skewed(tmp_path / "skewed.jsonl", 95, 5)
    with caplog.at_level(logging.INFO, logger="kto_lightning"):
        run = build(make_config("data=local", f"data.source.path={path}"))
    n_d, n_u = run.datamodule.label_counts
    assert run.datamodule.trained_label_counts == (n_d, n_u)
    loss = run.module.loss
    assert loss.desirable_weight * n_d / (loss.undesirable_weight * n_u) == pytest.approx(1.0)
    assert "per epoch" not in caplog.text
