"""Entry point: compose the config, build everything, fit; returns the sweep objective.

python -m kto_lightning.train                               # tiny model + bundled task, CPU
python -m kto_lightning.train model=llama1b loss.beta=0.1   # a real model
python -m kto_lightning.train -m loss.beta=0.05,0.1,0.3     # a sweep
python -m kto_lightning.train --help                        # the config groups and every key

What a run is made of is built by kto_lightning.cli.run_build (`build`); its fit, resume, signals
and errors are kto_lightning.cli.run_fit (`train`, `run_job`). This file is the command line:
light on purpose, so that `--help` (generated from the schemas and conf/: cli/app_help.py)
prints before torch or Lightning is imported.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from kto_lightning.cli import config_location
from kto_lightning.cli.app_help import app_help
from kto_lightning.cli.arguments import print_help

__all__ = ["cli", "main"]

COMMAND = "python -m kto_lightning.train"
SUMMARY = (
    "Fit a policy with KTO (or SFT: loss=sft) on binary feedback. Pick a file of a config group "
    "with group=option and set any key with key=value; -m runs a sweep over comma-separated values."
)
EXAMPLES = [
    COMMAND,
    f"{COMMAND} model=llama1b loss.beta=0.1 trainer=gpu",
    f"{COMMAND} data=local data.source.path=rows.jsonl",
    f"{COMMAND} -m loss.beta=0.05,0.1,0.3",
]


@hydra.main(version_base="1.3", config_path=str(config_location.config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from kto_lightning.cli.run_fit import run_job

    return run_job(cfg)


def cli() -> None:
    """The command line: --help from the schemas, else Hydra composes and `main` runs."""
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print_help(app_help(COMMAND, "train", SUMMARY, EXAMPLES))
        return
    # Registers the schemas and resolvers the YAML files name, before Hydra composes them.
    from kto_lightning.cli.config_files import prepare_composition
    from kto_lightning.cli.guards import run_explained

    prepare_composition()
    run_explained(main)


if __name__ == "__main__":
    cli()
