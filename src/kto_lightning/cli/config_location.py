"""Where the YAML config lives; light on purpose (no torch), for `--help` and `@hydra.main`."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    """`conf/` of a source checkout, else the copy packed into the installed wheel."""
    package = Path(__file__).resolve().parents[1]  # src/kto_lightning
    checkout = package.parents[1] / "conf"
    return checkout if (checkout / "train.yaml").is_file() else package / "conf"
