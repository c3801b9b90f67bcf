"""A training run from its composed config to its objective: resume, fit, record, report.

`train` resumes or claims the run folder and fits what `run_build.build` made; `run_job` is the
body of `python -m kto_lightning.train`: signals, one-line errors, a sweep's job records.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import shlex
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from kto_lightning.cli.guards import explain_missing_value, explain_unknown_key
from kto_lightning.cli.lifecycle import (
    scalar_metrics,
)
from kto_lightning.cli.run_build import Run, build
from kto_lightning.common.security import scrub_hydra_record
from kto_lightning.errors import ConfigError, TrainingDiverged, causes, user_error
from kto_lightning.reporting.wandb_logging import (
    finishing_wandb_run,
)
from kto_lightning.runs.checkpointing import (
    remove_partial_checkpoints,
)
from kto_lightning.runs.resume import find_resume
from kto_lightning.runs.run_dir import claim_run_dir, output_dir_key
from kto_lightning.runs.run_record import newest_checkpoint
from kto_lightning.runs.run_records import OBJECTIVE_FILE, read_objective
from kto_lightning.runs.run_stages import BeforeTraining, RunInterrupted, StoppedAtOnce
from kto_lightning.runs.sweeps import (
    in_sweep,
    job_result,
    record,
    shown_overrides,
)

log = logging.getLogger("kto_lightning")


def train(cfg: DictConfig, run: Run | None = None) -> float | None:
    """Build from `cfg` (unless given `run`), fit; returns `cfg.objective` for the sweeper."""
    remove_partial_checkpoints(Path(cfg.paths.output_dir).resolve().parent)
    saved = find_resume(cfg)  # before data and model: a bad checkpoint stops the run here
    key = output_dir_key(cfg)
    if saved is not None and saved.run_dir is not None:
        # The run goes on where it was: checkpoints, metrics, curves, export and objective.
        if saved.run_dir != Path(cfg.paths.output_dir).resolve():
            log.info(
                "resume: continuing in %s (this launch's own log stays in %s)",
                saved.run_dir,
                cfg.paths.output_dir,
            )
            remove_partial_checkpoints(saved.run_dir.parent)
        cfg.paths.output_dir = str(saved.run_dir)
        key = "resume"
    # One run per folder: refused while another live run writes there, or when it holds another
    # run's checkpoints and this run does not resume them.
    claim_run_dir(Path(cfg.paths.output_dir), key, resumed=key == "resume")
    if saved is not None and saved.finished:
        log.info(
            "resume: the run of %s already finished (step %d, epoch %d); nothing to train",
            saved.path,
            saved.global_step,
            saved.epoch,
        )
        recorded = read_objective(cfg.paths.output_dir)  # what the finished run wrote, if any
        return recorded[1] if recorded is not None else None
    run = run or build(cfg, resumed_step=saved.global_step if saved is not None else None)
    if cfg.validate_before_training and saved is None:
        run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
    ckpt_path = str(saved.path) if saved is not None else None
    try:
        run.trainer.fit(
            run.module, datamodule=run.datamodule, ckpt_path=ckpt_path, weights_only=True
        )
    except SIGTERMException:  # Lightning stops on SIGTERM after the step SaveOnInterrupt saved
        if run.interrupt.stopped is None:
            raise
        raise run.interrupt.stopped from None
    if saved is not None and saved.interrupted and saved.at_last_step:
        # A signal stopped it after its last step, before that step's validation: Lightning's
        # loop, already at max_steps, ends at once, so the validation is run here.
        run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
    return objective(cfg.get("objective"), run.trainer)


def objective(name: str | None, trainer: L.Trainer) -> float | None:
    """The metric `name` after the fit (None when not finite), also written to objective.json."""
    if not name:
        return None
    metrics = scalar_metrics(trainer.callback_metrics)
    if name not in metrics and not any(trainer.num_val_batches):
        log.warning(
            "objective=%s: no validation batch ran (trainer.limit_val_batches=%s), so the run has "
            "no objective; it returns none to a sweeper",
            name,
            trainer.limit_val_batches,
        )
        return None
    if name not in metrics:
        raise ConfigError(f"objective={name!r} was not logged; logged metrics: {sorted(metrics)}")
    value = metrics[name] if math.isfinite(metrics[name]) else None
    if trainer.is_global_zero:
        record = {"objective": name, "value": value}
        (Path(trainer.default_root_dir) / OBJECTIVE_FILE).write_text(json.dumps(record) + "\n")
    return value


def release_device_memory() -> None:
    """Free what a finished run left on the device: Lightning's trainer and module refer to each
    other, so they go with the garbage collector's next pass, not at once."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resume_command(checkpoint: Path | str) -> str:
    """The command line that resumes this run from `checkpoint`: its overrides (secret-named
    ones shown as ***, for the user to fill in again) and `resume=`."""
    task = [o for o in HydraConfig.get().overrides.task if o.partition("=")[0] != "resume"]
    return shlex.join(
        [sys.executable.rsplit("/", 1)[-1], "-m", "kto_lightning.train", *shown_overrides(task),
         f"resume={checkpoint}"]
    )  # fmt: skip


def run_job(cfg: DictConfig) -> float | None:
    """The body of the `train` entry point: `train(cfg)`, its signals and errors handled."""
    scrub_hydra_record(cfg)
    # SIGTERM and Ctrl-C outside the training loop: at once before it (data preparation, model
    # loading), after the end of the run's work once it is past its last step.
    signals = BeforeTraining()
    try:
        with finishing_wandb_run(), signals:  # else a sweep's next job logs into this job's run
            value = train(cfg)
    except RunInterrupted as stopped:
        _record_job(cfg, None, "interrupted", str(stopped))
        log.error("%s", stopped)
        print(f"{stopped}; resume with:\n  {resume_command(stopped.checkpoint)}", file=sys.stderr)
        raise SystemExit(stopped.exit_code) from None
    except SIGTERMException:  # Lightning stopped the run before a step could be saved
        _record_job(cfg, None, "interrupted", "SIGTERM between optimizer steps")
        saved = newest_checkpoint(Path(cfg.paths.output_dir))
        where = f"resume with:\n  {resume_command(saved)}" if saved else "no checkpoint yet"
        print(f"stopped by SIGTERM between optimizer steps; {where}", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except (StoppedAtOnce, Exception) as error:
        # Also behind another error: a library's cleanup may raise one of its own on the way out.
        at_once = next((e for e in causes(error) if isinstance(e, StoppedAtOnce)), None)
        if at_once is not None:
            _record_job(cfg, None, "interrupted", str(at_once))
            log.error("%s", at_once)
            print(at_once, file=sys.stderr)
            raise SystemExit(at_once.exit_code) from None
        problem = user_error(error) or explain_unknown_key(error) or explain_missing_value(error)
        if problem is None:
            # A bug: its traceback, through the log rather than Hydra's report (which echoes the
            # overrides, secrets included).
            log.exception("the run failed")
        else:  # a problem the user can fix: one clear line, no traceback
            log.error("%s", problem)
            print(f"error: {problem}", file=sys.stderr)
        status = "diverged" if isinstance(problem, TrainingDiverged) else "failed"
        if _record_job(cfg, None, status, str(problem or repr(error))):
            return None  # the sweeper goes on with the next job
        raise SystemExit(1) from None
    finally:
        # A run's models and optimizer stay on the device at its end, finished or failed
        # (keep_state_on_device); they are freed here, before a sweep's next job.
        release_device_memory()
    _record_job(cfg, value, "completed")
    if signals.late is not None:  # the end of the run was finished first; a sweep stops here
        name = signal.Signals(signals.late).name
        message = f"stopped by {name} after the last training step; the run finished first"
        log.warning("%s", message)
        print(f"{message}: nothing to resume", file=sys.stderr)
        raise SystemExit(128 + signals.late)
    return value


def _record_job(cfg: DictConfig, value: float | None, status: str, message: str = "") -> bool:
    """In a sweep, add this job's row to sweep_results.csv and return True; else False."""
    if not in_sweep():
        return False
    output_dir = Path(cfg.paths.output_dir)
    table = record(job_result(cfg.get("objective"), value, status, output_dir, message))
    if status != "completed":
        log.warning("job %s %s; recorded in %s", output_dir.name, status, table)
    return True
