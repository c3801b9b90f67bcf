"""Class weights: "auto" resolved from the class counts, and the paper's recommended range.

KTO's paper (eq. 8) recommends lambda_D * n_D / (lambda_U * n_U) in [1, 4/3], counted over the rows
that training draws. `loss.desirable_weight: auto` (or the undesirable side) sets that ratio to 1.
"""

from __future__ import annotations

import math

from kto_lightning.errors import ConfigError, DataError, check_number

AUTO = "auto"
# Paper eq. 8: lambda_D * n_D / (lambda_U * n_U) should lie in [1, 4/3].
RECOMMENDED_RATIO = (1.0, 4.0 / 3.0)


def _parse_weight(key: str, value: float | str) -> float | str:
    if isinstance(value, str):
        if value.strip().lower() == AUTO:
            return AUTO
        raise ConfigError(f"{key} must be a number >= 0 or {AUTO!r}, got {value!r}")
    weight = check_number(key, value)
    if weight < 0:
        raise ConfigError(f"{key} must be >= 0, got {value!r}")
    return weight


def check_weights(desirable: float | str, undesirable: float | str) -> tuple[float | str, ...]:
    """Each weight a number >= 0 or AUTO; not both AUTO, not both 0, no 0 opposite an AUTO."""
    keys = ("loss.desirable_weight", "loss.undesirable_weight")
    w_d, w_u = _parse_weight(keys[0], desirable), _parse_weight(keys[1], undesirable)
    if w_d == AUTO and w_u == AUTO:
        raise ConfigError(
            f"{keys[0]} and {keys[1]} are both {AUTO!r}; at most one may be {AUTO!r} "
            "(set the other to a number, e.g. 1.0)"
        )
    if w_d == 0 and w_u == 0:
        raise ConfigError(f"{keys[0]} and {keys[1]} are both 0; at least one must be > 0")
    if AUTO in (w_d, w_u) and 0 in (w_d, w_u):
        auto_key, fixed_key = keys if w_d == AUTO else keys[::-1]
        raise ConfigError(
            f"{fixed_key}=0 leaves nothing for {auto_key}={AUTO} to balance against "
            "(both weights would be 0); set it > 0"
        )
    return w_d, w_u


def resolve_class_weights(
    desirable_weight: float | str,
    undesirable_weight: float | str,
    n_desirable: int,
    n_undesirable: int,
) -> tuple[float, float, list[str]]:
    """Turn an ``"auto"`` weight into a number from the class counts (paper eq. 8).

    - One side ``"auto"`` (case-insensitive): it is set so that
      ``lambda_D * n_D / (lambda_U * n_U) == 1``, the low end of the recommended
      `RECOMMENDED_RATIO` range; the other side keeps its value.
    - Both numeric: returned unchanged, with a warning when the ratio is outside
      `RECOMMENDED_RATIO` that states the ratio, the counts and the weight that would make it 1.
    - A class with no rows: no ratio exists; an ``"auto"`` side becomes 1.0 and a warning names
      the missing class.

    Args:
        desirable_weight: ``loss.desirable_weight``, a number >= 0 or ``"auto"``.
        undesirable_weight: ``loss.undesirable_weight``, a number >= 0 or ``"auto"``.
        n_desirable: desirable rows in the training set.
        n_undesirable: undesirable rows in the training set.

    Returns:
        ``(lambda_D, lambda_U, warnings)``; the warnings are messages for the caller to log.

    Raises:
        ConfigError: both sides ``"auto"``, a value that is neither a number >= 0 nor
            ``"auto"``, or a numeric 0 opposite an ``"auto"`` side (that would make both 0).
        DataError: both counts are 0.
    """
    keys = ("loss.desirable_weight", "loss.undesirable_weight")
    w_d, w_u = check_weights(desirable_weight, undesirable_weight)
    if n_desirable < 0 or n_undesirable < 0:
        raise ValueError(f"class counts must be >= 0, got {n_desirable} and {n_undesirable}")
    if n_desirable + n_undesirable == 0:
        raise DataError("the training set has no rows, so class weights cannot be resolved")

    warnings: list[str] = []
    if n_desirable == 0 or n_undesirable == 0:
        missing = "desirable" if n_desirable == 0 else "undesirable"
        present = n_undesirable if n_desirable == 0 else n_desirable
        other = "undesirable" if n_desirable == 0 else "desirable"
        message = (
            f"the training data is single-class: 0 {missing} rows ({present} {other}), so "
            f"lambda_D*n_D/(lambda_U*n_U) has no value"
        )
        if AUTO in (w_d, w_u):
            message += f"; {keys[0] if w_d == AUTO else keys[1]}={AUTO} falls back to 1.0"
        warnings.append(message)
        return (
            1.0 if w_d == AUTO else float(w_d),
            1.0 if w_u == AUTO else float(w_u),
            warnings,
        )

    if w_d == AUTO or w_u == AUTO:
        fixed = w_u if w_d == AUTO else w_d
        assert isinstance(fixed, float)
        if w_d == AUTO:
            return fixed * n_undesirable / n_desirable, fixed, warnings
        return fixed, fixed * n_desirable / n_undesirable, warnings

    assert isinstance(w_d, float) and isinstance(w_u, float)
    ratio = w_d * n_desirable / (w_u * n_undesirable) if w_u > 0 else math.inf
    low, high = RECOMMENDED_RATIO
    # A relative tolerance so that weights typed to a few decimals (e.g. 1.3333) are not flagged.
    if ratio < low * (1 - 1e-6) or ratio > high * (1 + 1e-6):
        if w_u > 0:
            fix = f"{keys[0]}={w_u * n_undesirable / n_desirable:.4g}"
        else:
            fix = f"{keys[1]}={w_d * n_desirable / n_undesirable:.4g}"
        warnings.append(
            f"{keys[0]}={w_d!r} and {keys[1]}={w_u!r} give lambda_D*n_D/(lambda_U*n_U) = "
            f"{ratio:.4g} with {n_desirable} desirable and {n_undesirable} undesirable rows, "
            f"outside the recommended [1, 4/3]; {fix} (or {AUTO} on that side) sets it to 1"
        )
    return w_d, w_u, warnings
