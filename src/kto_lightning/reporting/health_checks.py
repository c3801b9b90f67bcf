"""The checks of the run health report, as pure functions of a run's counts and margins.

`health_report` gives the report as `<run dir>/health.json` holds it (written by
kto_lightning.reporting.health.RunHealth):

    {"checks": [{"name", "value", "status": "ok"|"warn"|"bad", "meaning", "try"}], "summary"}

`meaning` and `try` say what a problem usually means and what to try; both are "" for a check
that is ok. The thresholds are documented in docs/loss-and-metrics.md ("Run health").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from kto_lightning.core.class_weights import RECOMMENDED_RATIO
from kto_lightning.core.health import SATURATION_LOGIT

# Shares of batches (KL) or rows (saturation) from which a check warns, and from which it is bad.
KL_CLAMPED_SHARE = (0.2, 0.5)
SATURATED_SHARE = (0.5, 0.9)
MIN_TREND_POINTS = 3  # logged steps the margin's slope needs


@dataclass(frozen=True)
class HealthCounts:
    """The run's health counters over all ranks (core.health.COUNTERS), in training batches."""

    batches: float = 0.0
    kl_clamped: float = 0.0
    kl_clamped_longest: float = 0.0
    saturated_longest: float = 0.0
    desirable: float = 0.0
    undesirable: float = 0.0
    saturated_desirable: float = 0.0
    saturated_undesirable: float = 0.0

    @classmethod
    def from_metrics(cls, values: Mapping[str, float]) -> HealthCounts:
        """From a step's `train/...` values (`KTOModule.step_metrics`)."""
        return cls(**{f.name: values.get(f"train/health/run/{f.name}", 0.0) for f in fields(cls)})


@dataclass(frozen=True)
class Check:
    """One line of the report; `meaning` and `try_` are "" when the check is ok."""

    name: str
    value: str
    status: str
    meaning: str = ""
    try_: str = ""

    def as_dict(self) -> dict[str, str]:
        ok = self.status == "ok"
        return {
            "name": self.name,
            "value": self.value,
            "status": self.status,
            "meaning": "" if ok else self.meaning,
            "try": "" if ok else self.try_,
        }


def _status(share: float, limits: tuple[float, float], bad: bool = False) -> str:
    if bad or share >= limits[1]:
        return "bad"
    return "warn" if share >= limits[0] else "ok"


def kl_check(counts: HealthCounts, has_reference_point: bool, patience: int) -> Check:
    """Share of batches whose z_ref was clamped to 0, and the longest run of them."""
    name = "KL reference point at 0"
    if not has_reference_point:
        return Check(name, "n/a: the loss has no reference point", "ok")
    if counts.batches == 0:
        return Check(name, "n/a: no training batch", "ok")
    share = counts.kl_clamped / counts.batches
    longest = int(counts.kl_clamped_longest)
    return Check(
        name,
        f"{share:.1%} of {int(counts.batches)} batches (longest run {longest})",
        _status(share, KL_CLAMPED_SHARE, bad=longest >= patience),
        "the policy's log-ratio on unrelated completions was <= 0, so z_ref was clamped to 0 and "
        "KTO trained without its reference point (usual for the first steps only)",
        "loss.estimator=batch, or check that the KL rows differ from the main rows; a larger "
        "learning rate or loss.beta moves the policy off the reference sooner",
    )


def saturation_check(counts: HealthCounts, label: str, patience: int) -> Check:
    """Share of one class's rows whose sigmoid was saturated (|x| > SATURATION_LOGIT)."""
    rows = counts.desirable if label == "desirable" else counts.undesirable
    saturated = getattr(counts, f"saturated_{label}")
    name = f"saturated {label} rows"
    if rows == 0:
        return Check(name, f"n/a: no {label} row", "ok")
    share = saturated / rows
    longest = int(counts.saturated_longest)
    value = f"{share:.1%} of {int(rows)} rows"
    if longest:
        value += f"; every row saturated for {longest} batches in a row"
    return Check(
        name,
        value,
        _status(share, SATURATED_SHARE, bad=longest >= patience),
        f"these rows sit where the sigmoid is flat (|beta*(log-ratio - z_ref)| > "
        f"{SATURATION_LOGIT:.3g}, gradient weight < 0.01): they hardly train any more",
        "a smaller loss.beta, a lower learning rate or fewer epochs; if the reward accuracy is "
        "low, they are stuck on the wrong side: check the labels",
    )


def balance_check(
    counts: HealthCounts, desirable_weight: float, undesirable_weight: float
) -> Check:
    """lambda_D * n_D / (lambda_U * n_U) over the rows trained on, against paper eq. 8's range."""
    name = "class balance (eq. 8)"
    n_d, n_u = int(counts.desirable), int(counts.undesirable)
    weighed = f"lambda_D {desirable_weight:.4g} x {n_d} desirable / lambda_U "
    weighed += f"{undesirable_weight:.4g} x {n_u} undesirable rows"
    denominator = undesirable_weight * n_u
    if n_d == 0 or denominator == 0:
        return Check(
            name,
            f"no ratio ({weighed})",
            "bad",
            "one class has no weight or no row: KTO only pushes rewards one way",
            "train on data with both labels, and both loss weights > 0",
        )
    ratio = desirable_weight * n_d / denominator
    low, high = RECOMMENDED_RATIO
    inside = low * (1 - 1e-6) <= ratio <= high * (1 + 1e-6)
    side = "undesirable" if ratio < low else "desirable"
    return Check(
        name,
        f"{ratio:.3g} ({weighed}); recommended [1, 4/3]",
        "ok" if inside else "warn",
        f"the {side} rows weigh more than the paper recommends, so the policy learns mostly "
        f"{'to avoid' if side == 'undesirable' else 'to imitate'}",
        f"loss.desirable_weight=auto (sets the ratio to 1), or "
        f"loss.desirable_weight={undesirable_weight * n_u / n_d:.4g}",
    )


def margin_trend(margins: Sequence[tuple[int, float]]) -> tuple[float, float, float]:
    """Least-squares slope of the margin per 100 steps, and its mean over the first and over the
    last quarter of the points (a quarter is at least one point)."""
    steps = [float(s) for s, _ in margins]
    values = [v for _, v in margins]
    mean_s, mean_v = sum(steps) / len(steps), sum(values) / len(values)
    spread = sum((s - mean_s) ** 2 for s in steps)
    covariance = sum((s - mean_s) * (v - mean_v) for s, v in zip(steps, values, strict=True))
    quarter = max(1, len(values) // 4)
    first, last = values[:quarter], values[-quarter:]
    slope = 100 * covariance / spread if spread else 0.0
    return slope, sum(first) / len(first), sum(last) / len(last)


def trend_check(margins: Sequence[tuple[int, float]]) -> Check:
    """Whether the logged reward margin grows over the run."""
    name = "reward margin trend"
    if len(margins) < MIN_TREND_POINTS:
        return Check(name, f"n/a: {len(margins)} logged steps (needs {MIN_TREND_POINTS})", "ok")
    slope, first, last = margin_trend(margins)
    return Check(
        name,
        f"{slope:+.4g} per 100 steps (first quarter {first:+.4g}, last quarter {last:+.4g})",
        "ok" if slope > 0 else "warn",
        "the gap between desirable and undesirable rewards is not growing: the policy is not "
        "separating the classes",
        "a higher learning rate or loss.beta, or more steps; check that the labels are not "
        "noisy or inverted",
    )


def health_report(
    counts: HealthCounts,
    margins: Sequence[tuple[int, float]],
    weights: tuple[float, float],
    has_reference_point: bool = True,
    patience: tuple[int, int] = (50, 50),
    stopped: str | None = None,
) -> dict[str, Any]:
    """The report as health.json holds it.

    Args:
        counts: the run's counters at its end.
        margins: (optimizer step, train/rewards/margins) at each logged step, NaN ones left out.
        weights: (lambda_D, lambda_U) the loss trained with.
        has_reference_point: False for loss.estimator=zero and APO-zero.
        patience: (clamped_kl_patience, saturation_patience) of `RunHealth`.
        stopped: why the run was stopped early, if it was.
    """
    checks = [
        kl_check(counts, has_reference_point, patience[0]),
        saturation_check(counts, "desirable", patience[1]),
        saturation_check(counts, "undesirable", patience[1]),
        balance_check(counts, *weights),
        trend_check(margins),
    ]
    problems = [c for c in checks if c.status != "ok"]
    if problems:
        summary = f"{len(problems)} of {len(checks)} checks need a look: "
        summary += ", ".join(f"{c.name} ({c.status})" for c in problems)
    else:
        summary = f"healthy: all {len(checks)} checks ok"
    if stopped:
        summary += f"; {stopped}"
    return {"checks": [c.as_dict() for c in checks], "summary": summary}


def format_report(report: Mapping[str, Any], path: Path | None = None) -> str:
    """The report as a short block of log lines; a problem gets its meaning and what to try."""
    lines = [f"run health{f' ({path})' if path else ''}: {report['summary']}"]
    width = max(len(check["name"]) for check in report["checks"])
    for check in report["checks"]:
        lines.append(f"  {check['status']:<4}  {check['name']:<{width}}  {check['value']}")
        if check["status"] != "ok":
            lines.append(f"        means: {check['meaning']}")
            lines.append(f"        try:   {check['try']}")
    return "\n".join(lines)


def stuck_states(counts: HealthCounts, patience: tuple[int, int]) -> dict[str, str]:
    """The states that waste a run, reached so far: {kind: message}."""
    states = {}
    if counts.kl_clamped_longest >= patience[0]:
        states["kl"] = (
            f"train/kl has been exactly 0 for {patience[0]} consecutive steps: the KL reference "
            "point z_ref is clamped at 0 (the policy's log-ratio on unrelated completions is "
            "negative), so KTO is running without its reference point. This is usual early with "
            "loss.estimator=mismatched or with a tiny loss.beta; consider loss.estimator=batch, "
            "or check that the data's KL rows differ from the main rows."
        )
    if counts.saturated_longest >= patience[1]:
        states["saturation"] = (
            f"every training row has been saturated for {patience[1]} consecutive steps "
            f"(|beta*(log-ratio - z_ref)| > {SATURATION_LOGIT:.3g}): the loss gives almost no "
            "gradient. Consider a smaller loss.beta or a lower learning rate."
        )
    return states
