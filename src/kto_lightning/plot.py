"""Curves of a run, or of every job of a sweep, as one PNG, from the metrics they saved.

    python -m kto_lightning.plot ckpt_path=RUN_DIR     # writes RUN_DIR/training_curves.png
    python -m kto_lightning.plot ckpt_path=SWEEP_DIR   # SWEEP_DIR/sweep_curves.png and a table

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

import sys
from dataclasses import dataclass

from kto_lightning.cli.arguments import doc, read_options
from kto_lightning.errors import KTOError

COMMAND = "python -m kto_lightning.plot"


@dataclass(frozen=True)
class PlotOptions:
    """What `python -m kto_lightning.plot` takes."""

    ckpt_path: str = doc("a run directory (holds csv/metrics.csv) or a sweep directory (its runs)")
    out: str | None = doc(
        "the PNG to write (default: <run>/training_curves.png, or <sweep>/sweep_curves.png)", None
    )


def main(argv: list[str] | None = None) -> int:
    options = read_options(
        PlotOptions,
        argv,
        COMMAND,
        __doc__.splitlines()[0],
        [f"{COMMAND} ckpt_path=outputs/kto/runs/<time>", f"{COMMAND} ckpt_path=SWEEP out=a.png"],
    )
    if isinstance(options, int):
        return options
    try:
        from kto_lightning.reporting.plots import plot_folder  # matplotlib: not for --help

        png, table = plot_folder(options.ckpt_path, options.out)
    except KTOError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if table:
        print(table)
    if png is None:
        print(
            f"error: no job in {options.ckpt_path} has validation metrics to draw", file=sys.stderr
        )
        return 1
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
