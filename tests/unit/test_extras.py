"""Optional packages: the extras of pyproject.toml, and the one-line stop with the pip command
when a choice needs a package that is not installed (made unimportable here)."""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from kto_lightning.cli.config_files import config_dir
from kto_lightning.cli.guards import OPTIONAL_CHOICES, check_optional_packages
from kto_lightning.common.extras import EXTRAS, install_hint, installed, require
from kto_lightning.errors import ConfigError
from kto_lightning.reporting.wandb_logging import check_wandb_login
from kto_lightning.training.strategies import check_deepspeed

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest's own dependency on Python 3.10
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _project() -> dict:
    with PYPROJECT.open("rb") as file:
        return tomllib.load(file)["project"]


def _names(requirements: list[str]) -> set[str]:
    """The distribution names of `requirements`, with the extras a self-reference brings in."""
    extras = _project()["optional-dependencies"]
    names: set[str] = set()
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement)[0].lower()
        if name == "kto_lightning":  # kto_lightning[wandb,tensorboard,...]
            for extra in re.search(r"\[(.*)\]", requirement)[1].split(","):
                names |= _names(extras[extra.strip()])
        else:
            names.add(name)
    return names


@pytest.fixture
def missing(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """Make the named modules (and their submodules) unimportable, as if not installed."""
    real = importlib.util.find_spec

    def block(*modules: str) -> None:
        def find_spec(name: str, package: str | None = None):
            if any(name == m or name.startswith(m + ".") for m in modules):
                return None
            return real(name, package)

        monkeypatch.setattr(importlib.util, "find_spec", find_spec)

    return block


# ------------------------------------------------------------------- pyproject.toml
def test_the_default_install_leaves_every_extra_out() -> None:
    default = _names(_project()["dependencies"])
    assert not default & {"wandb", "tensorboard", "optuna", "deepspeed", "bitsandbytes"}


def test_each_optional_module_is_in_the_extra_its_hint_names() -> None:
    extras = _project()["optional-dependencies"]
    for module, (extra, package) in EXTRAS.items():
        assert package in _names(extras[extra]), (module, extra)


def test_dev_and_all_install_every_optional_package() -> None:
    extras = _project()["optional-dependencies"]
    for bundle in ("dev", "all"):
        assert {package for _, package in EXTRAS.values()} <= _names(extras[bundle]), bundle
    assert {"optuna", "sqlalchemy", "alembic"} <= _names(extras["dev"])  # the sweeps' pins


def test_every_optional_choice_is_a_config_file_and_every_deepspeed_file_a_choice() -> None:
    for group, options in OPTIONAL_CHOICES.items():
        if group.startswith("hydra/"):  # the plugin's own config
            continue
        for option, modules in options.items():
            assert (config_dir() / group / f"{option}.yaml").is_file(), (group, option)
            assert all(module in EXTRAS for module in modules)
    deepspeed = {p.stem for p in (config_dir() / "strategy").glob("deepspeed*.yaml")}
    assert deepspeed and deepspeed == set(OPTIONAL_CHOICES["strategy"])


# ------------------------------------------------------------------- extras
def test_require_names_the_choice_the_package_and_the_pip_command(missing) -> None:
    require("wandb", "logger=wandb")  # installed for the tests: nothing to say
    missing("wandb")
    assert not installed("wandb")
    with pytest.raises(ConfigError) as raised:
        require("wandb", "logger=wandb")
    assert str(raised.value) == (
        'logger=wandb needs the wandb package, not installed: pip install -e ".[wandb]" in the '
        "kto_lightning checkout (or: pip install wandb)"
    )


def test_installed_is_false_for_a_submodule_of_a_missing_package() -> None:
    assert not installed("no_such_package_here.plugin")
    assert install_hint("no_such_package_here") == "pip install no_such_package_here"


# ------------------------------------------------------------------- command-line choices
@pytest.mark.parametrize(
    ("overrides", "module", "choice", "package", "extra"),
    [
        (["logger=wandb"], "wandb", "logger=wandb", "wandb", "wandb"),
        (
            ["-m", "logger=csv,tensorboard"],
            "tensorboard",
            "logger=tensorboard",
            "tensorboard",
            "tensorboard",
        ),
        (
            ["hparams_search=optuna"],
            "optuna",
            "hparams_search=optuna",
            "hydra-optuna-sweeper",
            "sweeps",
        ),
        (
            ["hparams_search=optuna"],
            "hydra_plugins.hydra_optuna_sweeper",
            "hparams_search=optuna",
            "hydra-optuna-sweeper",
            "sweeps",
        ),
        (
            ["strategy=deepspeed_stage3"],
            "deepspeed",
            "strategy=deepspeed_stage3",
            "deepspeed",
            "deepspeed",
        ),
    ],
)
def test_a_choice_without_its_package_stops_with_the_pip_command(
    missing, overrides: list[str], module: str, choice: str, package: str, extra: str
) -> None:
    check_optional_packages(overrides)  # every package installed for the tests
    missing(module, "tensorboardX")
    with pytest.raises(ConfigError) as raised:
        check_optional_packages(overrides)
    assert str(raised.value) == (
        f'{choice} needs the {package} package, not installed: pip install -e ".[{extra}]" in '
        f"the kto_lightning checkout (or: pip install {package})"
    )


def test_other_overrides_and_tensorboardx_need_nothing_more(missing) -> None:
    missing("wandb", "tensorboard", "optuna", "deepspeed", "bitsandbytes")
    check_optional_packages(
        ["logger=csv", "logger.wandb.project=p", "data.source.path=wandb.jsonl", "strategy=ddp"]
    )
    if installed("tensorboardX"):  # Lightning's TensorBoardLogger writes with it
        check_optional_packages(["logger=tensorboard"])


# ------------------------------------------------------------------- composed configs
def test_a_wandb_logger_from_a_config_file_stops_before_anything_loads(
    missing, make_config
) -> None:
    cfg = make_config("logger=wandb", "logger.wandb.offline=true")
    check_wandb_login(cfg)
    missing("wandb")
    with pytest.raises(ConfigError, match=r"^logger=wandb needs the wandb package"):
        check_wandb_login(cfg)


def test_a_deepspeed_strategy_on_a_gpu_without_deepspeed_gives_the_pip_command(missing) -> None:
    missing("deepspeed")
    with pytest.raises(ConfigError, match=re.escape('pip install -e ".[deepspeed]"')):
        check_deepspeed("gpu")
