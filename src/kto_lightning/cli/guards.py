"""Guards: stop a run at the first non-finite loss or gradient, explain a misspelt config key,
and stop at once when a choice needs a package not installed.

Each guard is one Lightning callback (listed in conf/callbacks/default.yaml) or one pure helper.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import CompactHydraException, ConfigCompositionException
from omegaconf import DictConfig
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from kto_lightning.cli.schemas import accepted_keys
from kto_lightning.common.extras import installed, require
from kto_lightning.common.security import redact_text
from kto_lightning.errors import TrainingDiverged, causes, user_error
from kto_lightning.runs.checkpointing import LastCheckpoint
from kto_lightning.runs.sweeps import explain_failed_sweep


def last_good_checkpoint(trainer: L.Trainer) -> str | None:
    """The newest checkpoint file the run has written (last or best), or None before any."""
    candidates = []
    for callback in trainer.checkpoint_callbacks:
        for attribute in ("last_model_path", "best_model_path"):
            path = getattr(callback, attribute, "")
            if path and Path(path).is_file():
                candidates.append(Path(path))
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, LastCheckpoint) and callback.written is not None:
            candidates.append(callback.written)
    if not candidates:
        return None
    return str(max(candidates, key=lambda p: p.stat().st_mtime))


def _describe(value: Tensor) -> str:
    """'nan', 'inf', '-inf' or a mix of them, for the first non-finite entries of `value`."""
    bad = value.detach().float().flatten()
    bad = bad[~torch.isfinite(bad)]
    return "/".join(sorted({str(v) for v in bad[:16].tolist()})) or "non-finite"


def _all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite, read on the host once.

    The flags are reduced on the device. Sharded gradients (FSDP2's DTensors) reduce to a flag
    over all ranks (one all-reduce), which every rank then reads alike.
    """
    plain = [torch.isfinite(t).all() for t in tensors if not isinstance(t, DTensor)]
    sharded = [torch.isfinite(t).all() for t in tensors if isinstance(t, DTensor)]
    flags = [torch.stack(plain).all()] if plain else []
    if sharded:
        flag = torch.stack(sharded).all()
        assert isinstance(flag, DTensor)
        flags.append(flag.full_tensor())
    return not flags or bool(torch.stack(flags).all())


class NonFiniteGuard(L.Callback):
    """Stop training at the first non-finite loss or policy gradient, naming step and checkpoint.

    Both are checked in `on_before_optimizer_step`, so neither a NaN/inf gradient nor a step
    whose loss went non-finite reaches the weights (with gradient clipping, Lightning clips after
    this hook, and clipping a NaN norm would spread the NaN to every weight). The losses of the
    step's batches (several with accumulation) and every gradient are reduced on the device to
    one flag: one host sync per optimizer step, and the only one a step needs.

    Under fp16 mixed precision the gradient scaler skips overflowing steps on purpose, so the
    gradient check is left to it there; the loss check still runs.

    Steps are numbered from 1: "step 12" is the 12th optimizer step, the one the batch fed.
    """

    def __init__(self) -> None:
        self._step = 0
        self._losses: list[Tensor] = []  # the step's losses so far, detached, on the device

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # The optimizer step this batch contributes to (several batches with accumulation).
        step = trainer.global_step + 1
        if step != self._step:
            self._step, self._losses = step, []

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor
    ) -> None:
        self._losses.append(loss.detach())

    def _stop(self, trainer: L.Trainer, what: str) -> TrainingDiverged:
        checkpoint = last_good_checkpoint(trainer)
        where = (
            f"Last good checkpoint: {checkpoint} (resume with resume={checkpoint})"
            if checkpoint
            else "Last good checkpoint: no checkpoint written yet"
        )
        return TrainingDiverged(
            f"{what} at step {self._step}; training stopped. {where}. Usual causes: a learning "
            "rate too high, fp16 overflow (try precision=bf16-mixed), or an empty completion."
        )

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer
    ) -> None:
        losses, self._losses = self._losses, []
        named: list[tuple[str, Tensor]] = []
        if getattr(trainer.precision_plugin, "scaler", None) is None:  # fp16: the scaler's job
            policy = getattr(pl_module, "policy", pl_module)
            named = [(n, p.grad) for n, p in policy.named_parameters() if p.grad is not None]
        if _all_finite([*losses, *(g for _, g in named)]):  # the one sync of the step
            return
        # The error path only: name the first offending gradient, else the loss.
        for name, grad in named:
            if not bool(torch.isfinite(grad).all()):
                raise self._stop(
                    trainer,
                    f"non-finite gradient ({_describe(grad)}) in policy.{name} before the "
                    "optimizer step (the weights were not updated)",
                )
        bad = next(loss for loss in losses if not bool(torch.isfinite(loss).all()))
        raise self._stop(trainer, f"non-finite loss ({_describe(bad)})")


# ------------------------------------------------------------------- unknown config keys
def _refused_key(error: BaseException) -> ConfigKeyError | ConfigAttributeError | None:
    """The OmegaConf error behind a composition that refused a key, if `error` is one.

    Hydra raises a ConfigCompositionException from it when a schema or the struct flag refuses
    a key of a file or an override; `schemas.check` raises the same pair for a '+' addition.
    Only errors under a ConfigCompositionException count: a ConfigKeyError raised by code that
    reads a missing key is a bug to show with its traceback, not a spelling to correct.
    """
    composing = False
    for seen in causes(error):
        composing = composing or isinstance(seen, ConfigCompositionException)
        if (
            composing
            and isinstance(seen, ConfigKeyError | ConfigAttributeError)
            and seen.key is not None
            and isinstance(seen.parent_node, DictConfig)
        ):
            return seen
    return None


def explain_unknown_key(error: BaseException) -> str | None:
    """One line naming a config key that its group does not take, or None for any other error.

    The key, its dotted path and the node that refused it are read from the exception objects
    (`key`, `full_key`, `parent_node`); the valid keys are the node's schema fields, its target's
    arguments, or its own keys (see `schemas.accepted_keys`), and difflib picks the nearest.
    """
    refused = _refused_key(error)
    if refused is None:
        return None
    key = str(refused.key)
    full_key = str(refused.full_key or key)
    group = full_key.rpartition(".")[0]
    target, valid = accepted_keys(refused.parent_node)
    valid = [k for k in valid or [] if k != key]
    message = f"{full_key} is not a setting{f' of {target}' if target else ''}; check the spelling"
    if close := difflib.get_close_matches(key, valid, n=1):
        message += f" (did you mean {group + '.' if group else ''}{close[0]}?)"
    if valid:
        message += f". Valid keys: {', '.join(valid)}"
    if target and group:
        message += f" (see conf/{group.split('.')[0]}/)"
    return message


def explain_missing_value(error: BaseException) -> str | None:
    """One line naming a required config key left at `???` (`data=local` without
    `data.source.path`), or None for any other error."""
    missing = next((e for e in causes(error) if isinstance(e, MissingMandatoryValue)), None)
    if missing is None:
        return None
    key = missing.full_key or missing.key
    group = str(key).split(".")[0]
    return (
        f"{key} must be set: the chosen {group} file leaves it open (???); add "
        f"{key}=... to the command line (see conf/{group}/)"
    )


def run_explained(main: Callable[[], object]) -> None:
    """Run a `@hydra.main` function; a key refused while composing prints as one line.

    Hydra composes the config before `main` runs, so `main` cannot catch a refused key, and Hydra
    prints such errors as a report of several lines. With HYDRA_FULL_ERROR=1 it raises them
    instead: a refused key is explained here, and other composition errors are printed as Hydra
    prints them (or raised, when the user set HYDRA_FULL_ERROR=1 to see tracebacks). An error
    that `main` does not turn into one line (a bug) keeps its full traceback.
    """
    user_wants_tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        if _prints_config(sys.argv[1:]):
            _run_redacted(main)
        else:
            check_optional_packages(sys.argv[1:])
            main()
    except CompactHydraException as error:
        problem = explain_unknown_key(error)
        if problem is not None:
            print(f"error: {problem}", file=sys.stderr)
        elif user_wants_tracebacks:
            raise
        else:  # the report Hydra prints without HYDRA_FULL_ERROR
            print(error, file=sys.stderr)
            if isinstance(error.__cause__, OmegaConfBaseException):
                print(error.__cause__, file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as error:
        # Raised outside the task function: Hydra making the run directory (a read-only or
        # full disk), or a sweeper at the end of a sweep (Optuna with no completed trial).
        found = user_error(error)
        problem = str(found) if found is not None else explain_failed_sweep(error)
        if problem is None or user_wants_tracebacks:
            raise
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(1) from None


# Hydra's flags that print the config (or the run's information) instead of running.
_PRINTING_FLAGS = ("--cfg", "-c", "--info", "-i")


def _prints_config(argv: list[str]) -> bool:
    return any(arg.split("=", 1)[0] in _PRINTING_FLAGS for arg in argv)


def _run_redacted(main: Callable[[], object]) -> None:
    """Run `main` with what it prints to stdout (Hydra's `--cfg`/`--info`) held back, then print
    it with the values of secret-named keys as ***."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            main()
    finally:
        sys.stdout.write(redact_text(printed.getvalue()))
        sys.stdout.flush()


# ------------------------------------------------------------------- optional packages
# Choices of a config group (as `group=option` on the command line) that need a package the
# default install leaves out (an extra of pyproject.toml; common/extras.py names which).
OPTIONAL_CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "logger": {"wandb": ("wandb",), "tensorboard": ("tensorboard",)},
    # Hydra cannot even compose the search without its sweeper plugin.
    "hparams_search": {"optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna")},
    "hydra/sweeper": {"optuna": ("hydra_plugins.hydra_optuna_sweeper", "optuna")},
    "strategy": {"deepspeed_stage2": ("deepspeed",), "deepspeed_stage3": ("deepspeed",)},
}


def _needed(group: str, option: str) -> tuple[str, ...]:
    """The optional packages that `group=option` needs."""
    if group == "logger" and option == "tensorboard" and installed("tensorboardX"):
        return ()  # Lightning's TensorBoardLogger falls back on tensorboardX
    return OPTIONAL_CHOICES.get(group, {}).get(option, ())


def check_optional_packages(overrides: list[str]) -> None:
    """Raise ConfigError naming the pip command, before Hydra composes anything, when a
    command-line choice (`logger=wandb`, also in a sweep: `logger=csv,wandb`) needs an optional
    package that is not installed: otherwise a logger fails once the model is loaded, and a
    missing sweeper plugin as a Hydra report that does not say what to install."""
    for override in overrides:
        key, is_choice, value = override.partition("=")
        group = key.lstrip("+~")
        if not is_choice or group not in OPTIONAL_CHOICES:
            continue
        for option in re.findall(r"[\w.-]+", value):  # one option, a sweep's list, [a,b]
            for module in _needed(group, option):
                require(module, f"{group}={option}")
