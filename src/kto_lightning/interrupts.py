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
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L

from kto_lightning.checkpointing import AfterOptimizerStep
from kto_lightning.errors import KTOError

log = logging.getLogger("kto_lightning")


class RunInterrupted(KTOError):
    """Training stopped on a signal; a checkpoint of the last finished step was saved.

    Attributes:
        signal_number: the signal that stopped the run (SIGTERM or SIGINT).
        checkpoint: where the stopped run was saved.
        step: the optimizer step it was saved at.
    """

    def __init__(self, signal_number: int, checkpoint: Path, step: int) -> None:
        name = signal.Signals(signal_number).name
        super().__init__(f"training stopped by {name} at step {step}, saved to {checkpoint}")
        self.signal_number, self.checkpoint, self.step = signal_number, checkpoint, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number


class SaveOnInterrupt(AfterOptimizerStep):
    """On SIGTERM or a first Ctrl-C, save `<dirpath>/last.ckpt` after the current optimizer
    step and stop with RunInterrupted.

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
        self.stopped: RunInterrupted | None = None  # set once the stopped step is saved

    # ------------------------------------------------------------------ Ctrl-C
    def _on_ctrl_c(self, signum: int, frame: FrameType | None) -> None:
        if self._ctrl_c:  # the second press: stop now, as Python would
            self._restore_handler()
            raise KeyboardInterrupt
        self._ctrl_c = True
        log.warning(
            "Ctrl-C: stopping after this optimizer step to save a checkpoint; press Ctrl-C again "
            "to stop at once without saving"
        )

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A signal handler can only be set from the main thread (not in a notebook's worker).
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_ctrl_c)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()
        self._stop_if_saved()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handler()

    # ------------------------------------------------------------------ stopping
    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        stepped = self.stepped(trainer)
        asked = self._ctrl_c or trainer.received_sigterm
        if trainer.world_size > 1:  # every rank saves the same step, or none does
            asked = trainer.strategy.reduce_boolean_decision(asked, all=False)
        if self.stopped is not None or not (asked and stepped):
            return  # mid-accumulation: the next optimizer step is the point
        trainer.save_checkpoint(self.path, weights_only=False)  # the whole state: resumable
        signal_number = signal.SIGINT if self._ctrl_c else signal.SIGTERM
        self.stopped = RunInterrupted(signal_number, self.path, trainer.global_step)
        # Stopping waits for the next hook: Lightning hands this batch's metrics to the loggers
        # after this one, and they belong with the step just saved. On SIGTERM Lightning itself
        # stops first, with SIGTERMException, which `train` turns into `self.stopped`.

    def _stop_if_saved(self) -> None:
        if self.stopped is not None:
            raise self.stopped

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_batch_start(trainer, *args)
        self._stop_if_saved()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_saved()  # a validation due at this step would only delay the stop
