"""Training curves of a run as one PNG, from its saved metrics.

    python -m kto_lightning.plot RUN_DIR        # writes RUN_DIR/training_curves.png

Reads `RUN_DIR/csv/metrics.csv` (every logger config also writes it) and draws four panels:
rewards of desirable vs undesirable rows, their margin, the KL reference point, and the loss split.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from kto_lightning.errors import KTOError

PANELS = [
    ("rewards", ["rewards/chosen", "rewards/rejected"]),
    ("reward margin", ["rewards/margins"]),
    ("KL reference point", ["kl"]),
    ("loss", ["loss/desirable", "loss/undesirable", "loss"]),
]
FILENAME = "training_curves.png"


def read_metrics(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Series by metric name: (step, value) pairs, NaN and empty cells skipped."""
    path = Path(run_dir) / "csv" / "metrics.csv"
    if not path.is_file():
        raise KTOError(f"{path} not found: plots are drawn from the CSV metrics of a run directory")
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open() as handle:
        for row in csv.DictReader(handle):
            step = int(float(row.get("step") or 0))
            for name, cell in row.items():
                if name in ("step", "epoch") or cell in ("", None):
                    continue
                value = float(cell)
                if math.isfinite(value):
                    series.setdefault(name, []).append((step, value))
    return series


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves; returns the PNG's path."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    series = read_metrics(run_dir)
    if not any(k.startswith("train/") for k in series):
        raise KTOError(f"{run_dir}: no train/ metrics logged yet, nothing to plot")
    figure, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for ax, (title, names) in zip(axes.flat, PANELS, strict=True):
        for name in names:
            for stage, style in (("train", "-"), ("val", "o--")):
                points = series.get(f"{stage}/{name}")
                if points:
                    steps, values = zip(*points, strict=True)
                    ax.plot(steps, values, style, label=f"{stage}/{name}", markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    figure.suptitle(f"KTO training curves: {Path(run_dir).name}")
    path = Path(out) if out is not None else Path(run_dir) / FILENAME
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run directory (holds csv/metrics.csv)")
    parser.add_argument("--out", help=f"where to write the PNG (default: RUN_DIR/{FILENAME})")
    args = parser.parse_args(argv)
    try:
        print(plot_run(args.run_dir, args.out))
    except KTOError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
