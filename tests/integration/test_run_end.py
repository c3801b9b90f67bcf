"""The end of a run: nothing is copied between devices to be thrown away."""

from __future__ import annotations

import lightning as L
import torch
from torch.overrides import TorchFunctionMode

from kto_lightning.cli.run_build import build
from kto_lightning.cli.run_fit import train

MOVES = {"to", "cpu", "cuda", "pin_memory"}


class _Moves(TorchFunctionMode):
    """Records `Tensor.to/cpu/cuda/pin_memory` calls on the watched tensors (matched by id).

    On CPU such a call returns the tensor itself, but it is still the call that would copy it
    on a GPU, so it is what this watches for.
    """

    def __init__(self, watched: set[int]) -> None:
        super().__init__()
        self.watched = watched
        self.moves: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in MOVES and args and id(args[0]) in self.watched:
            self.moves.append(f"{name}{tuple(args[1:])}{kwargs or ''}")
        return func(*args, **(kwargs or {}))


class WatchTheEnd(L.Callback):
    """Watches the module's parameters, buffers and optimizer states from the end of training
    (after the final checkpoint) to the return of `fit`: Lightning's strategy teardown and the
    end-of-fit callbacks. Likewise after the validation run before training."""

    def __init__(self) -> None:
        self.mode: _Moves | None = None
        self.moves: list[str] = []

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        watched = {id(t) for t in [*pl_module.parameters(), *pl_module.buffers()]}
        for optimizer in trainer.optimizers:
            for state in optimizer.state.values():
                watched |= {id(v) for v in state.values() if isinstance(v, torch.Tensor)}
        self.mode = _Moves(watched)
        self.mode.__enter__()

    def stop(self) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.moves += self.mode.moves
            self.mode = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.training and trainer.state.fn == "validate":
            self._start(trainer, pl_module)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before the fit's own setup, which puts the model on its device (there already).
        self.stop()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)


def test_the_end_of_training_moves_no_weights_or_optimizer_state(make_config) -> None:
    cfg = make_config("export.enabled=false")  # the export copies weights to disk on purpose
    run = build(cfg)
    watcher = WatchTheEnd()
    run.trainer.callbacks.append(watcher)
    try:
        train(cfg, run=run)
    finally:
        watcher.stop()
    assert run.trainer.global_step == 6
    # The watch did run: it saw the optimizer's states (AdamW's two moments per parameter).
    assert run.trainer.optimizers[0].state
    assert watcher.moves == [], f"tensors moved at the end of the run: {watcher.moves[:5]}"
    # Training's end leaves the optimizer to the module, where it was.
    assert run.trainer.strategy.optimizers == run.trainer.optimizers
