"""The model card's "Run health" section, from the run's KTO health report (`health.json`).

The report, written in the run directory at the end of training, holds
`{"checks": [{"name", "value", "status": "ok"|"warn"|"bad", "meaning", "try"}], "summary"}`.
The card shows every check in a table, and for each one that is not ok, what it usually means
and what to try: a reader of the hub sees whether the run that made the weights was healthy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kto_lightning.runs.run_records import HEALTH_FILE


def _cell(value: Any) -> str:
    """`value` as one table cell: a `|` would end the cell, a newline the row."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _read(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """The report's summary and checks; ValueError when the file is not such a report."""
    report = json.loads(path.read_text(encoding="utf-8"))
    checks = report.get("checks") if isinstance(report, dict) else None
    if not isinstance(checks, list) or not all(isinstance(c, dict) for c in checks):
        raise ValueError("no list of checks")
    return str(report.get("summary") or ""), checks


def health_text(run_dir: Path | None) -> list[str] | None:
    """The section's lines; None when the run directory holds no health report (no section)."""
    path = run_dir / HEALTH_FILE if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        summary, checks = _read(path)
    except (OSError, ValueError) as error:  # JSONDecodeError is a ValueError
        return [f"The run's `{HEALTH_FILE}` could not be read ({error})."]
    lines = [_cell(summary), ""] if summary else []
    lines += ["| check | value | status |", "|---|---|---|"]
    for check in checks:
        name, value, status = (_cell(check.get(key, "")) for key in ("name", "value", "status"))
        lines.append(f"| {name} | {value} | {status} |")
    advice = [
        f"- {_cell(check.get('name', ''))}: {_cell(check.get('meaning', ''))} - "
        f"{_cell(check.get('try', ''))}"
        for check in checks
        if check.get("status") != "ok"
    ]
    return lines + (["", *advice] if advice else [])
