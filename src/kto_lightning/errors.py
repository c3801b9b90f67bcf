"""Errors a user can fix. The entry point prints their message alone, without a traceback.

Every message names the thing to change: the config key, the file, the row, the column, the value.
"""

import math
from collections.abc import Iterator


class KTOError(Exception):
    """Base class for problems in the user's config, data or environment."""


class ConfigError(KTOError, ValueError):
    """A config value is invalid; the message names the key."""


class DataError(KTOError, ValueError):
    """The training data is unusable; the message names the file, row, column or value."""


class TrainingDiverged(KTOError):
    """The loss or a gradient stopped being finite; the message names the step and checkpoint."""


class ModelLoadError(KTOError, OSError):
    """A model or tokenizer could not be loaded; the message says where it was looked for."""


def causes(error: BaseException) -> Iterator[BaseException]:
    """`error`, then the error it was raised from (or while handling), and so on down."""
    seen: BaseException | None = error
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def user_error(error: BaseException) -> KTOError | None:
    """The KTOError behind `error`, if any: Hydra wraps errors raised while instantiating."""
    return next((seen for seen in causes(error) if isinstance(seen, KTOError)), None)


def check_number(key: str, value: object) -> float:
    """`value` as a float; ConfigError naming `key` unless it is a finite number."""
    # bool is an int subclass; `beta: true` in a YAML file is a typo, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be finite, got {value!r}")
    return float(value)
