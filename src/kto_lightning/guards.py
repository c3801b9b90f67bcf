"""Guards: stop a run at the first non-finite loss or gradient, warn when KL stays at zero, and
explain a misspelt config key.

Each guard is one Lightning callback (listed in conf/callbacks/default.yaml) or one pure helper.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.optim import Optimizer

from kto_lightning.errors import KTOError

log = logging.getLogger("kto_lightning")


def last_good_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest checkpoint file the run has written (last or best), or None before any."""
    candidates = []
    for callback in trainer.checkpoint_callbacks:
        for attribute in ("last_model_path", "best_model_path"):
            path = getattr(callback, attribute, "")
            if path and Path(path).is_file():
                candidates.append(Path(path))
    if not candidates:
        return None
    return str(max(candidates, key=lambda p: p.stat().st_mtime))


def _describe(value: Tensor) -> str:
    """'nan', 'inf', '-inf' or a mix of them, for the first non-finite entries of `value`."""
    bad = value.detach().float().flatten()
    bad = bad[~torch.isfinite(bad)]
    return "/".join(sorted({str(v) for v in bad[:16].tolist()})) or "non-finite"


class NonFiniteGuard(L.Callback):
    """Stop training at the first non-finite loss or policy gradient, naming step and checkpoint.

    Gradients are checked in `on_before_optimizer_step`, so a NaN/inf gradient never reaches the
    weights (with gradient clipping, Lightning clips after this hook, and clipping a NaN norm
    would spread the NaN to every weight). The loss is checked in `on_train_batch_end`.

    Under fp16 mixed precision the gradient scaler skips overflowing steps on purpose, so the
    gradient check is left to it there; the loss check still runs.

    Steps are numbered from 1: "step 12" is the 12th optimizer step, the one the batch fed.
    """

    def __init__(self) -> None:
        self._step = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # The optimizer step this batch contributes to (several batches with accumulation).
        self._step = trainer.global_step + 1

    def _stop(self, trainer: L.Trainer, what: str) -> KTOError:
        checkpoint = last_good_checkpoint(trainer)
        where = (
            f"Last good checkpoint: {checkpoint} (resume with resume={checkpoint})"
            if checkpoint
            else "Last good checkpoint: no checkpoint written yet"
        )
        return KTOError(
            f"{what} at step {self._step}; training stopped. {where}. Usual causes: a learning "
            "rate too high, fp16 overflow (try precision=bf16-mixed), or an empty completion."
        )

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, Tensor):
            return
        # One device sync per step (a 0-d bool): negligible next to a forward and backward.
        if not bool(torch.isfinite(loss.detach()).all()):
            raise self._stop(trainer, f"non-finite loss ({_describe(loss)})")

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer
    ) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # fp16: the GradScaler skips overflowing steps itself
        policy = getattr(pl_module, "policy", pl_module)
        named = [(n, p.grad) for n, p in policy.named_parameters() if p.grad is not None]
        if not named:
            return
        # All flags stay on the device and are reduced to one bool: one sync per optimizer step.
        flags = torch.stack([torch.isfinite(g).all() for _, g in named])
        if bool(flags.all()):
            return
        # The error path only: find the first offending tensor to name it.
        name, grad = next(
            (n, g) for (n, g), ok in zip(named, flags.tolist(), strict=True) if not ok
        )
        raise self._stop(
            trainer,
            f"non-finite gradient ({_describe(grad)}) in policy.{name} before the optimizer "
            "step (the weights were not updated)",
        )


class ZeroKLWarning(L.Callback):
    """Warn once when the logged KL reference point `train/kl` stays exactly 0.

    Args:
        patience: consecutive training steps at exactly 0 before the warning.
    """

    def __init__(self, patience: int = 50) -> None:
        self.patience = patience
        self._zero_steps = 0
        self._warned = False

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        kl = trainer.callback_metrics.get("train/kl")
        if kl is None:
            return
        # float() of a device tensor is one small sync per step.
        if float(kl) != 0.0:
            self._zero_steps = 0
            return
        self._zero_steps += 1
        if self._zero_steps == self.patience and not self._warned:
            self._warned = True
            log.warning(
                "train/kl has been exactly 0 for %d consecutive steps: the KL reference point "
                "z_ref is clamped at 0 (the policy's log-ratio on unrelated completions is "
                "negative), so KTO is running without its reference point. This is usual early "
                "with loss.estimator=mismatched or with a tiny loss.beta; consider "
                "loss.estimator=batch, or check that the data's KL rows differ from the main rows.",
                self._zero_steps,
            )


# ------------------------------------------------------------------- unknown config keys
_UNEXPECTED = re.compile(r"unexpected keyword argument '([^']+)'")
_TARGET = re.compile(r"Error in call to target '([^']+)'")
_FULL_KEY = re.compile(r"^full_key: (\S+)\s*$", re.MULTILINE)


def _valid_keys(target: str) -> list[str]:
    """The constructor arguments of `target` ('package.module.Name'), or [] if not importable."""
    module_name, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), name)
        parameters = inspect.signature(obj).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in parameters if p.kind not in kinds and p.name != "self"]


def explain_unknown_key(error: BaseException) -> str | None:
    """A one-line explanation when `error` comes from a config key its target does not take.

    Hydra already rejects a misspelt key given without '+' ("Could not override"); a key added
    with '+group.key=value' reaches the constructor and fails there as a TypeError, which Hydra
    wraps in an InstantiationException naming the target and the config node (`full_key:`).

    Returns None when `error` is something else.
    """
    key = group = target = None
    seen: BaseException | None = error
    while seen is not None:
        text = str(seen)
        if key is None and isinstance(seen, TypeError):
            match = _UNEXPECTED.search(text)
            key = match.group(1) if match else None
        if target is None and (match := _TARGET.search(text)):
            target = match.group(1)
            full_key = _FULL_KEY.search(text)
            group = full_key.group(1) if full_key else None
            if key is None:  # Hydra repeats the TypeError inside its own message
                match = _UNEXPECTED.search(text)
                key = match.group(1) if match else None
        seen = seen.__cause__ or seen.__context__
    if key is None or target is None:
        return None
    setting = f"{group}.{key}" if group else key
    message = f"{setting} is not a setting of {target}; check the spelling"
    valid = _valid_keys(target)
    if close := difflib.get_close_matches(key, valid, n=1):
        message += f" (did you mean {group + '.' if group else ''}{close[0]}?)"
    if valid:
        message += f". Valid keys: {', '.join(valid)}"
    if group:
        message += f" (see conf/{group.split('.')[0]}/)"
    return message
