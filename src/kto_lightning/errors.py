"""Errors a user can fix. The entry point prints their message alone, without a traceback.

Every message names the thing to change: the config key, the file, the row, the column, the value.
"""

import errno
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


class RewardError(KTOError, ValueError):
    """A reward function failed or returned something unusable; the message names the function
    and the row."""


def causes(error: BaseException) -> Iterator[BaseException]:
    """`error`, then the error it was raised from (or while handling), and so on down."""
    seen: BaseException | None = error
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


class StorageError(KTOError, OSError):
    """A file or folder could not be written or read: a full disk, a quota, no permission."""


# What each error says to do, for the filesystem errors a user fixes rather than a bug.
_STORAGE_ADVICE = {
    errno.ENOSPC: "the disk is full: free space there, or write elsewhere (hydra.run.dir=<folder>)",
    errno.EDQUOT: "the disk quota is used up: free space there, or write elsewhere "
    "(hydra.run.dir=<folder>)",
    errno.EROFS: "the file system is read-only: write elsewhere (hydra.run.dir=<folder>)",
    errno.EACCES: "this user may not access it: change its permissions, or write elsewhere "
    "(hydra.run.dir=<folder>)",
    errno.EPERM: "this user may not access it: change its permissions, or write elsewhere "
    "(hydra.run.dir=<folder>)",
}


def _storage_error(error: OSError) -> StorageError:
    where = error.filename if error.filename is not None else "a file"
    code = error.errno or 0
    return StorageError(
        f"cannot write or read {where}: {error.strerror or error} "
        f"[{errno.errorcode.get(code, code)}]; {_STORAGE_ADVICE[code]}"
    )


def user_error(error: BaseException) -> KTOError | None:
    """The KTOError behind `error`, if any (Hydra wraps errors raised while instantiating), or a
    StorageError for a full, read-only or forbidden file system."""
    seen = list(causes(error))
    found = next((e for e in seen if isinstance(e, KTOError)), None)
    if found is not None:
        return found
    storage = next((e for e in seen if isinstance(e, OSError) and e.errno in _STORAGE_ADVICE), None)
    return _storage_error(storage) if storage is not None else None


def check_number(key: str, value: object) -> float:
    """`value` as a float; ConfigError naming `key` unless it is a finite number."""
    # bool is an int subclass; `beta: true` in a YAML file is a typo, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{key} must be finite, got {value!r}")
    return float(value)
