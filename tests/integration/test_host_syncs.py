"""Host synchronisations per optimizer step of the default run.

An operator whose result size or value the host needs (`item`, `nonzero`, `masked_select`,
`unique`, ...) makes the host wait for every kernel queued before it; on a GPU the device then
idles while the host catches up. On CPU nothing waits, but the operators are the same ones, so
counting them here counts the waits a GPU step would have.
"""

from __future__ import annotations

import collections
import contextlib
import traceback
from collections.abc import Iterator

import lightning as L
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from kto_lightning.cli.run_build import build
from kto_lightning.cli.run_fit import train

# Operators whose output size depends on device values: the host must wait to allocate it.
SIZED_BY_VALUES = {
    "nonzero",
    "masked_select",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "repeat_interleave",  # without output_size
}
# Tensor methods that read values on the host. (A `.to(device)` cannot be told from a move to
# the host on a CPU run, where every device is the host, so copies are not counted.)
READ_ON_HOST = {"item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"}


def _where() -> str:
    frames = [f for f in traceback.extract_stack()[:-2] if "torch/" not in f.filename]
    return " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in reversed(frames[-5:]))


class _ToHost(TorchFunctionMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in READ_ON_HOST and not self.counter.is_paused:
            self.counter.calls[f"{name} <- {_where()}"] += 1
        return func(*args, **(kwargs or {}))


class _SizedByValues(TorchDispatchMode):
    def __init__(self, counter: SyncCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SIZED_BY_VALUES and not self.counter.is_paused:
            self.counter.calls[f"{name} <- {_where()}"] += 1
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """Counts the calls that make the host wait for the device: a read of device values on the
    host (a Python method call: `item`, `tolist`, `bool(t)` ...) and an operator whose
    output size depends on device values (`nonzero`, `masked_select`, `unique` ...), with where
    each was called from (for the failure message). On a CPU run every tensor is on the host,
    so each call is counted as the wait it would be on a GPU."""

    def __init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.is_paused = False
        self._modes = (_ToHost(self), _SizedByValues(self))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.is_paused = True
        try:
            yield
        finally:
            self.is_paused = False

    def __enter__(self) -> SyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


class CountSteps(L.Callback):
    """Counts from the start of each of `steps` (1-based optimizer steps) to the end of the
    module's own `on_train_batch_end`, where it logs: the forward and backward passes, the
    optimizer step, every callback (guards, progress lines, checkpoints) and the module's logging.

    Lightning's logger connector then writes what was logged; the module hands it host tensors,
    so nothing there reads the device.
    """

    def __init__(self, module: L.LightningModule, steps: range) -> None:
        self.steps, self.counter = steps, SyncCounter()
        self._counting = False
        hook = module.on_train_batch_end

        def on_train_batch_end(*args, **kwargs):
            hook(*args, **kwargs)
            if self._counting:
                self._counting = False
                self.counter.__exit__(None, None, None)

        module.on_train_batch_end = on_train_batch_end  # type: ignore[method-assign]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 in self.steps:
            self._counting = True
            self.counter.__enter__()


def test_the_default_run_syncs_at_most_twice_an_optimizer_step(make_config) -> None:
    # The default run (default callbacks, CSV logger, progress lines), steps 9-11: step 10 is a
    # logging step (trainer.log_every_n_steps=10), where metrics and a progress line are read.
    cfg = make_config("trainer.max_steps=12", "validate_before_training=false", fast=False)
    run = build(cfg)
    collate = run.datamodule.collator

    def host_collate(examples):
        # Batches are collated on the host, before they reach the device: not counted.
        with counting.counter.paused():
            return collate(examples)

    run.datamodule.collator = host_collate
    steps = range(9, 12)
    counting = CountSteps(run.module, steps)
    run.trainer.callbacks.append(counting)
    train(cfg, run=run)

    assert run.trainer.global_step == 12
    calls = counting.counter.calls
    total = sum(calls.values())
    report = "\n".join(f"{n} x {where}" for where, n in calls.most_common())
    assert total <= 2 * len(steps), f"{total} syncs in {len(steps)} steps:\n{report}"
    # The non-finite guard's one flag per step is among them: the check still runs.
    assert any("guards.py" in where for where in calls), report
