"""What a checkpoint holds, files that are whole or absent, and finding the one to resume from.

A checkpoint holds the trainable weights only (never the reference, which never changes, nor the
frozen base weights under LoRA: both are rebuilt from the model config), the optimizer, the RNG
states and the resolved run config (plain types, loadable with weights_only=True).
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

from kto_lightning.errors import ConfigError
from kto_lightning.runs.moved_paths import current_paths

log = logging.getLogger(__name__)

# Where a checkpoint keeps the resolved run config, so that it alone says how to rebuild its
# model and tokenizer (kto_lightning.export reads it).
RUN_CONFIG_KEY = "kto_lightning_config"
# Set in a checkpoint saved because a signal stopped the run: the work after its step (the
# step's validation, the end of the run) is still to do, even at the run's last step.
INTERRUPTED_KEY = "kto_lightning_interrupted"


def keep_trainable_weights(checkpoint: dict[str, Any], module: nn.Module) -> None:
    """Drop every weight of `checkpoint["state_dict"]` that `module` does not train."""
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    state = checkpoint["state_dict"]
    for key in [k for k in state if k not in trainable]:
        del state[key]


def put_back_frozen_weights(checkpoint: dict[str, Any], module: nn.Module) -> None:
    """Fill the frozen weights in from the live module, so strict loading still checks that
    every trainable one is there. A sharded strategy loads the weights itself: no state_dict."""
    state = checkpoint.get("state_dict")
    if state is not None:
        for key, value in module.state_dict().items():
            state.setdefault(key, value)


def save_rng_states(checkpoint: dict[str, Any]) -> None:
    """The RNG states, so that a resumed run draws what the uninterrupted one would have."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    checkpoint["rng_states"] = states


def restore_rng_states(checkpoint: dict[str, Any]) -> None:
    states = checkpoint.get("rng_states")
    if not states:
        return
    torch.set_rng_state(states["torch"])
    random.setstate(_as_tuple(states["python"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _as_tuple(value: Any) -> Any:
    """random.setstate needs the nested tuples back (a checkpoint may hold lists)."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write beside the destination, then rename: a process killed mid-write leaves no torn file,
    and nothing is staged anywhere else.

    Lightning's own writer stages the file in $TMPDIR (fsspec's transaction) from a second copy
    held in memory: a small /tmp ends the run at its first checkpoint with ENOSPC, and a kill
    mid-write leaves a fragment there that names no run. The partial file here names its host
    and process, so the next start removes it once that process is gone
    (`remove_partial_checkpoints`).
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None or "://" in str(path):  # a remote store: Lightning's way
            super().save_checkpoint(checkpoint, str(path), storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.partial")
        try:
            torch.save(checkpoint, partial)
            _sync(partial)  # the bytes on disk before the name points at them
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)  # a full disk keeps no fragment either
            raise
        _sync(path.parent)  # the rename itself


def _sync(path: Path) -> None:
    """fsync a file or a folder (a file system that cannot sync a folder is left as it is)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        if path.is_file():
            raise
    finally:
        os.close(fd)


def _writer_is_gone(partial: Path) -> bool:
    """Whether the process that was writing `partial` (.<name>.<host>.<pid>.partial) has ended.

    Only a writer on this host can be checked; a file from another host is left alone. A host
    name may hold dots (node1.cluster): the name is matched from its end.
    """
    rest, _, pid = partial.name.removesuffix(".partial").rpartition(".")
    if not pid.isdigit() or not rest.endswith(f".ckpt.{socket.gethostname()}"):
        return False
    return not process_alive(int(pid))


def process_alive(pid: int) -> bool:
    """Whether the process `pid` of this host runs (a zombie counts until its parent reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_partial_checkpoints(runs: Path) -> list[Path]:
    """Delete the half-written checkpoints a killed process left under `runs/*/checkpoints/`.

    A file still being written by a live process (another job of a sweep) is kept.
    """
    removed = [p for p in runs.glob("*/checkpoints/.*.partial") if _writer_is_gone(p)]
    for partial in removed:
        partial.unlink(missing_ok=True)
        log.info("removed %s: a checkpoint whose writer was killed mid-write", partial)
    return removed


class AfterOptimizerStep(L.Callback):
    """A callback that acts at the end of a batch that made an optimizer step: the points where
    a saved state resumes exactly (not in the middle of gradient accumulation)."""

    def __init__(self) -> None:
        self._step_at_batch_start = 0

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._step_at_batch_start = trainer.global_step

    def stepped(self, trainer: L.Trainer) -> bool:
        """Whether the batch now ending made an optimizer step (call from on_train_batch_end)."""
        return trainer.global_step > self._step_at_batch_start


class LastCheckpoint(AfterOptimizerStep):
    """`<dirpath>/last.ckpt`: the newest state, every `every_n_train_steps` and at the end.

    Lightning's ModelCheckpoint rewrites its last.ckpt only when it saves for its own reason (a
    new best), so the end of a run could be missing from it; two of them sharing the name
    version it as last-v1.ckpt. This one file is the run's periodic checkpoint too: saved right
    after an optimizer step, mid-epoch or not, it resumes exactly.

    Args:
        dirpath: the run's checkpoint folder.
        every_n_train_steps: optimizer steps between saves; 0 saves at the end only.
        filename: the file's name in `dirpath`.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike,
        every_n_train_steps: int = 100,
        filename: str = "last.ckpt",
    ) -> None:
        if every_n_train_steps < 0:
            raise ConfigError(
                "callbacks.last_checkpoint.every_n_train_steps must be >= 0, got "
                f"{every_n_train_steps}"
            )
        super().__init__()
        self.path = Path(dirpath) / filename
        self.every_n_train_steps = every_n_train_steps
        self._saved_step = -1
        self._flush_logs = False
        self.end_of_run: tuple[str, float] | None = None  # the final save, for the summary

    @property
    def written(self) -> Path | None:
        """The file, once this run has written it (a file left by another run does not count)."""
        return self.path if self._saved_step >= 0 else None

    def _save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # the whole state: resumable
        self._saved_step = trainer.global_step
        self._flush_logs = True
        for logger in trainer.loggers:  # all but this step's metrics (see on_train_batch_start)
            logger.save()

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_batch_start(trainer, *args)
        if self._flush_logs:
            # Lightning hands a batch's metrics to the loggers after on_train_batch_end: now
            # the metrics up to the saved step are there, and go to disk (metrics.csv) with it,
            # so a run killed later resumes with its metrics whole.
            self._flush_logs = False
            for logger in trainer.loggers:
                logger.save()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        every = self.every_n_train_steps
        if self.stepped(trainer) and every and trainer.global_step % every == 0:
            self._save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Again even at a step just saved: saved after the last batch, the file would not yet
        # count the last epoch as done, and resume=auto would take the run for unfinished.
        start = time.perf_counter()
        self._save(trainer)
        self.end_of_run = (f"last checkpoint: {self.path}", time.perf_counter() - start)


def load_run_checkpoint(path: Path, key: str, advice: str) -> dict[str, Any]:
    """The training checkpoint file at `path`, read on the CPU with weights_only=True (memory
    mapped: its tensors are not read until used). Every read of a run's checkpoint goes through
    here; the run config it returns names modules by their current paths (moved_paths.py), also
    for a checkpoint written before they moved.

    Raises:
        ConfigError: naming `key=path` and ending with `advice`, when the file cannot be read
            (empty, truncated, not a zip) or holds no run config of this project.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # truncated, not a zip, not a checkpoint at all
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise ConfigError(
            f"{key}={str(path)!r}: not a readable checkpoint ({type(error).__name__}: {first}); "
            f"{advice}"
        ) from None
    config = checkpoint.get(RUN_CONFIG_KEY) if isinstance(checkpoint, dict) else None
    if not isinstance(config, dict) or "global_step" not in checkpoint:
        raise ConfigError(
            f"{key}={str(path)!r}: not a kto_lightning training checkpoint (it has no "
            f"'{RUN_CONFIG_KEY}' or 'global_step' entry); {advice}"
        )
    # Written before the modules moved into subpackages: its targets named where they are now.
    checkpoint[RUN_CONFIG_KEY] = current_paths(config)
    return checkpoint
