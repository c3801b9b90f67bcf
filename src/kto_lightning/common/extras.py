"""Optional packages: a feature whose package is not installed stops at once, with the command
that installs it, before any data or model is loaded.

The extras are declared in pyproject.toml (`[project.optional-dependencies]`); this module names,
for each optional package, the extra that brings it.
"""

from __future__ import annotations

import importlib.util

from kto_lightning.errors import ConfigError

# importable module -> (the extra that installs it, its name on the package index)
EXTRAS = {
    "wandb": ("wandb", "wandb"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "optuna": ("sweeps", "optuna"),
    "bitsandbytes": ("bitsandbytes", "bitsandbytes"),
    "deepspeed": ("deepspeed", "deepspeed"),
}


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it."""
    return importlib.util.find_spec(module) is not None


def install_hint(module: str) -> str:
    """The command that installs `module` with the project's pinned range."""
    extra, package = EXTRAS[module]
    return f'pip install -e ".[{extra}]" in the kto_lightning checkout (or: pip install {package})'


def require(module: str, feature: str) -> None:
    """Stop with one line when `feature` (what the user chose, as they wrote it: `logger=wandb`)
    needs `module` and it is not installed."""
    if not installed(module):
        raise ConfigError(
            f"{feature} needs the {module} package, not installed: {install_hint(module)}"
        )
