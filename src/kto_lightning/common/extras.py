"""Optional packages: a feature whose package is not installed stops at once, with the command
that installs it, before any data or model is loaded.

The extras are declared in pyproject.toml (`[project.optional-dependencies]`); this module names,
for each optional package, the extra that brings it (tests/unit/test_extras.py checks that the
two agree). The default run (`python -m kto_lightning.train`) imports none of them.
"""

from __future__ import annotations

import importlib.util

from kto_lightning.errors import ConfigError

# importable module -> (the extra that installs it, what `pip install` needs without the extra)
EXTRAS = {
    "wandb": ("wandb", "wandb"),
    "tensorboard": ("tensorboard", "tensorboard"),
    # The Optuna sweeper plugin brings the optuna 2.x it needs; the `sweeps` extra also pins the
    # SQLAlchemy that optuna 2's storage (hydra.sweeper.storage=sqlite:///...) works with.
    "optuna": ("sweeps", "hydra-optuna-sweeper"),
    "hydra_plugins.hydra_optuna_sweeper": ("sweeps", "hydra-optuna-sweeper"),
    "bitsandbytes": ("bitsandbytes", "bitsandbytes"),
    "deepspeed": ("deepspeed", "deepspeed"),
}


def installed(module: str) -> bool:
    """Whether `module` can be imported, without importing it (a dotted name imports its
    parent packages only)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # its parent package is missing, or it has no spec
        return False


def install_hint(module: str) -> str:
    """The command that installs `module` with the project's pinned range."""
    if module not in EXTRAS:  # not an extra of the project: the package index's name
        return f"pip install {module}"
    extra, package = EXTRAS[module]
    return f'pip install -e ".[{extra}]" in the kto_lightning checkout (or: pip install {package})'


def require(module: str, feature: str) -> None:
    """Stop with one line when `feature` (what the user chose, as they wrote it: `logger=wandb`)
    needs `module` and it is not installed."""
    if not installed(module):
        package = EXTRAS.get(module, (module, module))[1]
        raise ConfigError(
            f"{feature} needs the {package} package, not installed: {install_hint(module)}"
        )
