"""Entry point: score a trained policy against its reference with the KTO validation metrics.

python -m kto_lightning.evaluate ckpt_path=outputs/kto/runs/<time>               # its last.ckpt
python -m kto_lightning.evaluate ckpt_path=RUN/checkpoints/best-step120.ckpt     # one checkpoint
python -m kto_lightning.evaluate ckpt_path=RUN/hf_model data.source.test_split=test
python -m kto_lightning.evaluate --help              # the config groups and every key

With no data argument, a run's own validation rows are scored (its test split when it names
one). The library is kto_lightning.cli.evaluation (`evaluate`); this file is the command line,
light on purpose, so that `--help` (cli/app_help.py) prints before torch is imported. The
evaluation's run directory (outputs/eval/runs/<time>) receives eval.json and
reward_distributions.png.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from kto_lightning.cli import config_location
from kto_lightning.cli.app_help import app_help
from kto_lightning.cli.arguments import print_help

__all__ = ["cli", "main"]

COMMAND = "python -m kto_lightning.evaluate"
SUMMARY = (
    "Score a run's policy against its reference on the run's own validation rows (or its test "
    "split, or the rows data.* names), writing eval.json and reward histograms."
)
EXAMPLES = [
    f"{COMMAND} ckpt_path=outputs/kto/runs/<time>",
    f"{COMMAND} ckpt_path=RUN/hf_model data.source.test_split=test",
]


@hydra.main(
    version_base="1.3", config_path=str(config_location.config_dir()), config_name="evaluate"
)
def main(cfg: DictConfig) -> None:
    from kto_lightning.cli.evaluation import run_evaluation

    run_evaluation(cfg)


def cli() -> None:
    """The command line: --help from the schemas, else Hydra composes and `main` runs."""
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print_help(app_help(COMMAND, "evaluate", SUMMARY, EXAMPLES))
        return
    from kto_lightning.cli.config_files import prepare_composition
    from kto_lightning.cli.guards import run_explained

    prepare_composition()  # the schemas and resolvers the YAML files name, before composing
    run_explained(main)


if __name__ == "__main__":
    cli()
