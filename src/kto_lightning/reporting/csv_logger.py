"""The step every logger writes, and the CSV logger every run writes (`<run dir>/csv/metrics.csv`),
continued by a resumed run.

One numbering for every record of a run: a row's `step` is the optimizer step it belongs to,
counted from 1 (a training row: the step its batch made; a learning-rate row: the step that
rate trains), and a validation row's is the number of optimizer steps done when it ran (0 for
the validation before training). The console, the checkpoint names (`best-step<N>.ckpt`) and
`generations/step_<N>.jsonl` count the same way, from `trainer.global_step`.
"""

from __future__ import annotations

import csv
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.trainer.states import TrainerFn

LogMetrics = Callable[[dict[str, float], int | None], None]


def logged_step(trainer: L.Trainer, step: int | None) -> int:
    """The step a record is written at, from the `step` Lightning hands a logger.

    During a fit Lightning gives `fit_loop.epoch_loop._batches_that_stepped`, which counts the
    optimizer steps done *before* the batch in progress: a training row, the learning rate of
    that batch and a validation run in the middle of the fit all come before Lightning adds the
    batch's step, so each is one behind `trainer.global_step` and the console. Outside a fit
    (`trainer.validate`, before training or after a resume) nothing lags. No caller gives a
    step (a W&B table): the steps done.
    """
    if step is None:
        return trainer.global_step
    return step + 1 if trainer.state.fn == TrainerFn.FITTING else step


class _AtOptimizerSteps:
    """A logger's own `log_metrics`, called with `logged_step` in place of Lightning's step."""

    def __init__(self, log_metrics: LogMetrics, trainer: L.Trainer) -> None:
        self.log_metrics = log_metrics
        self._trainer = weakref.ref(trainer)  # the trainer holds the logger: no cycle

    def __call__(self, metrics: dict[str, float], step: int | None = None) -> None:
        trainer = self._trainer()
        self.log_metrics(metrics, step if trainer is None else logged_step(trainer, step))


class OptimizerStepNumbers(L.Callback):
    """Every logger of the trainer (CSV, TensorBoard, W&B, any other) writes `logged_step`.

    Lightning's loggers are called from its loops and from callbacks (LearningRateMonitor, a
    W&B table) with Lightning's step; this hook is the one place that step is renumbered, so
    nothing else adds or subtracts 1. Part of every run (not of the `callbacks` group).
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for logger in trainer.loggers:
            if not isinstance(logger.log_metrics, _AtOptimizerSteps):  # setup runs per stage
                # An instance attribute: Lightning and the logger's own methods (W&B's
                # log_table) call it as `logger.log_metrics`.
                renumbered = _AtOptimizerSteps(logger.log_metrics, trainer)
                logger.log_metrics = renumbered  # type: ignore[method-assign]


class ContinuingCSVLogger(CSVLogger):
    """Lightning's CSVLogger, which a resumed run appends to instead of starting afresh.

    Lightning's writer deletes an existing metrics.csv when it starts. A run resumed in its own
    run directory calls `continue_from(step)` first: the rows of the steps up to the checkpoint's
    are kept and written back, so metrics.csv and the curves drawn from it run on without a gap;
    later rows (logged after the checkpoint was saved, and so logged again by the resumed run)
    are dropped.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._earlier: tuple[list[str], list[dict[str, str]]] | None = None

    @property
    def metrics_path(self) -> Path:
        return Path(self.log_dir) / "metrics.csv"

    def continue_from(self, step: int) -> None:
        """Keep the rows of metrics.csv of optimizer steps 1..`step` (and validations after at
        most `step` steps): a run resumed from a checkpoint of step `step` logs from the learning
        rate and the training row of step `step` + 1 on (see `logged_step`)."""
        if not self.metrics_path.is_file():
            return
        with self.metrics_path.open(newline="") as file:
            reader = csv.DictReader(file)
            rows = [row for row in reader if row.get("step") and int(row["step"]) <= step]
            self._earlier = (list(reader.fieldnames or []), rows)

    @property
    def experiment(self) -> Any:
        writer = super().experiment
        # Other ranks than 0 get a stand-in that writes nothing.
        if self._earlier is not None and isinstance(writer, ExperimentWriter):
            keys, rows = self._earlier
            self._earlier = None
            with self.metrics_path.open("w", newline="") as file:
                out = csv.DictWriter(file, fieldnames=keys)
                out.writeheader()
                out.writerows(rows)
            # The writer adds the keys it has not seen to this (sorted) header.
            writer.metrics_keys = sorted(keys)
        return writer
