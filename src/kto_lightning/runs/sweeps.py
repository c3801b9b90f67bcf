"""What a sweep keeps of each job: one row of `sweep_results.csv` at the sweep's root.

A job that fails (a config error, the NaN guard, a crash) is recorded as such and returns no
objective, so the sweeper goes on to the next job: a grid sweep runs every job, and Optuna marks
the trial failed (see conf/hparams_search/optuna.yaml). An interrupt (SIGTERM, Ctrl-C) is not a
failure: it stops the whole sweep, and `resume=auto` on the same command finishes it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kto_lightning.common.security import is_secret_key

log = logging.getLogger("kto_lightning")

RESULTS_FILE = "sweep_results.csv"
# Overrides that do not name a run: they change how it is carried out, not what it is.
NOT_IN_DIRNAME = ("seed", "resume")
MAX_DIRNAME = 160


@dataclass(frozen=True)
class JobResult:
    """One job of a sweep, as `sweep_results.csv` records it."""

    job: int
    overrides: str  # as given, secret-named values shown as ***
    objective: str  # the metric's name
    value: float | None
    status: str  # completed, finished earlier, failed, diverged or interrupted
    run_dir: str
    message: str = ""


def in_sweep() -> bool:
    """Whether this process runs a job of a multirun (`-m`, or an hparams_search)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def shown_overrides(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """`overrides` with the value of every secret-named key replaced by ***."""
    shown = []
    for override in overrides:
        written_key, _, _ = override.partition("=")
        shown.append(f"{written_key}=***" if is_secret_key(written_key.lstrip("+~")) else override)
    return shown


def job_dirname(overrides: list[str] | tuple[str, ...]) -> str:
    """A sweep job's folder name from its overrides: sorted, `key=value` joined by commas, like
    Hydra's override_dirname, but without secret-named keys (a folder name is printed and
    logged everywhere), `seed` and `resume`, with `/` in a value (a path) made `_`, and cut to
    MAX_DIRNAME bytes (the job's number is put before it)."""
    kept = sorted(
        override.replace("/", "_")
        for override in overrides
        if (key := override.partition("=")[0].lstrip("+~")) not in NOT_IN_DIRNAME
        and not is_secret_key(key)
    )
    name = ",".join(kept)
    if len(name.encode()) <= MAX_DIRNAME:
        return name
    # A file system refuses names over 255 bytes: a prefix, and a hash that keeps it unique.
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{name.encode()[: MAX_DIRNAME - 11].decode(errors='ignore')}-{digest}"


def record(result: JobResult) -> Path:
    """Append `result` to the sweep's table (created with its header by the first job).

    Each row is written in a single `write` to a file opened for appending, so jobs that a
    parallel launcher runs at once do not interleave their rows.
    """
    path = Path(HydraConfig.get().sweep.dir) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    row = io.StringIO()
    writer = csv.writer(row)
    try:  # only the first job to get here creates the file and writes the header
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        writer.writerow([field.name for field in fields(JobResult)])
    except FileExistsError:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND)
    values = asdict(result)
    values["value"] = "" if result.value is None else repr(result.value)
    writer.writerow(values.values())
    try:
        os.write(descriptor, row.getvalue().encode())
    finally:
        os.close(descriptor)
    return path


def job_result(
    objective: str | None, value: float | None, status: str, run_dir: Path, message: str = ""
) -> JobResult:
    """This job's row, read from Hydra's record of the job."""
    hydra = HydraConfig.get()
    return JobResult(
        job=int(hydra.job.num),
        overrides=" ".join(shown_overrides(list(hydra.overrides.task))),
        objective=objective or "",
        value=value,
        status=status,
        run_dir=str(run_dir),
        message=message.splitlines()[0][:300] if message else "",
    )


def register_resolvers() -> None:
    """`${kto.job_dirname:${hydra.overrides.task}}`, used by conf/hydra for a job's folder."""
    if not OmegaConf.has_resolver("kto.job_dirname"):
        OmegaConf.register_new_resolver("kto.job_dirname", lambda task: job_dirname(list(task)))


def _statuses(path: Path) -> Counter[str]:
    with path.open(newline="") as file:
        return Counter(row["status"] for row in csv.DictReader(file))


class SweepSummary(Callback):
    """A Hydra callback: at the end of a sweep, count its jobs by status from the table."""

    sweep_dir: Path | None = None  # the sweep under way, for `explain_failed_sweep`

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepSummary.sweep_dir = Path(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = Path(config.hydra.sweep.dir) / RESULTS_FILE
        if not path.is_file():
            return
        statuses = _statuses(path)
        counts = ", ".join(f"{n} {status}" for status, n in sorted(statuses.items()))
        failed = sum(n for status, n in statuses.items() if status != "completed")
        report = log.warning if failed else log.info
        report(
            "sweep: %d jobs (%s); each job's objective and status: %s",
            statuses.total(),
            counts,
            path,
        )


def explain_failed_sweep(error: BaseException) -> str | None:
    """One line for Optuna's "No trials are completed yet", raised at the end of a sweep in
    which no trial returned an objective; None for any other error."""
    if not (isinstance(error, ValueError) and str(error).startswith("No trials are completed")):
        return None
    if SweepSummary.sweep_dir is None:
        return "no trial of the sweep returned an objective (each one failed or logged none)"
    path = SweepSummary.sweep_dir / RESULTS_FILE
    counts = ""
    if path.is_file():
        counts = " (" + ", ".join(f"{n} {s}" for s, n in sorted(_statuses(path).items())) + ")"
    return (
        f"no trial of the sweep returned an objective{counts}: each trial's status and error "
        f"are in {path}"
    )
