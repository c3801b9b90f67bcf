"""The run health report of a real run: health.json and its lines agree with the logged metrics,
and a stuck KL reference point stops a run when callbacks.health.action=stop."""

from __future__ import annotations

import json
import re

from cli import train_in_process
from conftest import FAST
from kto_lightning.cli.run_build import build
from kto_lightning.cli.run_fit import train
from kto_lightning.reporting.health import RunHealth
from kto_lightning.reporting.health_checks import margin_trend
from kto_lightning.runs.run_records import read_metric_rows, read_metrics

# What these runs do not need: the export, the generations table, the validation before training.
LEAN = ["export.enabled=false", "~callbacks.generations", "validate_before_training=false"]


def _longest_run(flags: list[float]) -> int:
    longest = run = 0
    for flag in flags:
        run = run + 1 if flag == 1.0 else 0
        longest = max(longest, run)
    return longest


def test_health_report_of_a_run_equals_its_logged_steps(tmp_path) -> None:
    run_dir = tmp_path / "run"
    result = train_in_process(*FAST, *LEAN, f"paths.output_dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((run_dir / "health.json").read_text())
    checks = {check["name"]: check for check in report["checks"]}
    assert set(report) == {"checks", "summary"}
    for check in checks.values():
        assert set(check) == {"name", "value", "status", "meaning", "try"}
        assert check["status"] in {"ok", "warn", "bad"}

    # Every step is logged (trainer.log_every_n_steps=1): the report from the logged steps.
    series = {name: [v for _, v in points] for name, points in read_metrics(run_dir).items()}
    clamped = series["train/health/kl_clamped"]
    assert len(clamped) == 6 and clamped[0] == 1.0  # the first step: policy == reference
    assert series["train/health/run/batches"][-1] == 6
    share = sum(clamped) / 6
    assert checks["KL reference point at 0"]["value"] == (
        f"{share:.1%} of 6 batches (longest run {_longest_run(clamped)})"
    )
    steps = [row.values for row in read_metric_rows(run_dir) if "train/loss" in row.values]
    for label in ("desirable", "undesirable"):
        rows = sum(step[f"train/count/{label}"] for step in steps)
        # A step without a row of the class logs a NaN share, written as an empty cell.
        saturated = sum(
            step.get(f"train/health/saturated/{label}", 0.0) * step[f"train/count/{label}"]
            for step in steps
        )
        assert series[f"train/health/run/{label}"][-1] == rows
        value = checks[f"saturated {label} rows"]["value"]
        assert value.startswith(f"{saturated / rows:.1%} of {int(rows)} rows")
    n_d, n_u = (sum(series[f"train/count/{label}"]) for label in ("desirable", "undesirable"))
    # lambda_D (loss.desirable_weight=auto) balances the whole training set, not these 6 steps.
    balance = checks["class balance (eq. 8)"]["value"]
    found = re.search(r"lambda_D (\S+) x (\d+) desirable / lambda_U 1 x (\d+) undesirable", balance)
    assert found and (int(found[2]), int(found[3])) == (n_d, n_u), balance
    assert balance.startswith(f"{float(found[1]) * n_d / n_u:.3g} (")
    margins = list(read_metrics(run_dir)["train/rewards/margins"])
    slope, first, last = margin_trend(margins)
    assert checks["reward margin trend"]["value"] == (
        f"{slope:+.4g} per 100 steps (first quarter {first:+.4g}, last quarter {last:+.4g})"
    )
    # The report's lines close the run, before the summary, which names health.json.
    printed = result.stdout + result.stderr
    assert f"run health ({run_dir / 'health.json'}): {report['summary']}" in printed
    assert f"run health: {run_dir / 'health.json'}" in printed


def test_a_stuck_kl_reference_point_stops_the_run(make_config, tmp_path) -> None:
    # At the first step the policy equals its reference: z_ref is exactly 0, a clamped step.
    cfg = make_config(
        *LEAN, "callbacks.health.clamped_kl_patience=1", "callbacks.health.action=stop"
    )
    run = build(cfg)
    [health] = [c for c in run.trainer.callbacks if isinstance(c, RunHealth)]
    assert not any(type(c).__name__ == "ZeroKLWarning" for c in run.trainer.callbacks)
    train(cfg, run=run)
    assert run.trainer.global_step == 1
    assert health.stopped == "stopped at step 1: kl state"
    report = json.loads((tmp_path / "health.json").read_text())
    assert report["summary"].endswith("; stopped at step 1: kl state")
    assert report["checks"][0]["status"] == "bad"


def test_a_wrong_action_is_one_line(tmp_path) -> None:
    result = train_in_process(*FAST, "callbacks.health.action=pause", cwd=tmp_path)
    assert result.returncode == 1
    assert (
        "error: callbacks.health.action must be one of warn, stop, got 'pause'" in result.stderr
    ), result.stderr[-2000:]
