"""Preemption and Ctrl-C: finish the optimizer step, save it, say how to resume, exit non-zero.

SLURM and Kubernetes send SIGTERM before they kill a job; a user presses Ctrl-C. Either way the
run stops at the end of the current optimizer step, writes `checkpoints/last.ckpt` there (the
same point a periodic checkpoint is taken, so the resumed run continues exactly), and raises
`RunInterrupted`; the entry point prints the command that resumes and exits with 128 + the
signal's number (143 for SIGTERM, 130 for Ctrl-C), as a shell reports a process that a signal
stopped. A second Ctrl-C stops at once, without saving.

Lightning's own SIGTERM handler stays in place: it records the signal (`trainer.received_sigterm`)
and, under DDP, stops every rank at the next batch. This callback reads that record, and under
DDP agrees with the other ranks on whether to stop, so that all of them save the same step.

A signal can land at any moment of a run; each one has its rule:
- before the first optimizer step (data preparation, model loading, the reference cache,
  validation before training): `BeforeTraining`, entered by the entry point, stops at once with
  `StoppedAtOnce` (nothing to save), and the data workers die with the run;
- in validation (its batches, the generations table, a best checkpoint's write): the run stops
  there and saves the state the validation started from, that of the last optimizer step, which
  a resumed run continues by validating again;
- after the last optimizer step (its checkpoint, the curves, the export): the end of the run is
  finished first, then the run exits 128 + the signal (`BeforeTraining.late`).
"""

from __future__ import annotations

import copy
import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from kto_lightning.runs.checkpointing import (
    INTERRUPTED_KEY,
    AfterOptimizerStep,
    restore_rng_states,
    save_rng_states,
)
from kto_lightning.runs.run_stages import (
    RunInterrupted,
    StoppedAtOnce,
    _enter_stage,
    note_late_signal,
)

log = logging.getLogger("kto_lightning")

# Names other modules import from here (the stops outside the training loop are in run_stages).
__all__ = [
    "SaveOnInterrupt",
    "stop_requested",
]


class SaveOnInterrupt(AfterOptimizerStep):
    """On SIGTERM or a first Ctrl-C, save `<dirpath>/last.ckpt` after the current optimizer
    step and stop with RunInterrupted; in validation, save the state it started from.

    Args:
        dirpath: the checkpoint folder of the run.
        filename: the checkpoint's name in it; `last.ckpt` is where resume=auto and README's
            commands look.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last.ckpt") -> None:
        super().__init__()
        self.path = Path(dirpath) / filename
        self._ctrl_c = False
        self._previous_handler: Any = None
        self._before_validation: dict[str, Any] | None = None  # loops and RNG states
        self._loops_override: dict[str, Any] | None = None
        self.saving = False  # while this callback's own save runs
        self.stopped: RunInterrupted | None = None  # set once the stopped step is saved

    # ------------------------------------------------------------------ Ctrl-C
    def _on_ctrl_c(self, signum: int, frame: FrameType | None) -> None:
        if self._ctrl_c:  # the second press: stop now, without saving
            self._restore_handler()
            raise StoppedAtOnce(
                signum,
                "training (Ctrl-C twice)",
                "without saving: resume from the run's last periodic checkpoint, if it has one",
            )
        self._ctrl_c = True
        log.warning(
            "Ctrl-C: stopping after this optimizer step to save a checkpoint; press Ctrl-C again "
            "to stop at once without saving"
        )

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    @property
    def requested(self) -> bool:
        """Whether Ctrl-C asked the run to stop (SIGTERM: `trainer.received_sigterm`)."""
        return self._ctrl_c

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _enter_stage("training")
        # A signal handler can only be set from the main thread (not in a notebook's worker).
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_ctrl_c)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()
        self._stop_if_saved()
        _enter_stage("finishing")
        if self._ctrl_c or trainer.received_sigterm:
            # Landed after the last step's save point (in the last checkpoint's write): the
            # end of the run goes on, and the entry point exits as the signal asked.
            note_late_signal(signal.SIGINT if self._ctrl_c else signal.SIGTERM)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handler()

    # ------------------------------------------------------------------ stopping
    def _asked(self, trainer: L.Trainer) -> bool:
        asked = self._ctrl_c or trainer.received_sigterm
        if trainer.world_size > 1:  # every rank saves the same step, or none does
            asked = trainer.strategy.reduce_boolean_decision(asked, all=False)
        return asked

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.stopped is not None or not (self._asked(trainer) and self.stepped(trainer)):
            return  # mid-accumulation: the next optimizer step is the point
        self._save(trainer, "")
        # Stopping waits for the next hook: Lightning hands this batch's metrics to the loggers
        # after this one, and they belong with the step just saved. On SIGTERM Lightning itself
        # stops first, with SIGTERMException, which `train` turns into `self.stopped`.

    def _save(self, trainer: L.Trainer, during: str) -> None:
        self.saving = True
        try:
            trainer.save_checkpoint(self.path, weights_only=False)  # the whole state: resumable
        finally:
            self.saving = False
        signal_number = signal.SIGINT if self._ctrl_c else signal.SIGTERM
        self.stopped = RunInterrupted(signal_number, self.path, trainer.global_step, during)

    def _stop_if_saved(self) -> None:
        if self.stopped is not None:
            raise self.stopped

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_batch_start(trainer, *args)
        self._stop_if_saved()

    # ------------------------------------------------------------------ validation
    def _in_fit(self, trainer: L.Trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_saved()  # a validation due at this step would only delay the stop
        if not self._in_fit(trainer):
            return
        # The state of the last optimizer step, as this validation starts: what a signal
        # during it saves. Lightning's loops are marked as in the first validation batch, so
        # a resumed run validates again before its next step, as the uninterrupted run did.
        loops = {
            name: copy.deepcopy(getattr(trainer, name).state_dict())
            for name in ("fit_loop", "validate_loop", "test_loop", "predict_loop")
        }
        progress = loops["fit_loop"]["epoch_loop.val_loop.batch_progress"]
        for counts in (progress["total"], progress["current"]):
            counts["ready"] += 1
            counts["started"] += 1
        rng: dict[str, Any] = {}
        save_rng_states(rng)
        self._before_validation = {"loops": loops, "rng": rng}

    def _stop_in_validation(self, trainer: L.Trainer) -> None:
        state = self._before_validation
        if state is None or self.stopped is not None or not self._asked(trainer):
            return
        now: dict[str, Any] = {}
        save_rng_states(now)
        restore_rng_states(state["rng"])  # the checkpoint takes the RNG states from here
        self._loops_override = state["loops"]
        try:
            self._save(trainer, "validation")
        finally:
            self._loops_override = None
            restore_rng_states(now)
        raise self.stopped  # type: ignore[misc]  # set by _save

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.saving:
            checkpoint[INTERRUPTED_KEY] = True
        if self._loops_override is not None:
            checkpoint["loops"] = self._loops_override

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._stop_in_validation(trainer)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_in_validation(trainer)  # after the generations table, listed before this

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_in_validation(trainer)  # after a best checkpoint's write
        self._before_validation = None


def stop_requested(trainer: L.Trainer) -> bool:
    """Whether SIGTERM or a first Ctrl-C asked this process's run to stop: work that can be
    cut short (the generations table) ends early."""
    ctrl_c = any(isinstance(c, SaveOnInterrupt) and c.requested for c in trainer.callbacks)  # type: ignore[attr-defined]
    return ctrl_c or trainer.received_sigterm
