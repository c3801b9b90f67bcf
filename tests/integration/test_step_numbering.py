"""One step numbering for every record of a run: metrics.csv (and so TensorBoard, W&B and the
plots), the console, checkpoint names and generations files all count optimizer steps done."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

from lightning.pytorch.trainer.states import TrainerFn

from kto_lightning.cli.run_fit import train
from kto_lightning.reporting.csv_logger import (
    ContinuingCSVLogger,
    OptimizerStepNumbers,
    logged_step,
)
from kto_lightning.runs.run_records import (
    final_metrics,
    last_validation,
    read_metric_rows,
    read_metrics,
)


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def _steps(rows: list[dict[str, str]], column: str) -> list[int]:
    return [int(row["step"]) for row in rows if row.get(column)]


def test_a_run_writes_every_row_at_the_optimizer_steps_done(make_config, tmp_path) -> None:
    # FAST: 6 optimizer steps, one epoch, a row every step; validation before training is on.
    generations = ["callbacks.generations.num_prompts=1", "callbacks.generations.max_new_tokens=2"]
    train(make_config(*generations, "export.enabled=false"))
    rows = _rows(tmp_path)
    assert _steps(rows, "train/loss") == [1, 2, 3, 4, 5, 6]
    # The learning rate a step trains with is on that step's row, not the one before.
    assert _steps(rows, "lr-AdamW/pg1") == [1, 2, 3, 4, 5, 6]
    # Before training, then after the 6th step: the same 6 as the generations file, the best
    # checkpoint's name and the console.
    assert _steps(rows, "val/loss") == [0, 6]
    lines = (tmp_path / "generations" / "step_6.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [6]
    assert sorted(p.name for p in (tmp_path / "generations").iterdir()) == [
        "step_0.jsonl",
        "step_6.jsonl",
    ]
    assert (tmp_path / "checkpoints" / "best-step6.ckpt").is_file()
    # The plot's points are the file's steps, unshifted.
    series = read_metrics(tmp_path)
    assert [step for step, _ in series["train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in series["val/rewards/auroc"]] == [0, 6]
    # A checkpoint of step 6 gets the validation of step 6 (its own weights); one of step 5
    # the one before training.
    metric_rows = read_metric_rows(tmp_path)
    last = last_validation(metric_rows)
    assert last is not None and last[0] == 6 and final_metrics(tmp_path, 6) == last[1]
    earlier = last_validation(metric_rows, at_step=5)
    assert earlier is not None and earlier[0] == 0


class _Logger:
    """Records what reaches a logger's `log_metrics`."""

    def __init__(self) -> None:
        self.calls: list[int | None] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append(step)


class _Trainer:
    """The parts of a Trainer the renumbering reads."""

    def __init__(self, fn: TrainerFn, global_step: int, loggers: list[_Logger]) -> None:
        self.state = SimpleNamespace(fn=fn)
        self.global_step, self.loggers = global_step, loggers


def test_lightnings_step_is_renumbered_in_one_place_for_every_logger() -> None:
    # In a fit Lightning's step counts the steps done before the batch in progress.
    fitting = _Trainer(TrainerFn.FITTING, 3, [])
    assert logged_step(fitting, 2) == 3  # type: ignore[arg-type]
    assert logged_step(fitting, None) == 3  # type: ignore[arg-type]
    # trainer.validate (before training, or after a resume at the last step) does not lag.
    assert logged_step(_Trainer(TrainerFn.VALIDATING, 0, []), 0) == 0  # type: ignore[arg-type]
    assert logged_step(_Trainer(TrainerFn.VALIDATING, 6, []), 6) == 6  # type: ignore[arg-type]

    loggers = [_Logger(), _Logger()]
    trainer = _Trainer(TrainerFn.FITTING, 5, loggers)
    callback = OptimizerStepNumbers()
    callback.setup(trainer, None, "fit")  # type: ignore[arg-type]
    callback.setup(trainer, None, "validate")  # a second stage does not shift twice
    for logger in loggers:
        logger.log_metrics({"train/loss": 1.0}, 4)
    assert [logger.calls for logger in loggers] == [[5], [5]]


def _write(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({key for row in rows for key in row})
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def test_a_resumed_run_keeps_the_rows_of_the_steps_up_to_its_checkpoint(tmp_path) -> None:
    # As a run killed after step 5 left it: step 5's rows (logged after last.ckpt was saved at
    # step 5) are kept; step 6's learning rate and training row are logged again on resume.
    rows: list[dict[str, object]] = [{"step": 0, "epoch": 0, "val/loss": 0.9}]
    for step in range(1, 7):
        rows.append({"step": step, "lr-AdamW": 0.1})
        rows.append({"step": step, "epoch": 0, "train/loss": 1.0 / step})
    rows.append({"step": 5, "epoch": 0, "val/loss": 0.5})
    _write(tmp_path / "csv" / "metrics.csv", rows)
    logger = ContinuingCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    logger.continue_from(5)
    logger.log_metrics({"lr-AdamW": 0.1}, 6)
    logger.log_metrics({"train/loss": 1.0 / 6}, 6)
    logger.save()
    kept = _rows(tmp_path)
    assert _steps(kept, "train/loss") == [1, 2, 3, 4, 5, 6]
    assert _steps(kept, "lr-AdamW") == [1, 2, 3, 4, 5, 6]
    assert _steps(kept, "val/loss") == [0, 5]
