"""Curves of a run, or of every job of a sweep, as one PNG, from the metrics they saved.

    python -m kto_lightning.plot RUN_DIR     # writes RUN_DIR/training_curves.png
    python -m kto_lightning.plot SWEEP_DIR   # writes SWEEP_DIR/sweep_curves.png, sweep_summary.csv

A run directory holds `csv/metrics.csv` (every logger config writes it). Its figure has a panel
per quantity: the rewards of desirable vs undesirable rows, their margin, the KL reference point,
the loss split, the reward AUROC and accuracy (and the perplexity of an SFT run); each metric has
one colour, its training curve solid and its validation points dashed. A panel whose metrics the
run did not log is left out, so an SFT run, which logs no rewards, plots what it has.

A sweep directory (a Hydra multirun folder) holds one run directory per job. Its figure overlays
the jobs' validation AUROC, reward margin, KL and loss, one colour per job, each labelled by the
overrides that set it apart; jobs without validation metrics (failed, or not yet validated) are
left out of the figure and listed in the table (kto_lightning.reporting.sweep_report).
"""

from __future__ import annotations

import argparse
import sys

from kto_lightning.errors import KTOError
from kto_lightning.reporting.plots import FILENAME, SWEEP_FILENAME, plot_folder
from kto_lightning.runs.run_records import METRICS_FILE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kto_lightning.plot", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "folder", help=f"a run directory (holds {METRICS_FILE}) or a sweep directory (its runs)"
    )
    parser.add_argument(
        "--out",
        help=f"where to write the PNG (default: FOLDER/{FILENAME}, or FOLDER/{SWEEP_FILENAME})",
    )
    args = parser.parse_args(argv)
    try:
        png, table = plot_folder(args.folder, args.out)
    except KTOError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if table:
        print(table)
    if png is None:
        print(f"error: no job in {args.folder} has validation metrics to draw", file=sys.stderr)
        return 1
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
