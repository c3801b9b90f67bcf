"""What a run directory records, read back: the plots, the sweep table and the model card use it.

<run dir>/csv/metrics.csv        every logged metric, one row per logging call (every logger
                                 config writes it); a row's `step` is the optimizer step it
                                 belongs to, a validation's the steps done (csv_logger.logged_step)
<run dir>/objective.json         the sweep objective after the fit (train.objective)
<run dir>/.hydra/overrides.yaml  the command-line overrides Hydra launched the run with
                                 (secret values already shown as ***, see train.py)
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from kto_lightning.errors import KTOError

METRICS_FILE = Path("csv") / "metrics.csv"
OBJECTIVE_FILE = Path("objective.json")
HEALTH_FILE = Path("health.json")  # the run health report (reporting/health.py)
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
# Where the run config keeps the rows the data module kept, per split and label (run_build.build).
DATA_COUNTS_KEY = "data_counts"
VALIDATION = "val/"
# Columns of metrics.csv that place a row, rather than hold a metric.
POSITION_COLUMNS = ("step", "epoch")


def metrics_path(run_dir: str | Path) -> Path:
    """Where the run in `run_dir` keeps its metrics (it may not have written them yet)."""
    return Path(run_dir) / METRICS_FILE


@dataclass(frozen=True)
class MetricRow:
    """One row of metrics.csv: its step and the metrics it holds (empty cells left out)."""

    step: int
    values: dict[str, float]


def read_metric_rows(run_dir: str | Path) -> list[MetricRow]:
    """Every row of `<run_dir>/csv/metrics.csv`, in the order logged; NaN kept as NaN.

    Raises KTOError naming the file when it is missing, and the row and column of a cell that is
    not a number.
    """
    path = metrics_path(run_dir)
    if not path.is_file():
        raise KTOError(f"{path} not found: a run directory keeps its metrics there")
    rows = []
    with path.open(newline="") as handle:
        # Line 1 is the header: the first row of data is line 2.
        for line, row in enumerate(csv.DictReader(handle), start=2):
            values = {}
            for name, cell in row.items():
                if name in POSITION_COLUMNS or name is None or cell in ("", None):
                    continue
                try:
                    values[name] = float(cell)
                except ValueError:
                    raise KTOError(
                        f"{path}, line {line}, column {name!r}: {cell!r} is not a number"
                    ) from None
            rows.append(MetricRow(step=int(float(row.get("step") or 0)), values=values))
    return rows


def read_metrics(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Series by metric name: (step, value) pairs, NaN and empty cells skipped (for plotting)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in read_metric_rows(run_dir):
        for name, value in row.values.items():
            if math.isfinite(value):
                series.setdefault(name, []).append((row.step, value))
    return series


def validation_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The `val/` entries of `metrics`, without the row counts and padding share, which describe
    the validation batches rather than the model."""
    return {
        name: value
        for name, value in metrics.items()
        if name.startswith(VALIDATION)
        and not name.startswith(f"{VALIDATION}count/")
        and name != f"{VALIDATION}padding"
    }


def last_validation(
    rows: list[MetricRow], at_step: int | None = None
) -> tuple[int, dict[str, float]] | None:
    """The step and the metrics of the last validation in `rows`; None when no row has any.

    Args:
        rows: from `read_metric_rows`.
        at_step: only validations after at most this many optimizer steps count (a row's step
            is the steps done when it ran: csv_logger.logged_step), so a checkpoint of step N
            gets the validation of its own weights, not a later one.
    """
    for row in reversed(rows):
        if at_step is not None and row.step > at_step:
            continue
        metrics = validation_metrics(row.values)
        if metrics:
            return row.step, metrics
    return None


def read_objective(run_dir: str | Path) -> tuple[str, float | None] | None:
    """(metric name, value) from `<run_dir>/objective.json`; None when the run wrote none."""
    path = Path(run_dir) / OBJECTIVE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        value = record["value"]
        return str(record["objective"]), None if value is None else float(value)
    except (ValueError, KeyError, TypeError) as error:
        raise KTOError(
            f"{path} is not an objective record ({{'objective': name, 'value': number}}): {error}"
        ) from None


def recorded_overrides(run_dir: str | Path) -> list[str] | None:
    """The overrides of `<run_dir>/.hydra/overrides.yaml`; None when the run was not launched by
    Hydra (train.train called from Python writes no .hydra folder)."""
    path = Path(run_dir) / OVERRIDES_FILE
    if not path.is_file():
        return None
    try:
        overrides = OmegaConf.load(path)
    except Exception as error:  # a YAML syntax error, in any of OmegaConf's wrappings
        raise KTOError(f"{path} could not be read as YAML: {error}") from None
    # Unresolved: an override may hold an interpolation such as ${hydra:runtime.cwd}.
    listed = OmegaConf.to_container(overrides, resolve=False)
    if not isinstance(listed, list):
        raise KTOError(f"{path} should hold a list of overrides, got {type(listed).__name__}")
    return [str(override) for override in listed]


def final_metrics(run_dir: Path, step: int | None) -> dict[str, float]:
    """The validation metrics of the run's last validation after at most `step` optimizer steps
    (a checkpoint's own step), from csv/metrics.csv; without that file, the objective alone, from
    objective.json; else {} (not recorded)."""
    if metrics_path(run_dir).is_file():
        last = last_validation(read_metric_rows(run_dir), at_step=step)
        # Not objective.json then: it holds the end of the run, maybe later than this checkpoint.
        return last[1] if last is not None else {}
    objective = read_objective(run_dir)
    if objective is not None and objective[1] is not None:
        return {objective[0]: objective[1]}
    return {}
