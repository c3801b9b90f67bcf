"""What a run directory holds, read in one place: the one reader the run tools ask.

A run directory (a sweep's job directory is one too) holds:

<run dir>/checkpoints/last.ckpt        the newest state; its run config is the run's
<run dir>/checkpoints/best-step<N>.ckpt the best by the monitored metric
<run dir>/hf_model/                     the policy exported at the end of the run
<run dir>/.hydra/config.yaml            the config as Hydra composed it (no checkpoint needed)
<run dir>/objective.json                the sweep objective (kto_lightning.runs.run_records)

`resolve_run` accepts any of the run directory, a .ckpt inside it (or anywhere), or its hf_model
folder. One precedence rule for the run config: the named checkpoint's stored config, else
last.ckpt's, else .hydra/config.yaml's. A checkpoint's is preferred because training wrote it
resolved (the seed, the data's hold-out, the loss's "auto" weights as trained), secrets redacted.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kto_lightning.errors import ConfigError
from kto_lightning.models import EXPORT_DIR
from kto_lightning.runs.checkpointing import RUN_CONFIG_KEY, load_run_checkpoint
from kto_lightning.runs.moved_paths import current_paths
from kto_lightning.runs.run_records import read_objective

CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
HF_MODEL = EXPORT_DIR  # where a run exports its policy at its end
HYDRA_CONFIG = Path(".hydra") / "config.yaml"
_BEST = re.compile(r"best-step(\d+)(?:-v\d+)?\.ckpt$")
ADVICE = (
    "pass a checkpoint written by kto_lightning.train, a run directory, or a Hugging Face folder"
)


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One training run, as its files record it.

    Attributes:
        named: what the path resolved to: a checkpoint file (a run directory names its last.ckpt)
            or a Hugging Face folder.
        kind: "checkpoint" or "hf_model": which of the two `named` is.
        run_dir: the run directory; None for a checkpoint or folder found outside one.
        config: the run config (see the module docstring for which one), resolved; None when
            nothing records it (a Hugging Face folder of no run).
        checkpoint: the contents of `named` when it is a checkpoint (tensors memory-mapped).
        last, best: the run's checkpoints/last.ckpt and best-step<N>.ckpt (the highest N), if any.
        hf_model: the run's hf_model folder, if any.
        objective: (metric, value) of objective.json, if the run wrote one.
    """

    named: Path
    kind: str
    run_dir: Path | None
    config: dict[str, Any] | None
    checkpoint: dict[str, Any] | None = None
    last: Path | None = None
    best: Path | None = None
    hf_model: Path | None = None
    objective: tuple[str, float | None] | None = None


def load_checkpoint(path: Path, key: str = "ckpt_path") -> dict[str, Any]:
    """A training checkpoint's contents; ConfigError naming `key=path` unless it is one."""
    checkpoint = load_run_checkpoint(path, key, ADVICE)
    if "model" not in checkpoint[RUN_CONFIG_KEY]:
        raise ConfigError(f"{key}={str(path)!r}: its run config names no model; {ADVICE}")
    return checkpoint


def export_folder(run_dir: str | Path) -> Path:
    """The Hugging Face folder a run exports its policy to (it may not have written it)."""
    return Path(run_dir) / HF_MODEL


def is_run_dir(path: Path) -> bool:
    """Whether `path` looks like a run directory: checkpoints or a Hydra record in it."""
    return (path / CHECKPOINTS / LAST).exists() or (path / HYDRA_CONFIG).is_file()


def hydra_config(run_dir: Path) -> dict[str, Any] | None:
    """`.hydra/config.yaml` of `run_dir`, each top-level key resolved where it can be outside
    Hydra (paths.output_dir needs Hydra's runtime: such a key stays as written); None: no file."""
    path = run_dir / HYDRA_CONFIG
    if not path.is_file():
        return None
    try:
        composed = OmegaConf.load(path)
        assert isinstance(composed, DictConfig)
        as_written = OmegaConf.to_container(composed, resolve=False)
        assert isinstance(as_written, dict)
        config: dict[str, Any] = {}
        for key in composed:
            try:
                value = OmegaConf.select(composed, str(key), throw_on_resolution_failure=True)
                if isinstance(value, DictConfig | ListConfig):
                    value = OmegaConf.to_container(value, resolve=True)
            except OmegaConfBaseException:  # an interpolation only Hydra resolves
                value = as_written[key]
            config[str(key)] = value
        return current_paths(config)  # a run of before the modules moved: where they are now
    except OmegaConfBaseException as error:
        raise ConfigError(f"could not read the run config {str(path)!r}: {error}") from None


def _best(run_dir: Path) -> Path | None:
    """The best-step<N>.ckpt with the highest N (the newest best)."""
    found = [(int(m.group(1)), p) for p in (run_dir / CHECKPOINTS).glob("best-step*.ckpt")
             if (m := _BEST.search(p.name))]  # fmt: skip
    return max(found)[1] if found else None


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint of `run_dir` written last (by modification time), for a message that names
    one to resume or to score; None when it has none."""
    found = sorted((run_dir / CHECKPOINTS).glob("*.ckpt"), key=lambda path: path.stat().st_mtime)
    return found[-1] if found else None


def _run_dir_of(named: Path, kind: str) -> Path | None:
    """The run directory that holds a checkpoint (in its checkpoints/) or an hf_model folder."""
    parent = named.parent.parent if kind == "checkpoint" else named.parent
    if kind == "checkpoint" and named.parent.name != CHECKPOINTS:
        return None
    return parent if is_run_dir(parent) else None


def _record(named: Path, kind: str, checkpoint: dict[str, Any] | None) -> RunRecord:
    run_dir = _run_dir_of(named, kind)
    last = run_dir / CHECKPOINTS / LAST if run_dir is not None else None
    last = last if last is not None and last.exists() else None
    config = checkpoint[RUN_CONFIG_KEY] if checkpoint is not None else None
    if config is None and last is not None and last.is_file():
        config = load_checkpoint(last)[RUN_CONFIG_KEY]
    if config is None and run_dir is not None:
        config = hydra_config(run_dir)
    hf_model = export_folder(run_dir) if run_dir is not None else None
    return RunRecord(
        named=named,
        kind=kind,
        run_dir=run_dir,
        config=config,
        checkpoint=checkpoint,
        last=last,
        best=_best(run_dir) if run_dir is not None else None,
        hf_model=hf_model if hf_model is not None and hf_model.is_dir() else None,
        objective=read_objective(run_dir) if run_dir is not None else None,
    )


def _sweep_jobs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and is_run_dir(p))


def resolve_run(path: str | Path, key: str = "ckpt_path") -> RunRecord:
    """The run that `path` names: a run (or sweep job) directory, a .ckpt, or an hf_model folder.

    Raises:
        ConfigError: naming `key=path` when it is none of these, or a form that cannot be scored
            as it is (a LoRA adapter alone, a sharded checkpoint folder, a sweep's root folder).
    """
    path = Path(path).expanduser()
    if path.is_file():
        return _record(path, "checkpoint", load_checkpoint(path, key))
    if (path / "config.json").is_file():
        return _record(path, "hf_model", None)
    if (path / "adapter_config.json").is_file():
        raise ConfigError(
            f"{key}={str(path)!r} holds a LoRA adapter alone (export keep_adapter=true); pass "
            "the checkpoint it was exported from, or export it merged"
        )
    last = path / CHECKPOINTS / LAST
    if last.is_file():
        return resolve_run(last, key)
    if (path / ".metadata").is_file() or (last / ".metadata").is_file():
        raise ConfigError(
            f"{key}={str(path)!r} is a sharded checkpoint folder; evaluate its run's hf_model "
            "folder, or a full checkpoint (strategy.save_distributed_checkpoint=false)"
        )
    if path.is_dir() and (jobs := _sweep_jobs(path)):
        raise ConfigError(
            f"{key}={str(path)!r} is a sweep's folder; pass one of its jobs' directories: "
            f"{', '.join(jobs[:5])}{', ...' if len(jobs) > 5 else ''}"
        )
    what = "a folder" if path.is_dir() else "no such file or folder"
    raise ConfigError(
        f"{key}={str(path)!r}: {what}; pass a checkpoint file (.ckpt), a run directory "
        "(with checkpoints/last.ckpt) or a Hugging Face model folder (with config.json)"
    )
