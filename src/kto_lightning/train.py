"""Entry point: compose the config, build everything, fit; returns the sweep objective.

python -m kto_lightning.train                               # tiny model + bundled task, CPU
python -m kto_lightning.train model=llama1b loss.beta=0.1   # a real model
python -m kto_lightning.train -m loss.beta=0.05,0.1,0.3     # a sweep
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import signal
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from kto_lightning import schemas
from kto_lightning.checkpointing import (
    AtomicCheckpointIO,
    remove_partial_checkpoints,
)
from kto_lightning.errors import ConfigError, user_error
from kto_lightning.guards import explain_missing_value, explain_unknown_key, run_explained
from kto_lightning.interrupts import RunInterrupted, SaveOnInterrupt
from kto_lightning.lifecycle import (
    HuggingFaceExport,
    ReleaseHostMemory,
    RunSummary,
    TrainingCurves,
    ValidateAtLastStep,
    scalar_metrics,
)
from kto_lightning.losses import KTOLossConfig
from kto_lightning.models import CausalLM, ModelSource
from kto_lightning.module import KTOModule
from kto_lightning.reference import CopyReference, build_provider
from kto_lightning.resume import find_resume
from kto_lightning.security import (
    REDACTED,
    is_secret_key,
    redact_secrets,
    scrub_files,
    secret_values,
)
from kto_lightning.strategies import check_deepspeed

log = logging.getLogger("kto_lightning")
schemas.register()  # before any config is composed: the YAML files extend these


def config_dir() -> Path:
    """`conf/` of a source checkout, else the copy packed into the installed wheel."""
    checkout = Path(__file__).resolve().parents[2] / "conf"
    return checkout if (checkout / "train.yaml").is_file() else Path(__file__).parent / "conf"


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Build every entry of a group that holds several named objects (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None]


def compile_backbones(policy: CausalLM, reference: torch.nn.Module, options: DictConfig) -> None:
    """torch.compile the decoder stacks in place (state-dict keys are unchanged).

    Only the backbones are compiled: the chunked LM head is a custom autograd function that runs
    its own loop, and the rest of a step is small.
    """
    kwargs = {"backend": options.backend, "mode": options.mode, "dynamic": options.dynamic}
    policy.get_decoder().compile(**kwargs)
    if isinstance(reference, CopyReference):
        reference.model.get_decoder().compile(**kwargs)


@dataclass
class Run:
    """Everything a run is made of, built from the config but not yet fitted."""

    trainer: L.Trainer
    module: KTOModule
    datamodule: L.LightningDataModule


def _check_integer(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


def build(cfg: DictConfig) -> Run:
    """Seed, then build model, data, module and trainer from `cfg`."""
    schemas.check(cfg)  # '+group.key' additions: Hydra adds them even to structured configs
    # Keys no schema types: the root file's and the trainer's (Lightning's own check is a
    # traceback, raised only once data and model are loaded).
    _check_integer("seed", cfg.seed, 0)
    _check_integer(
        "trainer.accumulate_grad_batches", cfg.trainer.get("accumulate_grad_batches", 1), 1
    )
    # The reference model is in eval mode on purpose; Lightning warns about any such module.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    if "DeepSpeedStrategy" in str(cfg.strategy.get("_target_")):
        check_deepspeed(cfg.trainer.accelerator)  # before any data or model is loaded
    L.seed_everything(cfg.seed, workers=True)
    source: ModelSource = instantiate(cfg.model)
    loss_config: KTOLossConfig = instantiate(cfg.loss)  # as YAML says: a weight may be "auto"
    tokenizer = source.load_tokenizer()
    datamodule = instantiate(cfg.data, tokenizer=tokenizer, needs_kl_rows=loss_config.needs_kl_rows)
    # Data first: a bad row stops the run before a large model is loaded, and the class counts
    # are needed to resolve `auto` class weights.
    datamodule.setup("fit")
    # The weights balance the labels as trained on: data.batching.balanced_batches changes them.
    drawn, rows = datamodule.trained_label_counts, datamodule.label_counts
    if drawn[0] * rows[1] != drawn[1] * rows[0]:
        log.info(
            "class weights use the %d desirable and %d undesirable rows an epoch draws, not the "
            "dataset's %d and %d: data.batching.balanced_batches repeats rows to put both labels "
            "in every batch",
            *drawn, *rows,
        )  # fmt: skip
    loss, notes = loss_config.with_class_counts(*drawn)
    for note in notes:
        log.warning("%s", note)
    log.info(
        "loss: %s, beta=%g, desirable_weight=%.4g, undesirable_weight=%.4g, estimator=%s",
        loss.loss_type,
        loss.beta,
        loss.desirable_weight,
        loss.undesirable_weight,
        loss.estimator,
    )
    policy = source.load_policy()
    if cfg.gradient_checkpointing:
        # Recompute each decoder layer in backward: activation memory for ~30% more compute.
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = build_provider(
        instantiate(cfg.reference),
        policy,
        tokenizer,
        datamodule,
        cfg.logprob_chunk_size,
        needs_kl_rows=loss.needs_kl_rows,
        precision=cfg.trainer.precision,
    )
    if cfg.compile.enabled:
        compile_backbones(policy, reference, cfg.compile)
    module = KTOModule(
        policy=policy,
        reference=reference,
        loss=loss,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        logprob_chunk_size=cfg.logprob_chunk_size,
    )
    loggers = _instantiate_group(cfg.get("logger"))
    strategy = instantiate(cfg.strategy)
    # What every run does around its fit, whatever the callbacks group holds.
    around_fit: list[L.Callback] = [
        SaveOnInterrupt(Path(cfg.paths.output_dir) / "checkpoints"),
        ReleaseHostMemory(),
        ValidateAtLastStep(),
        RunSummary(),
        TrainingCurves(),
    ]
    if cfg.export.enabled:
        around_fit.append(HuggingFaceExport(tokenizer, merge_lora=cfg.export.merge_lora))
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        strategy=strategy,
        callbacks=[*_instantiate_group(cfg.get("callbacks")), *around_fit],
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
    )
    # Secrets (a hub token, an API key) never reach a logger or a checkpoint. The config as
    # composed (a weight may say "auto"), and beside it the loss as it is trained.
    composed = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(composed, dict)
    hparams = redact_secrets(composed)
    hparams["resolved_loss"] = asdict(loss)
    for logger in loggers:
        logger.log_hyperparams(hparams)
    module.run_config = hparams
    return Run(trainer, module, datamodule)


def train(cfg: DictConfig, run: Run | None = None) -> float | None:
    """Build from `cfg` (unless given `run`), fit; returns `cfg.objective` for the sweeper."""
    remove_partial_checkpoints(Path(cfg.paths.output_dir).resolve().parent)
    saved = find_resume(cfg)  # before data and model: a bad checkpoint stops the run here
    if saved is not None and saved.finished:
        log.info(
            "resume: the run in %s already finished (step %d, epoch %d); nothing to train",
            saved.run_dir,
            saved.global_step,
            saved.epoch,
        )
        return recorded_objective(saved.run_dir)
    run = run or build(cfg)
    if cfg.validate_before_training and saved is None:
        run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
    ckpt_path = str(saved.path) if saved is not None else None
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=ckpt_path, weights_only=True)
    return objective(cfg.get("objective"), run.trainer)


def recorded_objective(run_dir: Path) -> float | None:
    """The objective a finished run wrote to its objective.json, if it wrote one."""
    record = run_dir / "objective.json"
    return json.loads(record.read_text())["value"] if record.is_file() else None


def objective(name: str | None, trainer: L.Trainer) -> float | None:
    """The metric `name` after the fit (None when not finite), also written to objective.json."""
    if not name:
        return None
    metrics = scalar_metrics(trainer.callback_metrics)
    if name not in metrics and not any(trainer.num_val_batches):
        log.warning(
            "objective=%s: no validation batch ran (trainer.limit_val_batches=%s), so the run has "
            "no objective; it returns none to a sweeper",
            name,
            trainer.limit_val_batches,
        )
        return None
    if name not in metrics:
        raise ConfigError(f"objective={name!r} was not logged; logged metrics: {sorted(metrics)}")
    value = metrics[name] if math.isfinite(metrics[name]) else None
    if trainer.is_global_zero:
        record = {"objective": name, "value": value}
        (Path(trainer.default_root_dir) / "objective.json").write_text(json.dumps(record) + "\n")
    return value


def _scrub_hydra_record(cfg: DictConfig) -> None:
    """Hydra has already written the config and overrides to <run dir>/.hydra: drop secrets."""
    hydra_config = HydraConfig.get()
    if hydra_config.output_subdir is None:
        return
    secrets = secret_values(OmegaConf.to_container(cfg, resolve=False))
    scrub_files(Path(hydra_config.runtime.output_dir) / hydra_config.output_subdir, secrets)


def resume_command(checkpoint: Path | str) -> str:
    """The command line that resumes this run from `checkpoint`: its overrides (secret-named
    ones shown as ***, for the user to fill in again) and `resume=`."""
    overrides = []
    for override in HydraConfig.get().overrides.task:
        written_key = override.split("=", 1)[0]  # with its + or ~, as the user wrote it
        key = written_key.lstrip("+~")
        if key != "resume":
            overrides.append(f"{written_key}={REDACTED}" if is_secret_key(key) else override)
    return shlex.join(
        [sys.executable.rsplit("/", 1)[-1], "-m", "kto_lightning.train", *overrides,
         f"resume={checkpoint}"]
    )  # fmt: skip


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    _scrub_hydra_record(cfg)
    try:
        return train(cfg)
    except RunInterrupted as stopped:
        log.error("%s", stopped)
        print(f"{stopped}; resume with:\n  {resume_command(stopped.checkpoint)}", file=sys.stderr)
        raise SystemExit(stopped.exit_code) from None
    except SIGTERMException:  # Lightning stopped the run before a step could be saved
        saved = sorted(
            (Path(cfg.paths.output_dir) / "checkpoints").glob("*.ckpt"),
            key=lambda path: path.stat().st_mtime,
        )
        where = f"resume with:\n  {resume_command(saved[-1])}" if saved else "no checkpoint yet"
        print(f"stopped by SIGTERM between optimizer steps; {where}", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except Exception as error:
        problem = user_error(error) or explain_unknown_key(error) or explain_missing_value(error)
        if problem is None:
            raise
        # A problem the user can fix: one clear line, no traceback.
        log.error("%s", problem)
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    run_explained(main)
