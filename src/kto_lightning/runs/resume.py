"""Which checkpoint a run resumes from, checked before any data or model is loaded.

- `resume=<path>`: that checkpoint (a file, or a sharded folder). It must be readable, be of the
  same model (`SHAPE`), and must not change the learning rate or the schedule: a resumed run
  restores the optimizer's and the scheduler's state, so such a change would be silently ignored.
  Nor may a data file at the same path hold other bytes than the checkpoint's run read (the run
  records a hash of each local data file): the resumed epoch would go on over other rows.

A resumed run continues in the run directory of its checkpoint (`<run dir>/checkpoints/...`):
its checkpoints, metrics.csv, curves, export and objective stay in one place.
- `resume=auto`: the newest checkpoint, among this task's runs, whose saved config matches this
  one on everything that defines the run (`DEFINING`). Runs on other data or with another beta are
  not this run, nor is a run whose data file, at the same path, held other bytes; when only such
  runs exist, the log says which keys or files differ and the run starts fresh. In a sweep each
  job finds its own earlier job this way.

A checkpoint saved before data files were recorded is resumed unchecked, with a note saying so.

A run that already finished (its last epoch or step reached) is not trained again: `train` says
so and returns the objective it recorded.

The keys compared (`DEFINING`, `SHAPE`, `SCHEDULE`) and how a difference is named are in
run_identity.py; the checkpoint is read by checkpointing.load_run_checkpoint, the one reader.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kto_lightning.errors import ConfigError
from kto_lightning.runs.checkpointing import INTERRUPTED_KEY, RUN_CONFIG_KEY, load_run_checkpoint
from kto_lightning.runs.run_identity import (
    DEFINING,
    SCHEDULE,
    SHAPE,
    config_value,
    current_config,
    current_data_files,
    data_changes,
    differences,
)
from kto_lightning.runs.run_record import CHECKPOINTS

log = logging.getLogger("kto_lightning")


@dataclass(frozen=True)
class Saved:
    """A checkpoint, with what it says about its run."""

    path: Path
    config: dict[str, Any]
    global_step: int
    epoch: int
    interrupted: bool = False  # saved by a signal: its step's validation and the run's end remain

    @property
    def run_dir(self) -> Path | None:
        """The run directory the checkpoint was saved in (`<run dir>/checkpoints/<file>`), where
        a resumed run continues; None for a checkpoint kept anywhere else."""
        if self.path.parent.name != CHECKPOINTS:
            return None
        return self.path.parent.parent.resolve()

    @property
    def at_last_step(self) -> bool:
        """Whether it was saved at its run's `trainer.max_steps`."""
        max_steps = config_value(self.config, "trainer.max_steps") or -1
        return 0 < max_steps <= self.global_step

    @property
    def finished(self) -> bool:
        """Whether its run had reached its last epoch or step when it was saved, and done the
        work after it (a signal at the last step leaves its validation and export to do)."""
        if self.interrupted:
            return False
        max_steps = config_value(self.config, "trainer.max_steps") or -1
        max_epochs = config_value(self.config, "trainer.max_epochs")
        return (0 < max_steps <= self.global_step) or (
            max_epochs is not None and max_epochs >= 0 and self.epoch >= max_epochs
        )


def read_checkpoint(path: Path) -> Saved:
    """The run config and progress of the checkpoint at `path`, read without its tensors.

    Raises:
        ConfigError: naming the file, when it is not a readable checkpoint of this project.
    """
    file = path / "meta.pt" if path.is_dir() else path  # a sharded folder keeps them in meta.pt
    advice = "pick another file in its checkpoints folder, or resume=null"
    checkpoint = load_run_checkpoint(file, "resume", advice)
    config = checkpoint[RUN_CONFIG_KEY]
    return Saved(
        path,
        config,
        int(checkpoint["global_step"]),
        int(checkpoint.get("epoch", 0)),
        bool(checkpoint.get(INTERRUPTED_KEY, False)),
    )


def _note_unrecorded(saved: Saved, files: dict[str, dict[str, Any]]) -> None:
    if files:
        log.info(
            "resume: %s records no hash of its data files (saved by an older kto_lightning), so "
            "%s cannot be checked against it; resuming as if unchanged",
            saved.path,
            " and ".join(files),
        )


def _task_folder(output_dir: Path) -> Path:
    """The folder that holds this task's runs: the parent of `runs/` or `multiruns/` above the
    run directory, else the run directory's parent."""
    for folder in output_dir.parents:
        if folder.name in ("runs", "multiruns"):
            return folder.parent
    return output_dir.parent


def _candidates(task: Path, output_dir: Path) -> list[Path]:
    found = [p for p in task.glob("**/checkpoints/*.ckpt") if output_dir not in p.parents]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def find_resume(cfg: DictConfig) -> Saved | None:
    """The checkpoint `cfg.resume` names (see the module's docstring), checked; None: none."""
    resume = cfg.get("resume")
    if resume in (None, ""):
        return None
    if resume != "auto":
        return _named(cfg, str(resume))
    return _auto(cfg)


def _named(cfg: DictConfig, resume: str) -> Saved:
    """The checkpoint of `resume=<path>`; ConfigError where it cannot go on as this run."""
    path = Path(resume)
    if not (path.is_file() or (path / ".metadata").is_file()):
        raise ConfigError(f"resume={resume!r}: no such checkpoint file or sharded folder")
    saved, current = read_checkpoint(path), current_config(cfg)
    other_model = differences(current, saved.config, SHAPE)
    if other_model:
        raise ConfigError(
            f"resume={resume!r} was saved from another model, so its weights do not fit this "
            f"one: {'; '.join(other_model)}. Resume with the model it was saved from, or "
            "start a new run (resume=null)"
        )
    changed = differences(current, saved.config, SCHEDULE)
    if changed:
        raise ConfigError(
            f"resume={resume!r} restores the optimizer and learning-rate schedule saved in the "
            f"checkpoint, so these changes would be ignored: {'; '.join(changed)}. Resume "
            "without them, or start a new run (resume=null)"
        )
    files = current_data_files(cfg)
    other_data = data_changes(current, files, saved.config)
    if other_data:
        raise ConfigError(
            f"resume={resume!r} was trained on other data: {'; '.join(other_data)}. The "
            "resumed epoch would go on over other rows. Put the file back as it was and "
            "resume, or start a new run on it (resume=null); to go on training this "
            "checkpoint on the new rows on purpose, give the file another name and point "
            "data.source.path at it"
        )
    if other_data is None:
        _note_unrecorded(saved, files)
    return saved


def _auto(cfg: DictConfig) -> Saved | None:
    """The newest checkpoint of this run under this task's folder (`resume=auto`), or None."""
    current, output_dir = current_config(cfg), Path(cfg.paths.output_dir).resolve()
    task = _task_folder(output_dir)
    closest: tuple[int, Path, list[str]] | None = None
    files: dict[str, dict[str, Any]] | None = None  # hashed once, for the first candidate
    for path in _candidates(task, output_dir):
        try:
            saved = read_checkpoint(path)
        except ConfigError as error:
            log.warning("resume=auto: skipping %s: %s", path, error)
            continue
        changed = differences(current, saved.config, DEFINING)
        other_data: list[str] | None = []
        if not changed:  # the same settings: the same data files too?
            files = current_data_files(cfg) if files is None else files
            other_data = data_changes(current, files, saved.config)
            changed = other_data or []
        if not changed:
            if other_data is None:
                _note_unrecorded(saved, files or {})
            log.info("resume=auto: resuming %s (step %d)", path, saved.global_step)
            return saved
        if closest is None or len(changed) < closest[0]:
            closest = (len(changed), path, changed)
    if closest is None:
        log.info("resume=auto: no checkpoint under %s; starting from scratch", task)
    else:
        log.info(
            "resume=auto: no checkpoint of this run under %s; the closest, %s, differs in %s. "
            "Starting from scratch",
            task,
            closest[1],
            "; ".join(closest[2]),
        )
    return None
