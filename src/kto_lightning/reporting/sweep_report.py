"""The jobs of a sweep side by side: who they are, how they ended, their final validation metrics.

`find_jobs` reads a sweep directory (a Hydra multirun folder: one run directory per job, and the
`sweep_results.csv` that sweeps.record fills); `short_labels` names each job by the overrides
that tell it apart; `write_summary` writes `<sweep>/sweep_summary.csv` and returns the same table
as text. kto_lightning.plot draws the curves.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kto_lightning.errors import KTOError
from kto_lightning.runs.run_records import (
    METRICS_FILE,
    OVERRIDES_FILE,
    last_validation,
    read_metric_rows,
    read_objective,
    recorded_overrides,
)
from kto_lightning.runs.sweeps import RESULTS_FILE, shown_overrides

SUMMARY_FILE = "sweep_summary.csv"
# (column in the printed table, metric): the final validation metrics of the summary.
SUMMARY_METRICS = (
    ("auroc", "val/rewards/auroc"),
    ("accuracy", "val/rewards/accuracy"),
    ("margin", "val/rewards/margins"),
    ("kl", "val/kl"),
    ("loss", "val/loss"),
    ("perplexity", "val/perplexity"),  # an SFT run's (kto_lightning.training.sft)
)
# Hydra names a job's folder `<job number>_<overrides>` (conf/hydra/default.yaml).
JOB_FOLDER = re.compile(r"^(\d+)_")


@dataclass
class Job:
    """One job of a sweep and what its run directory holds."""

    run_dir: Path
    number: int | None = None  # Hydra's job number, when the table or the folder name says it
    overrides: list[str] = field(default_factory=list)  # secret values shown as ***
    status: str = ""  # from sweep_results.csv; "" when the job is not in it
    message: str = ""  # why it failed, from sweep_results.csv
    objective: str = ""
    objective_value: float | None = None
    step: int | None = None  # optimizer steps done at the last validation (metrics.csv)
    final: dict[str, float] = field(default_factory=dict)  # its val/ metrics
    note: str = ""  # why it has no curves; "" when it has

    @property
    def plotted(self) -> bool:
        """Whether the job has validation metrics to draw."""
        return bool(self.final)

    @property
    def name(self) -> str:
        return str(self.number) if self.number is not None else self.run_dir.name


def holds_runs(folder: Path) -> bool:
    """Whether `folder` is a sweep directory: a results table, or subfolders that are runs."""
    if (folder / RESULTS_FILE).is_file():
        return True
    return any(_looks_like_run(child) for child in _subfolders(folder))


def _subfolders(folder: Path) -> list[Path]:
    return sorted(child for child in folder.iterdir() if child.is_dir()) if folder.is_dir() else []


def _looks_like_run(folder: Path) -> bool:
    return (folder / METRICS_FILE).is_file() or (folder / OVERRIDES_FILE).is_file()


def _number(text: str) -> int | None:
    return int(text) if text.strip().isdigit() else None


def _float(text: str) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _table_jobs(sweep_dir: Path) -> list[Job]:
    """The jobs sweep_results.csv lists; a job recorded twice (a resumed sweep) by its last row."""
    path = sweep_dir / RESULTS_FILE
    if not path.is_file():
        return []
    jobs: dict[str, Job] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            recorded = Path(row.get("run_dir") or "")
            if not recorded.name:  # no folder to read: a row that is not a job's
                continue
            # A sweep copied elsewhere: its table still names the folders where they were.
            run_dir = recorded if recorded.is_dir() else sweep_dir / recorded.name
            jobs[str(run_dir.resolve())] = Job(
                run_dir=run_dir,
                number=_number(row.get("job") or ""),
                # sweeps.job_result joins them with spaces (a value with a space splits too).
                overrides=(row.get("overrides") or "").split(),
                status=row.get("status") or "",
                message=row.get("message") or "",
                objective=row.get("objective") or "",
                objective_value=_float(row.get("value") or ""),
            )
    return list(jobs.values())


def _read_run(job: Job) -> None:
    """Fill in what the job's run directory holds: overrides, objective, final metrics."""
    if not job.overrides:
        job.overrides = shown_overrides(recorded_overrides(job.run_dir) or [])
    if job.number is None and (match := JOB_FOLDER.match(job.run_dir.name)):
        job.number = int(match.group(1))
    objective = read_objective(job.run_dir)
    if objective is not None and not job.objective:
        job.objective, job.objective_value = objective
    if not (job.run_dir / METRICS_FILE).is_file():
        job.note = f"no {METRICS_FILE}"
        return
    last = last_validation(read_metric_rows(job.run_dir))
    if last is None:
        job.note = f"no validation rows in {METRICS_FILE}"
        return
    job.step, job.final = last


def find_jobs(sweep_dir: str | Path) -> list[Job]:
    """The jobs of a sweep directory, by job number: those sweep_results.csv lists (failed ones
    included) and every subfolder that is a run.

    Raises KTOError naming the folder when it holds neither.
    """
    sweep_dir = Path(sweep_dir)
    jobs = _table_jobs(sweep_dir)
    listed = {str(job.run_dir.resolve()) for job in jobs}
    jobs += [
        Job(run_dir=child)
        for child in _subfolders(sweep_dir)
        if _looks_like_run(child) and str(child.resolve()) not in listed
    ]
    if not jobs:
        raise KTOError(
            f"{sweep_dir} holds no run: it has no {METRICS_FILE} (a run directory), no "
            f"{RESULTS_FILE} and no subfolder with {METRICS_FILE} or {OVERRIDES_FILE} (a sweep "
            "directory)"
        )
    for job in jobs:
        _read_run(job)
    # Numbered jobs first, by number; any others by folder name.
    jobs.sort(key=lambda job: (job.number is None, job.number or 0, job.name))
    return jobs


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def short_labels(jobs: Sequence[Job]) -> list[str]:
    """Each job's name for a legend: `#<n>` and the overrides whose value differs between jobs.

    A job with no recorded overrides is named by its folder (whose name, in a sweep, holds them).
    """
    settings = [{_key(o): o for o in job.overrides} for job in jobs]
    keys = {key for setting in settings for key in setting}
    differing = {key for key in keys if len({setting.get(key) for setting in settings}) > 1}
    labels = []
    for job, setting in zip(jobs, settings, strict=True):
        shown = [override for key, override in setting.items() if key in differing]
        words = " ".join(shown or job.overrides) or JOB_FOLDER.sub("", job.run_dir.name)
        labels.append(f"#{job.number} {words}" if job.number is not None else words)
    return labels


def _cell(value: float | None) -> str:
    return "" if value is None else repr(value)


def _shown(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}" if math.isfinite(value) else str(value)


def write_summary(sweep_dir: str | Path, jobs: Sequence[Job]) -> tuple[Path, str]:
    """Write `<sweep_dir>/sweep_summary.csv`, one row per job; returns it and the table as text.

    The file holds full precision and the full overrides; the text, 4 decimals and the
    overrides that differ between jobs.
    """
    path = Path(sweep_dir) / SUMMARY_FILE
    header = ["job", "overrides", *(metric for _, metric in SUMMARY_METRICS)]
    header += ["objective", "objective_value", "step", "status", "note", "run_dir"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for job in jobs:
            writer.writerow(
                [job.name, " ".join(job.overrides)]
                + [_cell(job.final.get(metric)) for _, metric in SUMMARY_METRICS]
                + [job.objective, _cell(job.objective_value), "" if job.step is None else job.step]
                + [job.status, job.message or job.note, str(job.run_dir)]
            )
    return path, format_table(jobs)


def format_table(jobs: Sequence[Job]) -> str:
    """The summary as aligned text columns, for the terminal."""
    objectives = sorted({job.objective for job in jobs if job.objective})
    objective_title = f"objective ({objectives[0]})" if len(objectives) == 1 else "objective"
    # The metrics some job logged: an SFT sweep has no reward columns, a KTO one no perplexity.
    metrics = [(name, key) for name, key in SUMMARY_METRICS if any(key in j.final for j in jobs)]
    header = ["job", *(name for name, _ in metrics), objective_title, "status", "note"]
    rows = [
        [label]
        + [_shown(job.final.get(metric)) for _, metric in metrics]
        + [_shown(job.objective_value), job.status or "unknown", (job.message or job.note)[:80]]
        for job, label in zip(jobs, short_labels(jobs), strict=True)
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )
