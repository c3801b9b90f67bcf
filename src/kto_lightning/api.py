"""`run_training`: a training run from Python, from the same overrides as the command line.

It composes conf/train.yaml with Hydra's compose API (no `hydra.main`, so no change of the
working directory or of logging), gives the run the folder the command line would
(`outputs/<task_name>/runs/<time>`, unless `paths.output_dir` is overridden), records the
composed config in `<run dir>/.hydra/config.yaml` and `overrides.yaml` as Hydra does (evaluate,
generate and export read a run folder by them), and runs `kto_lightning.cli.run_fit.train`.
Errors are raised, not printed: a `KTOError` subclass names the key, file or row to fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from kto_lightning.common.security import redact_secrets
from kto_lightning.runs.run_dir import fresh_dir
from kto_lightning.runs.run_record import CHECKPOINTS, LAST, export_folder
from kto_lightning.runs.sweeps import shown_overrides


@dataclass(frozen=True)
class RunResult:
    """What a run produced.

    Attributes:
        run_dir: the run's folder (checkpoints/, metrics.csv, hf_model/, .hydra/).
        objective: the value of the config's `objective` metric after the fit (None when the
            config names none, no validation ran, or it was not finite).
        last_checkpoint: `checkpoints/last.ckpt`, or None when the run saved none.
        hf_model: the exported Hugging Face folder, or None when export was off.
        config: the composed config the run trained with.
    """

    run_dir: Path
    objective: float | None
    last_checkpoint: Path | None
    hf_model: Path | None
    config: DictConfig


def compose_config(*overrides: str) -> DictConfig:
    """conf/train.yaml composed with `overrides`, as `python -m kto_lightning.train` would, with
    `paths.output_dir` a fresh time-stamped run folder unless an override names one."""
    from hydra import compose, initialize_config_dir

    from kto_lightning.cli.config_files import config_dir  # registers the YAML files' schemas

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="kto"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    if not any(o.lstrip("+~").startswith("paths.output_dir=") for o in overrides):
        # Hydra's run folder, resolved here: `${hydra:runtime.output_dir}` needs a Hydra job.
        run_dir = fresh_dir(Path(str(cfg.hydra.run.dir)))
        cfg.paths.output_dir = str(run_dir.resolve())
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _record_config(cfg: DictConfig, overrides: tuple[str, ...]) -> None:
    """The run's `.hydra/config.yaml` and `overrides.yaml`, secret-named values as ***."""
    record = Path(cfg.paths.output_dir) / ".hydra"
    record.mkdir(parents=True, exist_ok=True)
    composed = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(composed, dict)
    (record / "config.yaml").write_text(OmegaConf.to_yaml(redact_secrets(composed)))
    (record / "overrides.yaml").write_text(OmegaConf.to_yaml(shown_overrides(list(overrides))))


def run_training(*overrides: str) -> RunResult:
    """Train as `python -m kto_lightning.train OVERRIDES...` does, in this process.

    Args:
        overrides: Hydra overrides, e.g. "loss.beta=0.2", "data=local",
            "data.source.path=rows.jsonl" (no `-m`: a sweep is the command line's).

    Returns:
        The run's folder, objective, last checkpoint, Hugging Face export and config.

    Raises:
        KTOError: a problem the user can fix (a ConfigError, a DataError, ...), naming it.
    """
    from kto_lightning.cli.run_fit import release_device_memory, train

    cfg = compose_config(*overrides)
    _record_config(cfg, overrides)
    try:
        value = train(cfg)
    finally:
        release_device_memory()
    run_dir = Path(cfg.paths.output_dir)
    last = run_dir / CHECKPOINTS / LAST
    hf_model = export_folder(run_dir)
    return RunResult(
        run_dir=run_dir,
        objective=value,
        last_checkpoint=last if last.is_file() else None,
        hf_model=hf_model if hf_model.is_dir() else None,
        config=cfg,
    )
