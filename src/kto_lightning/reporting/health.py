"""The run health report of KTO training: is the run learning, or degenerate?

KTO runs go wrong in a few known ways: the KL reference point stuck at 0, rows whose sigmoid is
flat (no gradient), one class outweighing the other, a reward margin that does not grow. The
module counts the first two on the device each training batch (kto_lightning.core.health) and
logs the counts as `train/health/*`; `RunHealth` reads them where the module reads its metrics
anyway (the logging steps), warns or stops on a state that wastes the run, and at the end of the
fit writes `<run dir>/health.json` (kto_lightning.reporting.health_checks) and logs the report.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L

from kto_lightning.core.losses import KTOLoss
from kto_lightning.errors import ConfigError
from kto_lightning.reporting.health_checks import (
    HealthCounts,
    format_report,
    health_report,
    stuck_states,
)
from kto_lightning.runs.run_records import HEALTH_FILE
from kto_lightning.training.module import KTOModule

log = logging.getLogger("kto_lightning")

ACTIONS = ("warn", "stop")


class RunHealth(L.Callback):
    """Watch a KTO run's health; warn or stop on a state that wastes it; report at the end.

    The counters are read where the module reads its step metrics for the loggers (every
    `trainer.log_every_n_steps` steps), so no step waits for the device on their account; a
    streak that began and ended between two reads is still seen (its longest run is counted).

    Args:
        clamped_kl_patience: consecutive training batches with z_ref clamped to 0 that waste a run.
        saturation_patience: consecutive training batches with every row saturated that do.
        action: `warn` (once per state) or `stop` (warn, then end training at that step).
    """

    def __init__(
        self, clamped_kl_patience: int = 50, saturation_patience: int = 50, action: str = "warn"
    ) -> None:
        for key, value in (
            ("clamped_kl_patience", clamped_kl_patience),
            ("saturation_patience", saturation_patience),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"callbacks.health.{key} must be an integer >= 1, got {value!r}")
        if action not in ACTIONS:
            raise ConfigError(
                f"callbacks.health.action must be one of {', '.join(ACTIONS)}, got {action!r}"
            )
        self.patience = (clamped_kl_patience, saturation_patience)
        self.action = action
        self.margins: list[tuple[int, float]] = []
        self.flagged: set[str] = set()
        self.stopped: str | None = None
        self.report: dict[str, Any] | None = None
        self.end_of_run: tuple[str, float] | None = None  # for the closing summary

    def observe(
        self, step: int, values: Mapping[str, float], trainer: Any = None, can_stop: bool = True
    ) -> None:
        """Take a logged step's `train/...` values: its margin, and any state that wastes the run
        (warned once each; with action=stop and `can_stop`, `trainer.should_stop` set)."""
        margin = values.get("train/rewards/margins", math.nan)
        if math.isfinite(margin) and (not self.margins or self.margins[-1][0] != step):
            self.margins.append((step, margin))
        states = stuck_states(HealthCounts.from_metrics(values), self.patience)
        for kind, message in states.items():
            if kind in self.flagged:
                continue
            self.flagged.add(kind)
            if self.action == "stop" and can_stop:
                message += f" Training stops at step {step} (callbacks.health.action=stop)."
                self.stopped = self.stopped or f"stopped at step {step}: {kind} state"
                if trainer is not None:
                    trainer.should_stop = True
            if trainer is None or trainer.is_global_zero:
                log.warning("%s", message)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        if isinstance(pl_module, KTOModule) and pl_module.logs_this_step():
            # The module reads these values for its own log right after this hook, once.
            self.observe(trainer.global_step, pl_module.step_metrics(), trainer)

    def finish(
        self,
        values: Mapping[str, float],
        step: int,
        loss: KTOLoss,
        trainer: Any = None,
        weights: tuple[float, float] | None = None,
    ) -> dict[str, Any]:
        """The report at the end of the run, from its last training step's values; `weights`
        are the class weights the run's rows trained with (the loss's when None)."""
        self.observe(step, values, trainer, can_stop=False)
        self.report = health_report(
            HealthCounts.from_metrics(values),
            self.margins,
            weights or (loss.desirable_weight, loss.undesirable_weight),
            has_reference_point=loss.reference_estimator != "zero",
            patience=self.patience,
            stopped=self.stopped,
        )
        return self.report

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, KTOModule):
            return  # SFT: no reference point, no classes
        start = time.perf_counter()
        values = pl_module.last_trained_metrics()  # read once here if not yet
        if not values:
            return  # no training step ran
        weights = pl_module.trained_class_weights()
        report = self.finish(values, trainer.global_step, pl_module.loss, trainer, weights)
        if trainer.is_global_zero:
            path = Path(trainer.default_root_dir) / HEALTH_FILE
            path.write_text(json.dumps(report, indent=2) + "\n")
            log.info("%s", format_report(report, path))
            self.end_of_run = (f"run health: {path}", time.perf_counter() - start)
