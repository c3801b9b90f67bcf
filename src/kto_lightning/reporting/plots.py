"""Curves of a run, or of every job of a sweep, as one PNG, from the metrics they saved: the
library of the plot command (see its docstring for what the figures show), also called at the
end of training."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kto_lightning.errors import KTOError
from kto_lightning.reporting.sweep_report import (
    Job,
    find_jobs,
    holds_runs,
    short_labels,
    write_summary,
)
from kto_lightning.runs.run_records import METRICS_FILE, metrics_path, read_metrics

FILENAME = "training_curves.png"
SWEEP_FILENAME = "sweep_curves.png"


@dataclass(frozen=True)
class Panel:
    """One panel: its title, its y-axis label and the metrics it draws (without `train/`, `val/`
    in a run's figure; full names in a sweep's)."""

    title: str
    ylabel: str
    metrics: tuple[str, ...]


REWARD = "reward = β·log(π/π_ref)"
PANELS = (
    Panel("rewards", REWARD, ("rewards/chosen", "rewards/rejected")),
    Panel("reward margin", f"chosen − rejected {REWARD}", ("rewards/margins",)),
    Panel("KL reference point", "KL estimate (nats)", ("kl",)),
    Panel("loss", "loss", ("loss/desirable", "loss/undesirable", "loss")),
    Panel(
        "reward AUROC and accuracy", "AUROC / accuracy (0-1)", ("rewards/auroc", "rewards/accuracy")
    ),
    Panel("perplexity", "perplexity (exp of token NLL)", ("perplexity",)),
    # An online run's: the mean reward of each step's draw, and the held-out rewards.
    Panel(
        "online rewards",
        "reward",
        ("online/reward_mean", "online/reward_greedy", "online/reward_sampled"),
    ),
)
SWEEP_PANELS = (
    Panel("validation reward AUROC", "AUROC", ("val/rewards/auroc",)),
    Panel("validation reward margin", f"chosen − rejected {REWARD}", ("val/rewards/margins",)),
    Panel("validation KL reference point", "KL estimate (nats)", ("val/kl",)),
    Panel("validation loss", "loss", ("val/loss",)),
    Panel("validation perplexity", "perplexity", ("val/perplexity",)),
)
# (stage, line style): training curves solid, validation points dashed with markers.
STAGES = (("train", "-"), ("val", "o--"))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _grid(plt: Any, panels: int, width: float) -> tuple[Any, list[Any]]:
    """A figure with `panels` axes, two or three a row; the unused cells removed."""
    columns = 2 if panels <= 4 else 3
    rows = math.ceil(panels / columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(width, 3.4 * rows + 0.6), constrained_layout=True, squeeze=False
    )
    cells = list(axes.flat)
    for unused in cells[panels:]:
        unused.remove()
    return figure, cells[:panels]


def _style(ax: Any, panel: Panel) -> None:
    ax.set_title(panel.title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)


def draw_run(series: dict[str, list[tuple[int, float]]], title: str) -> Any:
    """The figure of one run's metrics (`run_records.read_metrics`); KTOError when none of its
    metrics belongs to a panel."""
    plt = _pyplot()
    shown = [
        panel
        for panel in PANELS
        if any(f"{stage}/{name}" in series for name in panel.metrics for stage, _ in STAGES)
    ]
    if not shown:
        raise KTOError(
            f"{title}: none of the metrics this plot draws has been logged yet "
            f"({', '.join(sorted(series)) or 'the file has no metric'})"
        )
    figure, axes = _grid(plt, len(shown), width=5.2 * min(len(shown), 3))
    for ax, panel in zip(axes, shown, strict=True):
        for colour, name in enumerate(panel.metrics):
            # One colour per metric: its training curve and its validation points side by side.
            for stage, style in STAGES:
                points = series.get(f"{stage}/{name}")
                if points:
                    steps, values = zip(*points, strict=True)
                    ax.plot(steps, values, style, color=f"C{colour}", label=f"{stage}/{name}",
                            markersize=4)  # fmt: skip
        _style(ax, panel)
        ax.legend(fontsize=8)
    figure.suptitle(f"training curves: {title}")
    return figure


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves; returns the PNG's path (default `<run_dir>/training_curves.png`)."""
    figure = draw_run(read_metrics(run_dir), Path(run_dir).name)
    path = Path(out) if out is not None else Path(run_dir) / FILENAME
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return path


def _job_colours(count: int) -> list[Any]:
    """Distinct colours for `count` jobs: tab10, then tab20, then samples of a colour map."""
    import matplotlib

    if count <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(count)]
    if count <= 20:
        return [matplotlib.colormaps["tab20"](i) for i in range(count)]
    return [matplotlib.colormaps["viridis"](i / (count - 1)) for i in range(count)]


def draw_sweep(jobs: Sequence[Job], labels: Sequence[str], title: str) -> Any:
    """The validation curves of `jobs` (those with validation metrics), one colour per job, in
    every panel; a single legend, labelled by `labels`, beside them."""
    plt = _pyplot()
    series = [read_metrics(job.run_dir) for job in jobs]
    shown = [
        panel for panel in SWEEP_PANELS if any(panel.metrics[0] in metrics for metrics in series)
    ]
    figure, axes = _grid(plt, len(shown), width=5.2 * min(len(shown), 3) + 3.5)
    colours = _job_colours(len(jobs))
    handles: dict[str, Any] = {}
    for ax, panel in zip(axes, shown, strict=True):
        for metrics, label, colour in zip(series, labels, colours, strict=True):
            points = metrics.get(panel.metrics[0])
            if points:
                steps, values = zip(*points, strict=True)
                (line,) = ax.plot(steps, values, "o-", color=colour, label=label, markersize=4)
                handles.setdefault(label, line)
        _style(ax, panel)
    figure.legend(
        list(handles.values()), list(handles), loc="outside right upper", fontsize=8,
        title="job and the overrides that differ",
    )  # fmt: skip
    figure.suptitle(f"sweep: {title}")
    return figure


def plot_sweep(sweep_dir: str | Path, out: str | Path | None = None) -> tuple[Path | None, str]:
    """Tabulate a sweep's jobs (`<sweep_dir>/sweep_summary.csv`) and draw the curves of those that
    validated; returns the PNG's path (None when no job validated) and the table as text."""
    jobs = find_jobs(sweep_dir)
    _, table = write_summary(sweep_dir, jobs)
    plotted = [(job, label) for job, label in zip(jobs, short_labels(jobs), strict=True)
               if job.plotted]  # fmt: skip
    if not plotted:
        return None, table
    figure = draw_sweep(
        [job for job, _ in plotted], [label for _, label in plotted], Path(sweep_dir).name
    )
    path = Path(out) if out is not None else Path(sweep_dir) / SWEEP_FILENAME
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return path, table


def plot_folder(folder: str | Path, out: str | Path | None = None) -> tuple[Path | None, str]:
    """`plot_run` for a run directory, `plot_sweep` for a sweep directory; returns the PNG (None
    when no job of a sweep validated) and, for a sweep, its table as text ("" for a run).

    Raises KTOError naming `folder` when it is neither.
    """
    folder = Path(folder)
    if metrics_path(folder).is_file():
        return plot_run(folder, out), ""
    if not folder.is_dir():
        raise KTOError(f"{folder} is not a folder: give a run directory or a sweep directory")
    if not holds_runs(folder):
        raise KTOError(
            f"{folder} holds no run: no {METRICS_FILE} in it (a run directory) or in any of its "
            "subfolders (a sweep directory); a run writes it once it has logged its first step"
        )
    return plot_sweep(folder, out)
