"""`python -m kto_lightning.evaluate` end to end: one tiny trained run, scored from its checkpoint,
its run directory (on a test file) and its Hugging Face folder."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir

from cli import command_in_process, train_in_process
from conftest import FAST
from kto_lightning.cli.config_files import config_dir
from kto_lightning.cli.evaluation import evaluate
from kto_lightning.errors import ConfigError

# No data argument: evaluation scores the run's own validation rows (16 of the 160 toy rows,
# held out); FAST's limit, a trainer setting, makes them the batches its final validation used.
RUN_DATA = ["trainer.limit_val_batches=2"]
TEST_ROWS = [
    {"prompt": "What is 2 + 2?", "completion": "2 + 2 is 4.", "label": True},
    {"prompt": "What is 2 + 2?", "completion": "Look it up yourself.", "label": False},
    {"prompt": "Name a colour.", "completion": "Blue is a colour.", "label": True},
    {"prompt": "Name a colour.", "completion": "Why should I?", "label": False},
    {"prompt": "Capital of France?", "completion": "Paris.", "label": True},
    {"prompt": "Say hello.", "completion": "Hello!", "label": True},
]


def evaluate_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m kto_lightning.evaluate ARGS` in `cwd`, offline, run in this process."""
    return command_in_process("evaluate", *args, cwd=cwd)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run: checkpoints/last.ckpt, hf_model/, csv/metrics.csv, .hydra/."""
    cwd = tmp_path_factory.mktemp("evaluate")
    result = train_in_process(*FAST, f"hydra.run.dir={cwd}/run", cwd=cwd)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return cwd / "run"


def _evaluate(run_dir: Path, name: str, *args: str) -> tuple[dict[str, Any], Path]:
    """(eval.json, the evaluation's directory) of one evaluation beside the run; checks that it
    wrote no checkpoint and left the run's checkpoints as they were."""
    checkpoints = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    out = run_dir.parent / name
    result = evaluate_cli(*args, f"hydra.run.dir={out}", cwd=run_dir.parent)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert not (out / "checkpoints").exists()
    assert not list(out.rglob("*.ckpt"))
    after = {p.name: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    assert after == checkpoints
    png = (out / "reward_distributions.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    assert "reward AUROC" in result.stdout  # the summary
    return json.loads((out / "eval.json").read_text()), out


def _final_validation(run_dir: Path) -> dict[str, float]:
    """The val/* metrics of the run's last validation, from its metrics.csv."""
    with open(run_dir / "csv" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/rewards/auroc")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/") and v}


def _check_record(record: dict[str, Any]) -> None:
    """What every eval.json holds, and how its parts agree."""
    assert {
        "metrics",
        "auroc",
        "reward_accuracy",
        "counts",
        "rewards",
        "data",
        "model",
        "loss",
    } <= (set(record))
    metrics, counts = record["metrics"], record["counts"]
    assert 0.0 <= record["auroc"] <= 1.0
    assert record["auroc"] == metrics["eval/rewards/auroc"]
    assert record["reward_accuracy"] == metrics["eval/rewards/accuracy"]
    assert counts["desirable"] == metrics["eval/count/desirable"]
    assert counts["undesirable"] == metrics["eval/count/undesirable"]
    assert counts["desirable"] + counts["undesirable"] == record["data"]["rows"]
    # The histogram's rows are the rows the metrics were computed from.
    for label, mean in (("desirable", "chosen"), ("undesirable", "rejected")):
        rewards = record["rewards"][label]
        assert rewards["rows"] == counts[label]
        assert rewards["mean"] == pytest.approx(metrics[f"eval/rewards/{mean}"], abs=1e-5)
    assert record["loss"]["beta"] == 0.1


@pytest.mark.parametrize("way", ["checkpoint", "hf_model"])
def test_scores_the_run_as_its_final_validation_did(run_dir: Path, way: str) -> None:
    ckpt_path = run_dir / ("checkpoints/last.ckpt" if way == "checkpoint" else "hf_model")
    record, _ = _evaluate(run_dir, f"eval_{way}", f"ckpt_path={ckpt_path}", *RUN_DATA)

    _check_record(record)
    # The same policy, the same reference rebuilt from the run's seed, the same rows and batches:
    # every metric of the run's final validation, val/* as eval/*.
    final = _final_validation(run_dir)
    assert set(record["metrics"]) == {name.replace("val/", "eval/", 1) for name in final}
    for name, value in final.items():
        expected = pytest.approx(value, rel=1e-6, abs=1e-6)
        assert record["metrics"][name.replace("val/", "eval/", 1)] == expected, name
    data = record["data"]
    assert (data["split"], data["source"], data["rows_read"]) == (
        "validation",
        "toy (held out)",
        16,
    )
    assert data["config"]["source"]["toy_rows"] == 160
    assert data["differs_from_run"] == []
    model = record["model"]
    assert model["ckpt_path"] == str(ckpt_path)
    assert model["weights"] == str(ckpt_path.resolve())
    assert (model["base_model"], model["reference"]) == ("TinyLlama", "copy")
    assert model["model_config"]["_target_"] == "kto_lightning.models.TinyLlama"
    if way == "checkpoint":
        assert model["kind"] == "checkpoint" and model["global_step"] == 6
    else:
        assert model["kind"] == "hf_model" and "global_step" not in model


def test_a_run_directory_scores_its_last_checkpoint_on_a_test_file(run_dir: Path) -> None:
    test_file = run_dir.parent / "test.jsonl"
    test_file.write_text("".join(json.dumps(row) + "\n" for row in TEST_ROWS))
    record, out = _evaluate(
        run_dir, "eval_run_dir", f"ckpt_path={run_dir}", f"data.source.test_path={test_file}"
    )

    _check_record(record)
    assert record["counts"] == {"desirable": 4, "undesirable": 2}
    data = record["data"]
    assert (data["split"], data["source"], data["rows_read"]) == ("test", str(test_file), 6)
    assert record["model"]["weights"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert record["model"]["global_step"] == 6
    assert "reward AUROC" in (out / "evaluate.log").read_text()


def test_without_ckpt_path_one_line_says_what_to_set(tmp_path: Path) -> None:
    result = evaluate_cli(f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)

    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error: ckpt_path must be set: a checkpoint file (.ckpt)")


def test_a_checkpoint_refuses_a_model_or_loss_from_the_command_line(run_dir: Path) -> None:
    # The run config decides them: an override would be silently ignored otherwise.
    overrides = [f"ckpt_path={run_dir}", "loss.beta=0.3", "+model.lora.r=4"]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("evaluate", overrides=overrides)
    with pytest.raises(ConfigError, match=r"drop loss\.beta, \+model\.lora\.r from the command"):
        evaluate(cfg, overrides)
