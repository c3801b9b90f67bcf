"""Checkpoint files that are whole or absent, and finding the one to resume from."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from kto_lightning.errors import ConfigError

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write to a temporary file, then rename: a process killed mid-write leaves no torn file."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        super().save_checkpoint(checkpoint, partial, storage_options)
        os.replace(partial, path)


def resume_checkpoint(resume: str | None, output_dir: str | Path) -> str | None:
    """The checkpoint `resume` names: None, "auto", or a path.

    "auto" takes the newest checkpoint of this task's runs: every `*.ckpt` under
    `<runs folder>/*/checkpoints/`, where the runs folder holds this run's directory.
    """
    if resume in (None, ""):
        return None
    if resume != "auto":
        # A file, or the folder of a sharded checkpoint (strategy=fsdp: one shard per rank).
        if not (Path(resume).is_file() or (Path(resume) / ".metadata").is_file()):
            raise ConfigError(f"resume={resume!r}: no such checkpoint file or sharded folder")
        return str(resume)
    runs = Path(output_dir).resolve().parent
    found = sorted(runs.glob("*/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        log.info("resume=auto: no checkpoint under %s; starting from scratch", runs)
        return None
    log.info("resume=auto: resuming from %s", found[-1])
    return str(found[-1])
