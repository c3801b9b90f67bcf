"""`evaluate ckpt_path=<run>` scores the run's own data: one short run on a local file that is not
the toy task (arithmetic, right and wrong answers), trained and evaluated in-process."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir

from conftest import FAST
from kto_lightning.cli.config_files import config_dir
from kto_lightning.cli.evaluation import evaluate
from kto_lightning.cli.run_fit import train

EVAL_DATA = ["data.source.val_fraction=0.25"]


def _arithmetic(path: Path, n: int = 160) -> Path:
    """`n` rows of `a + b`: the right sum is desirable, a wrong one undesirable."""
    rows = []
    for i in range(n):
        a, b = i % 13, (7 * i) % 11
        right = i % 2 == 0
        rows.append(
            {
                "prompt": f"What is {a} + {b}?",
                "completion": str(a + b if right else a + b + 3),
                "label": right,
            }
        )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _compose(name: str, *overrides: str) -> Any:
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(name, overrides=list(overrides))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished short run on the arithmetic file: 20 of its 160 rows held out (seed 7)."""
    base = tmp_path_factory.mktemp("run_data")
    data = _arithmetic(base / "sums.jsonl")
    cfg = _compose(
        "train",
        *FAST,
        "data=local",
        f"data.source.path={data}",
        "data.source.toy_rows=0",
        "data.source.val_fraction=0.125",
        "data.lengths.max_length=64",
        "data.lengths.max_prompt_length=32",
        "trainer.limit_val_batches=1.0",  # every validation row, as evaluate scores them
        "seed=7",
        f"paths.output_dir={base / 'run'}",
    )
    train(cfg)
    return base / "run"


def _evaluate(run_dir: Path, *overrides: str) -> dict[str, Any]:
    out = run_dir.parent / f"eval_{len(overrides)}"
    args = [f"ckpt_path={run_dir}", f"paths.output_dir={out}", *overrides]
    return evaluate(_compose("evaluate", *args), args)


def _final_validation(run_dir: Path) -> dict[str, float]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/rewards/auroc")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}


def test_a_run_directory_is_scored_on_its_own_validation_rows(run_dir: Path) -> None:
    record = _evaluate(run_dir)  # no data argument: not the toy task, the run's file

    data = record["data"]
    assert (data["split"], data["rows_read"], data["differs_from_run"]) == ("validation", 20, [])
    assert data["source"].startswith(str(run_dir.parent / "sums.jsonl"))
    final = _final_validation(run_dir)
    assert set(record["metrics"]) == {name.replace("val/", "eval/", 1) for name in final}
    for name, value in final.items():
        got = record["metrics"][name.replace("val/", "eval/", 1)]
        assert got == pytest.approx(value, rel=1e-6, abs=1e-6), name


def test_a_data_override_is_applied_on_the_run_data_and_logged_as_a_difference(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="kto_lightning"):
        logging.getLogger("kto_lightning").addHandler(caplog.handler)
        try:
            record = _evaluate(run_dir, *EVAL_DATA)
        finally:
            logging.getLogger("kto_lightning").removeHandler(caplog.handler)

    change = "data.source.val_fraction: 0.125 -> 0.25"
    assert f"data: the run's, except {change}" in caplog.messages
    data = record["data"]
    assert data["differs_from_run"] == [change]
    # The run's file, seed and columns, with a larger hold-out: 40 of its 160 rows.
    assert data["rows_read"] == 40 and data["config"]["source"]["path"].endswith("sums.jsonl")
