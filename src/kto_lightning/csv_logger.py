"""The CSV logger every run writes (`<run dir>/csv/metrics.csv`), continued by a resumed run."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class ContinuingCSVLogger(CSVLogger):
    """Lightning's CSVLogger, which a resumed run appends to instead of starting afresh.

    Lightning's writer deletes an existing metrics.csv when it starts. A run resumed in its own
    run directory calls `continue_from(step)` first: the rows logged before that optimizer step
    are kept and written back, so metrics.csv and the curves drawn from it run on without a gap;
    later rows (logged after the checkpoint was saved, and so logged again by the resumed run)
    are dropped.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._earlier: tuple[list[str], list[dict[str, str]]] | None = None

    @property
    def metrics_path(self) -> Path:
        return Path(self.log_dir) / "metrics.csv"

    def continue_from(self, step: int) -> None:
        """Keep the rows of metrics.csv logged before optimizer step `step` (steps count from 0
        in the file: the row of step s is the batch that made optimizer step s + 1)."""
        if not self.metrics_path.is_file():
            return
        with self.metrics_path.open(newline="") as file:
            reader = csv.DictReader(file)
            rows = [row for row in reader if row.get("step") and int(row["step"]) < step]
            self._earlier = (list(reader.fieldnames or []), rows)

    @property
    def experiment(self) -> Any:
        writer = super().experiment
        # Other ranks than 0 get a stand-in that writes nothing.
        if self._earlier is not None and isinstance(writer, ExperimentWriter):
            keys, rows = self._earlier
            self._earlier = None
            with self.metrics_path.open("w", newline="") as file:
                out = csv.DictWriter(file, fieldnames=keys)
                out.writeheader()
                out.writerows(rows)
            # The writer adds the keys it has not seen to this (sorted) header.
            writer.metrics_keys = sorted(keys)
        return writer
