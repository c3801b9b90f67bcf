"""How a signal stops a run, and the stages of a run outside the training loop.

`RunInterrupted`: stopped after a saved optimizer step (SaveOnInterrupt, `interrupts.py`).
`StoppedAtOnce`: stopped where it was, with nothing to save (before the first optimizer step, or
a second Ctrl-C). `BeforeTraining`, entered by the entry point, handles SIGTERM and Ctrl-C before
the first optimizer step and after the last one; SaveOnInterrupt moves it from stage to stage
(`_enter_stage`). The rule for each moment a signal can land is in `interrupts.py`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from kto_lightning.data.tokenize import bind_workers_to_this_process
from kto_lightning.errors import KTOError

log = logging.getLogger("kto_lightning")


class RunInterrupted(KTOError):
    """Training stopped on a signal; a checkpoint of the last finished step was saved.

    Attributes:
        signal_number: the signal that stopped the run (SIGTERM or SIGINT).
        checkpoint: where the stopped run was saved.
        step: the optimizer step it was saved at.
        during: where the signal landed, when not in a training step ("validation").
    """

    def __init__(self, signal_number: int, checkpoint: Path, step: int, during: str = "") -> None:
        name = signal.Signals(signal_number).name
        where = f" during {during}" if during else ""
        super().__init__(f"training stopped by {name}{where} at step {step}, saved to {checkpoint}")
        self.signal_number, self.checkpoint, self.step = signal_number, checkpoint, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number


NOTHING_TRAINED = (
    "before the first training step of this run: nothing was trained, so there is nothing to save "
    "or resume; a data cache left half-written is not used, the next run prepares it again"
)


class StoppedAtOnce(BaseException):
    """A signal that stops the run where it is, with nothing to save: before the first optimizer
    step, or a second Ctrl-C.

    A BaseException, as KeyboardInterrupt is: library code that catches Exception to try another
    way (a model loader, a cache reader) must not swallow it.
    """

    def __init__(self, signal_number: int, during: str, consequence: str = NOTHING_TRAINED) -> None:
        name = signal.Signals(signal_number).name
        super().__init__(f"stopped by {name} during {during}, {consequence}")
        self.signal_number = signal_number

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number


# The innermost module of the project on the stack when a signal lands says what was running;
# the first prefix it starts with names it (the reference cache's modules before the rest of
# models/, which they are in).
_PHASES = (
    ("kto_lightning.models.reference_cache", "the reference cache's fill"),
    ("kto_lightning.models.cache_", "the reference cache's fill"),
    ("kto_lightning.data", "data preparation"),
    ("kto_lightning.models", "model loading"),
)


def _phase(frame: FrameType | None) -> str:
    while frame is not None:
        module = str(frame.f_globals.get("__name__", ""))
        for prefix, phase in _PHASES:
            if module.startswith(prefix):
                return phase
        frame = frame.f_back
    return "the start of the run"


class BeforeTraining:
    """The entry point's SIGTERM and Ctrl-C handling outside the training loop, for one run.

    - before the first optimizer step: stop at once (StoppedAtOnce), naming the phase;
    - during training: nothing (Lightning's handler and SaveOnInterrupt are in charge; Lightning
      calls this handler after its own);
    - after the last step (its checkpoint, the curves, the export, all written by then or being
      written): let the end of the run finish, and keep the signal in `late` for the entry point
      to exit with; a second Ctrl-C stops at once.

    Multiprocessing workers started meanwhile (datasets.map) die with this process, even on
    SIGKILL (kto_lightning.data.tokenize.bind_workers_to_this_process).
    """

    def __init__(self) -> None:
        self.stage = "before"  # "before" -> "training" -> "finishing"
        self.late: int | None = None  # a signal that landed after the last step
        self.pending: StoppedAtOnce | None = None  # a stop asked before training began
        self._pid = os.getpid()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> BeforeTraining:
        global _active
        bind_workers_to_this_process()
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous[number] = signal.signal(number, self._handle)
        _active = self
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        global _active
        _active = None
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, signal_number: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked worker, before it set its own handlers
            return
        if self.stage == "before":
            # Kept as well as raised: raised inside a finalizer or a __del__ (a worker pool's,
            # while data preparation ends), Python prints the exception and goes on; the stop
            # then happens at the next stage (`_enter_stage`), before any optimizer step.
            self.pending = StoppedAtOnce(signal_number, _phase(frame))
            raise self.pending
        if self.stage == "finishing":
            if self.late == signal.SIGINT and signal_number == signal.SIGINT:
                raise StoppedAtOnce(
                    signal_number,
                    "the end of the run (Ctrl-C twice)",
                    "after the last training step: checkpoints/last.ckpt holds it; an export cut "
                    "short is made again with python -m kto_lightning.export",
                )
            self.late = self.late or signal_number
            log.warning(
                "%s after the last training step: finishing the end of the run (last checkpoint, "
                "curves, export) first%s",
                signal.Signals(signal_number).name,
                "; press Ctrl-C again to stop at once" if signal_number == signal.SIGINT else "",
            )


_active: BeforeTraining | None = None


def _enter_stage(stage: str) -> None:
    if _active is None:
        return
    if _active.pending is not None:  # asked before training, and swallowed on its way out
        raise _active.pending
    _active.stage = stage


def note_late_signal(signal_number: int) -> None:
    """Keep a signal that landed after the last step's save point, for the entry point to exit
    with (`BeforeTraining.late`); nothing outside a `BeforeTraining`."""
    if _active is not None:
        _active.late = _active.late or signal_number
