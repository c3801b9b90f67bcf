"""Run health: the device counters, the report's numbers on a hand-made run, warn and stop."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from kto_lightning.core.health import (
    COUNTERS,
    SATURATION_LOGIT,
    counter_metrics,
    saturation_metrics,
    saturation_sums,
    update_counters,
)
from kto_lightning.core.losses import KTOLoss
from kto_lightning.core.metrics import FIELDS, batch_sums, kl_clamped, metrics_from_sums
from kto_lightning.errors import ConfigError
from kto_lightning.reporting.health import RunHealth
from kto_lightning.reporting.health_checks import format_report, margin_trend

BETA = 0.1
LABELS = [True, True, False, False]
# A hand-made run of 6 batches of 2 desirable then 2 undesirable rows: (rewards, KL rows' sum of
# log-ratios over 2 KL rows). z_ref = max(0, sum / 2); a row is saturated when
# |reward - beta * z_ref| > 4.585.
RUN = [
    ([0.0, 0.0, 0.0, 0.0], 0.0),  # z_ref 0 (mean 0): clamped; nothing saturated
    ([5.0, 0.0, -5.0, 0.0], -1.0),  # clamped; one saturated row of each class
    ([6.0, 1.0, -6.0, 1.0], 2.0),  # z_ref 1, boundary 0.1: 5.9 and -6.1 saturated
    ([5.0, 5.0, -5.0, -5.0], -0.5),  # clamped; every row saturated
    ([9.0, 9.0, 9.0, -9.0], -0.5),  # clamped; every row saturated (one on the wrong side)
    ([1.0, 2.0, -1.0, -2.0], 1.0),  # z_ref 0.5: nothing saturated
]
# rewards/margins = mean desirable reward - mean undesirable reward, step by step.
MARGINS = [0.0, 5.0, 6.0, 10.0, 9.0, 3.0]


def t(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def step_sums(rewards: list[float], kl_sum: float) -> torch.Tensor:
    """A training step's sums as KTOModule keeps them: the metric sums, then the saturated rows."""
    labels = torch.tensor(LABELS)
    threshold = BETA * max(0.0, kl_sum / 2)
    sums = batch_sums(
        t([0.5] * 4), t(rewards), t([-1.0] * 4), labels, t(kl_sum), t(2.0), threshold=threshold
    )
    return torch.cat([sums, saturation_sums(t(rewards), labels, threshold)])


def step_values(sums: torch.Tensor, counters: torch.Tensor) -> dict[str, float]:
    """What KTOModule.step_metrics gives for a step (its metrics and the run's counters)."""
    metrics = {
        **metrics_from_sums(sums[: len(FIELDS)]),
        **saturation_metrics(sums),
        **counter_metrics(counters),
    }
    return {f"train/{name}": float(value) for name, value in metrics.items()}


def run_health(callback: RunHealth, trainer=None) -> dict[str, float]:
    """Feed RUN to `callback`, every step logged; the last step's values."""
    counters = None
    for step, (rewards, kl_sum) in enumerate(RUN, start=1):
        sums = step_sums(rewards, kl_sum)
        counters = update_counters(counters, sums)
        values = step_values(sums, counters)
        callback.observe(step, values, trainer)
    return values


def test_saturation_logit_is_where_the_gradient_weight_is_one_percent() -> None:
    x = torch.tensor(SATURATION_LOGIT, dtype=torch.float64)
    assert_close(torch.sigmoid(x) * (1 - torch.sigmoid(x)), torch.tensor(0.01, dtype=torch.float64))
    assert abs(SATURATION_LOGIT - 4.585) < 1e-3


def test_saturation_sums_hand_worked() -> None:
    labels = torch.tensor([True, True, True, False, False])
    rewards = t([4.6, 4.5, -5.0, 4.7, -4.5])
    # Against the boundary 0.1 (|x| > 4.585 is saturated): desirable 4.5 (no), 4.4 (no),
    # -5.1 (yes); undesirable 4.6 (yes), -4.6 (yes). Against 0: 4.6, -5.0 and 4.7.
    assert_close(saturation_sums(rewards, labels, 0.1), t([1.0, 2.0]))
    assert_close(saturation_sums(rewards, labels, t(0.0)), t([2.0, 1.0]))


def test_kl_clamped_needs_kl_rows_and_a_mean_at_or_below_zero() -> None:
    def sums(kl_sum: float, kl_count: float) -> torch.Tensor:
        return batch_sums(
            t([0.1]), t([0.0]), t([-1.0]), torch.tensor([True]), t(kl_sum), t(kl_count)
        )

    assert kl_clamped(sums(-0.3, 2.0)).item() == 1.0
    assert kl_clamped(sums(0.0, 2.0)).item() == 1.0  # exactly 0, as at the first step
    assert kl_clamped(sums(0.3, 2.0)).item() == 0.0
    assert kl_clamped(sums(0.0, 0.0)).item() == 0.0  # estimator=zero: 0 by choice


def test_counters_of_the_hand_made_run() -> None:
    counters = None
    for rewards, kl_sum in RUN:
        counters = update_counters(counters, step_sums(rewards, kl_sum))
    assert counters is not None
    expected = {
        "batches": 6,
        "kl_clamped": 4,  # batches 1, 2, 4, 5
        "kl_clamped_streak": 0,  # batch 6 is not clamped
        "kl_clamped_longest": 2,  # 1-2 and 4-5
        "saturated_streak": 0,
        "saturated_longest": 2,  # batches 4-5
        "desirable": 12,
        "undesirable": 12,
        "saturated_desirable": 6,  # 0 + 1 + 1 + 2 + 2 + 0
        "saturated_undesirable": 6,
    }
    assert_close(counters, t([expected[name] for name in COUNTERS]))


def test_per_step_health_metrics() -> None:
    sums = step_sums(*RUN[1])
    metrics = saturation_metrics(sums)
    assert metrics["health/kl_clamped"].item() == 1.0
    assert metrics["health/saturated/desirable"].item() == 0.5
    assert metrics["health/saturated/undesirable"].item() == 0.5
    only_desirable = torch.cat([batch_sums(t([1.0]), t([9.0]), t([-1.0]), torch.tensor([True]),
                                           t(0.0), t(0.0)), t([1.0, 0.0])])  # fmt: skip
    assert math.isnan(saturation_metrics(only_desirable)["health/saturated/undesirable"].item())


def test_report_numbers_equal_hand_computation() -> None:
    callback = RunHealth(clamped_kl_patience=2, saturation_patience=3)
    values = run_health(callback)
    report = callback.finish(values, 6, KTOLoss(beta=BETA, desirable_weight=1.5))

    assert callback.margins == list(enumerate(MARGINS, start=1))
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == [
        "KL reference point at 0",
        "saturated desirable rows",
        "saturated undesirable rows",
        "class balance (eq. 8)",
        "reward margin trend",
    ]
    kl = checks["KL reference point at 0"]
    # 4 clamped batches of 6; the longest run, 2, reaches clamped_kl_patience=2.
    assert (kl["value"], kl["status"]) == ("66.7% of 6 batches (longest run 2)", "bad")
    assert "loss.estimator=batch" in kl["try"] and kl["meaning"]
    for label in ("desirable", "undesirable"):
        check = checks[f"saturated {label} rows"]
        # 6 of 12 rows: 50% reaches the warning share; the streak of 2 < saturation_patience.
        assert check["value"] == "50.0% of 12 rows; every row saturated for 2 batches in a row"
        assert check["status"] == "warn"
    balance = checks["class balance (eq. 8)"]
    # 1.5 * 12 / (1 * 12) = 1.5 > 4/3; lambda_D = 1 * 12 / 12 = 1 would make it 1.
    assert balance["value"] == (
        "1.5 (lambda_D 1.5 x 12 desirable / lambda_U 1 x 12 undesirable rows); recommended [1, 4/3]"
    )
    assert balance["status"] == "warn"
    assert "loss.desirable_weight=1 " in balance["try"] + " "
    trend = checks["reward margin trend"]
    # Least squares over steps 1..6 and margins 0, 5, 6, 10, 9, 3: slope 15.5 / 17.5 per step;
    # a quarter of 6 points is 1 point: the first margin, 0, and the last, 3.
    assert trend["value"] == "+88.57 per 100 steps (first quarter +0, last quarter +3)"
    assert (trend["status"], trend["meaning"], trend["try"]) == ("ok", "", "")
    assert report["summary"] == (
        "4 of 5 checks need a look: KL reference point at 0 (bad), saturated desirable rows "
        "(warn), saturated undesirable rows (warn), class balance (eq. 8) (warn)"
    )
    lines = format_report(report).splitlines()
    assert lines[0] == f"run health: {report['summary']}"
    assert len(lines) == 1 + 5 + 2 * 4  # a line per check; meaning and try for each problem


def test_margin_trend_hand_worked() -> None:
    slope, first, last = margin_trend([(10, 1.0), (20, 2.0), (30, 2.0), (40, 4.0), (50, 6.0)])
    # mean step 30, mean margin 3: covariance 120 / spread 1000 = 0.12 per step.
    assert slope == pytest.approx(12.0)
    assert (first, last) == (1.0, 6.0)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_clamped_kl_warns_once_at_its_patience(caplog) -> None:
    callback = RunHealth(clamped_kl_patience=2, saturation_patience=50)
    with caplog.at_level(logging.WARNING, logger="kto_lightning"):
        run_health(callback)
    [message] = _warnings(caplog)
    assert "train/kl has been exactly 0 for 2 consecutive steps" in message
    assert "z_ref is clamped at 0" in message
    assert "loss.estimator=mismatched" in message and "loss.estimator=batch" in message
    assert callback.stopped is None


def test_stop_action_stops_at_the_first_stuck_state(caplog) -> None:
    callback = RunHealth(clamped_kl_patience=50, saturation_patience=2, action="stop")
    trainer = SimpleNamespace(should_stop=False, is_global_zero=True)
    with caplog.at_level(logging.WARNING, logger="kto_lightning"):
        values = run_health(callback, trainer)
    # Every row is saturated at batches 4 and 5: the stop comes at step 5.
    assert trainer.should_stop
    [message] = _warnings(caplog)
    assert "every training row has been saturated for 2 consecutive steps" in message
    assert "Training stops at step 5 (callbacks.health.action=stop)." in message
    report = callback.finish(values, 6, KTOLoss(beta=BETA))
    assert report["summary"].endswith("; stopped at step 5: saturation state")


def test_no_reference_point_is_not_a_clamped_one() -> None:
    callback = RunHealth(clamped_kl_patience=1)
    values = run_health(callback)
    report = callback.finish(values, 6, KTOLoss(beta=BETA, estimator="zero"))
    kl = report["checks"][0]
    assert (kl["value"], kl["status"]) == ("n/a: the loss has no reference point", "ok")


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"action": "halt"}, "callbacks.health.action must be one of warn, stop, got 'halt'"),
        ({"clamped_kl_patience": 0}, "callbacks.health.clamped_kl_patience must be an integer"),
        ({"saturation_patience": 2.5}, "callbacks.health.saturation_patience must be an integer"),
    ],
)
def test_settings_are_checked(kwargs, key) -> None:
    with pytest.raises(ConfigError, match=key.replace("(", r"\(")):
        RunHealth(**kwargs)
