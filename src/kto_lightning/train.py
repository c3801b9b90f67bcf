"""Entry point: compose the config, build everything, fit; returns the sweep objective.

python -m kto_lightning.train                               # tiny model + bundled task, CPU
python -m kto_lightning.train model=llama1b loss.beta=0.1   # a real model
python -m kto_lightning.train -m loss.beta=0.05,0.1,0.3     # a sweep
"""

from __future__ import annotations

import gc
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
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from kto_lightning.cli import schemas
from kto_lightning.cli.config_files import config_dir, on_gpu
from kto_lightning.cli.config_values import check_objective, check_values
from kto_lightning.cli.guards import explain_missing_value, explain_unknown_key, run_explained
from kto_lightning.cli.lifecycle import (
    HuggingFaceExport,
    ReleaseHostMemory,
    RunSummary,
    TrainingCurves,
    ValidateAtLastStep,
    scalar_metrics,
)
from kto_lightning.common.security import redact_secrets, scrub_hydra_record
from kto_lightning.core.logprobs import CausalLM, resolve_chunk_size
from kto_lightning.core.losses import KTOLoss, KTOLossConfig
from kto_lightning.data import KTODataModule
from kto_lightning.data.datamodule import DATA_FILES_KEY, DROPPED_UNDESIRABLE, data_files
from kto_lightning.errors import ConfigError, TrainingDiverged, causes, user_error
from kto_lightning.models import ModelSource, check_context_window
from kto_lightning.models.reference import CopyReference, ReferenceProvider, build_provider
from kto_lightning.reporting.csv_logger import ContinuingCSVLogger, OptimizerStepNumbers
from kto_lightning.reporting.model_card import data_counts
from kto_lightning.reporting.progress import console_callbacks, log_config, quiet_library_noise
from kto_lightning.reporting.wandb_logging import (
    check_wandb_login,
    finishing_wandb_run,
    is_wandb,
    wandb_logger,
)
from kto_lightning.runs.checkpointing import (
    AtomicCheckpointIO,
    remove_partial_checkpoints,
)
from kto_lightning.runs.interrupts import (
    BeforeTraining,
    RunInterrupted,
    SaveOnInterrupt,
    StoppedAtOnce,
)
from kto_lightning.runs.resume import find_resume
from kto_lightning.runs.run_dir import claim_run_dir, output_dir_key
from kto_lightning.runs.run_records import DATA_COUNTS_KEY, OBJECTIVE_FILE, read_objective
from kto_lightning.runs.sweeps import (
    in_sweep,
    job_result,
    record,
    shown_overrides,
)
from kto_lightning.training.compiling import compile_decoder_layers
from kto_lightning.training.module import KTOModule, PolicyModule
from kto_lightning.training.sft import SFTLoss, SFTModule
from kto_lightning.training.strategies import check_deepspeed, keep_state_on_device

log = logging.getLogger("kto_lightning")
# `config_dir` and `on_gpu` come from config_files, whose import registers the schemas and the
# resolvers that composing needs; `train.config_dir` stays importable for existing callers.


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Build every entry of a group that holds several named objects (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None]


def compile_backbones(
    policy: CausalLM, reference: ReferenceProvider | None, options: DictConfig
) -> None:
    """torch.compile each decoder layer of the policy and of a `copy` reference, in place
    (state-dict keys are unchanged; see kto_lightning.training.compiling)."""
    kwargs = {"backend": options.backend, "mode": options.mode, "dynamic": options.dynamic}
    compile_decoder_layers(policy, **kwargs)
    if isinstance(reference, CopyReference):
        compile_decoder_layers(reference.model, **kwargs)


@dataclass
class Run:
    """Everything a run is made of, built from the config but not yet fitted."""

    trainer: L.Trainer
    module: PolicyModule  # a KTOModule, or an SFTModule with loss=sft
    datamodule: L.LightningDataModule
    interrupt: SaveOnInterrupt  # among the trainer's callbacks: what a signal stopped and saved


def _sharded(cfg: DictConfig) -> bool:
    """Whether the strategy shards the models' weights (FSDP, DeepSpeed)."""
    target = str(cfg.strategy.get("_target_", ""))
    return "FSDP" in target or "DeepSpeed" in target


def build(cfg: DictConfig, resumed_step: int | None = None) -> Run:
    """Seed, then build model, data, module and trainer from `cfg`; `resumed_step`: the step of
    the checkpoint this run resumes from, whose metrics file it continues."""
    # '+key' additions: Hydra adds them even to structured configs, and to the root.
    schemas.check(cfg, root=config_dir() / "train.yaml")
    # Keys no schema types: the root file's and the trainer's (Lightning's own check is a
    # traceback, raised only once data and model are loaded).
    check_values(cfg)
    # The reference model is in eval mode on purpose; Lightning warns about any such module.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    quiet_library_noise(interactive=sys.stdout.isatty())
    if "DeepSpeedStrategy" in str(cfg.strategy.get("_target_")):
        check_deepspeed(cfg.trainer.accelerator)  # before any data or model is loaded
    check_wandb_login(cfg)  # W&B without a login fails here, not once the model is loaded
    L.seed_everything(cfg.seed, workers=True)
    source: ModelSource = instantiate(cfg.model)
    # As YAML says (a KTO weight may be "auto"); SFTLoss with loss=sft.
    loss_config: KTOLossConfig | SFTLoss = instantiate(cfg.loss)
    check_objective(cfg.get("objective"), sft_stage=isinstance(loss_config, SFTLoss))
    tokenizer = source.load_tokenizer()
    datamodule = instantiate(
        cfg.data,
        tokenizer=tokenizer,
        needs_kl_rows=loss_config.needs_kl_rows,
        drop_undesirable=isinstance(loss_config, SFTLoss),  # SFT learns the desirable rows only
    )
    # Data first: a bad row stops the run before a large model is loaded, and the class counts
    # are needed to resolve `auto` class weights.
    datamodule.setup("fit")
    # Here, once the config's values and the data are checked: an error in either is the first
    # thing a run prints, not a line after the whole config.
    log_config(cfg)
    loss = _trained_loss(loss_config, datamodule)
    policy = source.load_policy()
    check_context_window(
        policy, datamodule.lengths.max_length, "data.lengths.max_length", datamodule.longest_row
    )
    vocab_size = getattr(policy.config, "vocab_size", None) or len(tokenizer)
    cfg.logprob_chunk_size = resolve_chunk_size(cfg.logprob_chunk_size, on_gpu(cfg), vocab_size)
    if cfg.gradient_checkpointing:
        # Recompute each decoder layer in backward: activation memory for ~30% more compute.
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module = _module(cfg, loss, policy, tokenizer, datamodule)
    # A W&B run starts here, one per job, its command line redacted, before anything is logged.
    loggers = [
        wandb_logger(entry, cfg) if is_wandb(entry) else instantiate(entry)
        for entry in (cfg.get("logger") or {}).values()
        if entry is not None
    ]
    for logger in loggers:
        if isinstance(logger, ContinuingCSVLogger) and resumed_step is not None:
            logger.continue_from(resumed_step)  # before the first write empties metrics.csv
    strategy = instantiate(cfg.strategy)
    # What every run does around its fit, whatever the callbacks group holds.
    interrupt = SaveOnInterrupt(Path(cfg.paths.output_dir) / "checkpoints")
    around_fit: list[L.Callback] = [
        interrupt,
        ReleaseHostMemory(),
        OptimizerStepNumbers(),  # every logger writes the optimizer steps done (1-based)
        ValidateAtLastStep(),
        TrainingCurves(),
    ]
    if cfg.export.enabled:
        around_fit.append(HuggingFaceExport(tokenizer, merge_lora=cfg.export.merge_lora))
    # Last: the summary reports what the callbacks before it did at the end of the run.
    callbacks = [*_instantiate_group(cfg.get("callbacks")), *around_fit, RunSummary()]
    # A progress bar on a terminal, plain log lines elsewhere (SLURM, nohup, a pipe).
    console, switches = console_callbacks(cfg.trainer, callbacks, cfg.progress.every_n_steps)
    if "enable_checkpointing" not in cfg.trainer:
        # Lightning adds a ModelCheckpoint of its own when none is given (callbacks=none): it
        # would write checkpoints nobody asked for, under the logger's folder.
        switches["enable_checkpointing"] = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        strategy=strategy,
        callbacks=[*callbacks, *console],
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
        **switches,
    )
    keep_state_on_device(trainer.strategy)  # no copy of models and optimizer to the host at the end
    # Secrets (a hub token, an API key) never reach a logger or a checkpoint. The config as
    # composed (a weight may say "auto"), and beside it the loss as it is trained.
    composed = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(composed, dict)
    hparams = redact_secrets(composed)
    hparams["resolved_loss"] = asdict(loss)
    hparams[DATA_COUNTS_KEY] = data_counts(datamodule)  # the rows trained on, for the model card
    # What each local data file held: a resume checks that the rows at that path are the same.
    hparams[DATA_FILES_KEY] = data_files(datamodule.source)
    for logger in loggers:
        logger.log_hyperparams(hparams)
    module.run_config = hparams
    return Run(trainer, module, datamodule, interrupt)


def _trained_loss(
    loss_config: KTOLossConfig | SFTLoss, datamodule: KTODataModule
) -> KTOLoss | SFTLoss:
    """The loss as trained, logged: KTO's `auto` class weights resolved from the rows an epoch
    draws; SFT's as it is."""
    if isinstance(loss_config, SFTLoss):
        summary = datamodule.summaries["train"]
        log.info(
            "loss: sft, the mean token NLL of the completions of %d desirable training rows (%d "
            "undesirable rows dropped); no KL rows",
            summary.desirable, summary.dropped.get(DROPPED_UNDESIRABLE, 0),
        )  # fmt: skip
        return loss_config
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
    return loss


def _module(
    cfg: DictConfig,
    loss: KTOLoss | SFTLoss,
    policy: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    datamodule: KTODataModule,
) -> PolicyModule:
    """The stage's LightningModule: KTO with its reference provider, or SFT, which has none."""
    optimizer = instantiate(cfg.optimizer)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    if isinstance(loss, SFTLoss):
        log.info(
            "no reference model: loss=sft needs none (reference=%s is not used)", cfg.reference.kind
        )
        if cfg.compile.enabled:
            compile_backbones(policy, None, cfg.compile)
        return SFTModule(
            policy, optimizer, scheduler, cfg.logprob_chunk_size, datamodule.batching.packed
        )
    reference = build_provider(
        instantiate(cfg.reference),
        policy,
        tokenizer,
        datamodule,
        cfg.logprob_chunk_size,
        needs_kl_rows=loss.needs_kl_rows,
        precision=cfg.trainer.precision,
        deferred=True,  # a cache is filled in KTOModule.setup, where every DDP rank takes a shard
        sharded=_sharded(cfg),
    )
    if cfg.compile.enabled:
        compile_backbones(policy, reference, cfg.compile)
    return KTOModule(
        policy=policy,
        reference=reference,
        loss=loss,
        optimizer=optimizer,
        scheduler=scheduler,
        logprob_chunk_size=cfg.logprob_chunk_size,
        packing=datamodule.batching.packed,
    )


def train(cfg: DictConfig, run: Run | None = None) -> float | None:
    """Build from `cfg` (unless given `run`), fit; returns `cfg.objective` for the sweeper."""
    remove_partial_checkpoints(Path(cfg.paths.output_dir).resolve().parent)
    saved = find_resume(cfg)  # before data and model: a bad checkpoint stops the run here
    key = output_dir_key(cfg)
    if saved is not None and saved.run_dir is not None:
        # The run goes on where it was: checkpoints, metrics, curves, export and objective.
        if saved.run_dir != Path(cfg.paths.output_dir).resolve():
            log.info(
                "resume: continuing in %s (this launch's own log stays in %s)",
                saved.run_dir,
                cfg.paths.output_dir,
            )
            remove_partial_checkpoints(saved.run_dir.parent)
        cfg.paths.output_dir = str(saved.run_dir)
        key = "resume"
    # One run per folder: refused while another live run writes there, or when it holds another
    # run's checkpoints and this run does not resume them.
    claim_run_dir(Path(cfg.paths.output_dir), key, resumed=key == "resume")
    if saved is not None and saved.finished:
        log.info(
            "resume: the run of %s already finished (step %d, epoch %d); nothing to train",
            saved.path,
            saved.global_step,
            saved.epoch,
        )
        recorded = read_objective(cfg.paths.output_dir)  # what the finished run wrote, if any
        return recorded[1] if recorded is not None else None
    run = run or build(cfg, resumed_step=saved.global_step if saved is not None else None)
    if cfg.validate_before_training and saved is None:
        run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
    ckpt_path = str(saved.path) if saved is not None else None
    try:
        run.trainer.fit(
            run.module, datamodule=run.datamodule, ckpt_path=ckpt_path, weights_only=True
        )
    except SIGTERMException:  # Lightning stops on SIGTERM after the step SaveOnInterrupt saved
        if run.interrupt.stopped is None:
            raise
        raise run.interrupt.stopped from None
    if saved is not None and saved.interrupted and saved.at_last_step:
        # A signal stopped it after its last step, before that step's validation: Lightning's
        # loop, already at max_steps, ends at once, so the validation is run here.
        run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
    return objective(cfg.get("objective"), run.trainer)


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
        (Path(trainer.default_root_dir) / OBJECTIVE_FILE).write_text(json.dumps(record) + "\n")
    return value


def release_device_memory() -> None:
    """Free what a finished run left on the device: Lightning's trainer and module refer to each
    other, so they go with the garbage collector's next pass, not at once."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resume_command(checkpoint: Path | str) -> str:
    """The command line that resumes this run from `checkpoint`: its overrides (secret-named
    ones shown as ***, for the user to fill in again) and `resume=`."""
    task = [o for o in HydraConfig.get().overrides.task if o.partition("=")[0] != "resume"]
    return shlex.join(
        [sys.executable.rsplit("/", 1)[-1], "-m", "kto_lightning.train", *shown_overrides(task),
         f"resume={checkpoint}"]
    )  # fmt: skip


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    scrub_hydra_record(cfg)
    # SIGTERM and Ctrl-C outside the training loop: at once before it (data preparation, model
    # loading), after the end of the run's work once it is past its last step.
    signals = BeforeTraining()
    try:
        with finishing_wandb_run(), signals:  # else a sweep's next job logs into this job's run
            value = train(cfg)
    except RunInterrupted as stopped:
        _record_job(cfg, None, "interrupted", str(stopped))
        log.error("%s", stopped)
        print(f"{stopped}; resume with:\n  {resume_command(stopped.checkpoint)}", file=sys.stderr)
        raise SystemExit(stopped.exit_code) from None
    except SIGTERMException:  # Lightning stopped the run before a step could be saved
        _record_job(cfg, None, "interrupted", "SIGTERM between optimizer steps")
        saved = sorted(
            (Path(cfg.paths.output_dir) / "checkpoints").glob("*.ckpt"),
            key=lambda path: path.stat().st_mtime,
        )
        where = f"resume with:\n  {resume_command(saved[-1])}" if saved else "no checkpoint yet"
        print(f"stopped by SIGTERM between optimizer steps; {where}", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except (StoppedAtOnce, Exception) as error:
        # Also behind another error: a library's cleanup may raise one of its own on the way out.
        at_once = next((e for e in causes(error) if isinstance(e, StoppedAtOnce)), None)
        if at_once is not None:
            _record_job(cfg, None, "interrupted", str(at_once))
            log.error("%s", at_once)
            print(at_once, file=sys.stderr)
            raise SystemExit(at_once.exit_code) from None
        problem = user_error(error) or explain_unknown_key(error) or explain_missing_value(error)
        if problem is None:
            # A bug: its traceback, through the log rather than Hydra's report (which echoes the
            # overrides, secrets included).
            log.exception("the run failed")
        else:  # a problem the user can fix: one clear line, no traceback
            log.error("%s", problem)
            print(f"error: {problem}", file=sys.stderr)
        status = "diverged" if isinstance(problem, TrainingDiverged) else "failed"
        if _record_job(cfg, None, status, str(problem or repr(error))):
            return None  # the sweeper goes on with the next job
        raise SystemExit(1) from None
    finally:
        # A run's models and optimizer stay on the device at its end, finished or failed
        # (keep_state_on_device); they are freed here, before a sweep's next job.
        release_device_memory()
    _record_job(cfg, value, "completed")
    if signals.late is not None:  # the end of the run was finished first; a sweep stops here
        name = signal.Signals(signals.late).name
        message = f"stopped by {name} after the last training step; the run finished first"
        log.warning("%s", message)
        print(f"{message}: nothing to resume", file=sys.stderr)
        raise SystemExit(128 + signals.late)
    return value


def _record_job(cfg: DictConfig, value: float | None, status: str, message: str = "") -> bool:
    """In a sweep, add this job's row to sweep_results.csv and return True; else False."""
    if not in_sweep():
        return False
    output_dir = Path(cfg.paths.output_dir)
    table = record(job_result(cfg.get("objective"), value, status, output_dir, message))
    if status != "completed":
        log.warning("job %s %s; recorded in %s", output_dir.name, status, table)
    return True


if __name__ == "__main__":
    run_explained(main)
