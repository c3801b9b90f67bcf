"""The package's import contracts (pyproject's [tool.importlinter], run by `lint-imports` in
.ci/run): no import circle, and no module imports an entry point but the API imports train.

The contracts are checked in-process on the package's real import graph; the process test
shows that composing a config needs config_files only, not an entry point's import side effects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grimp
import pytest
from importlinter import api as _configured  # noqa: F401  (configures importlinter's settings)
from importlinter.application import use_cases
from importlinter.application.app_config import settings

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = str(ROOT / "pyproject.toml")


def _broken(extra_import: tuple[str, str] | None = None) -> list[str]:
    """The names of the contracts the package breaks; with `extra_import` (importer, imported)
    added to its import graph first."""
    real = settings.GRAPH_BUILDER

    class WithExtraImport:
        def build(self, **options: Any) -> grimp.ImportGraph:
            graph = real.build(**options)
            if extra_import is not None:
                graph.add_import(importer=extra_import[0], imported=extra_import[1])
            return graph

    use_cases._register_built_in_contract_types()  # what `lint-imports` does first
    settings.configure(GRAPH_BUILDER=WithExtraImport())
    try:
        options = use_cases.read_user_options(PYPROJECT)
        report = use_cases.create_report(options, cache_dir=None)
    finally:
        settings.configure(GRAPH_BUILDER=real)
    assert not report.could_not_run, report.invalid_contract_options
    return [str(c.name) for c, check in report.get_contracts_and_checks() if not check.kept]


def test_the_package_keeps_its_import_contracts() -> None:
    # Fails on a277ed6: strategies <-> module and reference <-> reference_cache were circles
    # (through TYPE_CHECKING imports), and evaluate imported train for config_dir.
    assert _broken() == []


@pytest.mark.parametrize(
    ("importer", "imported", "contract"),
    [
        ("kto_lightning.core.losses", "kto_lightning.evaluate", "No module imports an entry point"),
        (
            "kto_lightning.runs.run_record",
            "kto_lightning.generate",
            "No module imports an entry point",
        ),
        ("kto_lightning.evaluate", "kto_lightning.train", "Only the Python API imports the train"),
        ("kto_lightning.core.logprobs", "kto_lightning.training.module", "No import circle"),
        (
            "kto_lightning.models.reference_cache",
            "kto_lightning.models.reference",
            "No import circle",
        ),
    ],
)
def test_a_forbidden_import_breaks_a_contract(importer: str, imported: str, contract: str) -> None:
    # An import of an entry point from below it is often a circle as well: only the contract
    # named here is asserted.
    broken = _broken((importer, imported))
    assert any(name.startswith(contract) for name in broken), broken


def test_a_config_composes_with_config_files_alone(tmp_path: Path) -> None:
    """A fresh process: `config_files` alone registers what composing train.yaml needs (the
    schemas the YAML files extend, the sweep-folder resolver), and importing `evaluate` does not
    import the train entry point."""
    script = """
import json, sys
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from kto_lightning.cli.config_files import config_dir
with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
    cfg = compose("train", overrides=["loss.beta=0.3"], return_hydra_config=True)
import kto_lightning.evaluate
print(json.dumps({
    "beta": cfg.loss.beta,
    "schema": type(OmegaConf.to_object(cfg.loss)).__name__,
    "train_imported": "kto_lightning.train" in sys.modules,
}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"beta": 0.3, "schema": "KTOLossConfig", "train_imported": False}
