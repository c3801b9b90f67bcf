"""What a training run is made of, built from its composed config: model, data, module, trainer.

`build` seeds, then builds in the order that stops a bad run earliest: the config's values, the
data (a bad row stops the run before a large model loads; the class counts resolve `auto`
weights), the model, the stage's module (KTO with its reference provider, or SFT), and the
trainer with the callbacks every run has around its fit (cli/lifecycle.py, runs/interrupts.py).
"""

from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedTokenizerBase

from kto_lightning.cli import schemas
from kto_lightning.cli.config_files import config_dir, on_gpu
from kto_lightning.cli.config_values import check_objective, check_values
from kto_lightning.cli.hub_push import check_run_push
from kto_lightning.cli.lifecycle import (
    HuggingFaceExport,
    ReleaseHostMemory,
    RunSummary,
    TrainingCurves,
    ValidateAtLastStep,
)
from kto_lightning.cli.online_run import online_datamodule, online_module
from kto_lightning.common.security import redact_secrets
from kto_lightning.core.chunked_head import resolve_chunk_size
from kto_lightning.core.logprobs import CausalLM
from kto_lightning.core.losses import KTOLoss, KTOLossConfig
from kto_lightning.data import KTODataModule
from kto_lightning.data.data_files import DATA_FILES_KEY, data_files
from kto_lightning.data.kept_rows import DROPPED_UNDESIRABLE
from kto_lightning.models import ModelSource, check_context_window
from kto_lightning.models.quantizing import check_trainable
from kto_lightning.models.reference import (
    CopyReference,
    ReferenceProvider,
    build_provider,
    reference_note,
    resolved_kind,
)
from kto_lightning.reporting.csv_logger import ContinuingCSVLogger, OptimizerStepNumbers
from kto_lightning.reporting.model_card import data_counts
from kto_lightning.reporting.progress import console_callbacks, log_config, quiet_library_noise
from kto_lightning.reporting.wandb_logging import (
    check_wandb_login,
    is_wandb,
    wandb_logger,
)
from kto_lightning.runs.checkpointing import (
    AtomicCheckpointIO,
)
from kto_lightning.runs.interrupts import (
    SaveOnInterrupt,
)
from kto_lightning.runs.run_records import DATA_COUNTS_KEY
from kto_lightning.training.compiling import compile_decoder_layers
from kto_lightning.training.module import KTOModule, PolicyModule
from kto_lightning.training.sft import SFTLoss, SFTModule
from kto_lightning.training.strategies import check_deepspeed, keep_state_on_device

log = logging.getLogger("kto_lightning")


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
    check_run_push(cfg.export)  # a hub push without a token, or offline, stops here, not at the end
    L.seed_everything(cfg.seed, workers=True)
    source: ModelSource = instantiate(cfg.model)
    # Quantized weights cannot train: refused before the data is read.
    check_trainable(getattr(source, "quantization", None), getattr(source, "lora", None))
    # As YAML says (a KTO weight may be "auto"); SFTLoss with loss=sft.
    loss_config: KTOLossConfig | SFTLoss = instantiate(cfg.loss)
    check_objective(cfg.get("objective"), sft_stage=isinstance(loss_config, SFTLoss))
    tokenizer = source.load_tokenizer()
    online = bool(cfg.get("online"))  # online KTO: prompts, sampled and labelled during training
    datamodule: Any = (  # a KTODataModule, or online a PromptDataModule
        online_datamodule(cfg, tokenizer)
        if online
        else instantiate(
            cfg.data,
            tokenizer=tokenizer,
            needs_kl_rows=loss_config.needs_kl_rows,
            drop_undesirable=isinstance(loss_config, SFTLoss),  # SFT: the desirable rows only
        )
    )
    # Data first: a bad row stops the run before a large model is loaded, and the class counts
    # are needed to resolve `auto` class weights.
    datamodule.setup("fit")
    # Here, once the config's values and the data are checked: an error in either is the first
    # thing a run prints, not a line after the whole config.
    log_config(cfg)
    # Online, each step resolves an "auto" class weight from the completions it keeps.
    loss = loss_config if online else _trained_loss(loss_config, datamodule)
    policy = source.load_policy()
    if not online:
        check_context_window(
            policy, datamodule.lengths.max_length, "data.lengths.max_length", datamodule.longest_row
        )
    vocab_size = getattr(policy.config, "vocab_size", None) or len(tokenizer)
    cfg.logprob_chunk_size = resolve_chunk_size(cfg.logprob_chunk_size, on_gpu(cfg), vocab_size)
    if cfg.gradient_checkpointing:
        # Recompute each decoder layer in backward: activation memory for ~30% more compute.
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if online:
        module: PolicyModule = online_module(cfg, loss_config, policy, tokenizer, datamodule)
    else:
        loss = cast(KTOLoss | SFTLoss, loss)
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
    if isinstance(module, KTOModule):  # `auto` as the provider it became: adapter or copy
        hparams["resolved_reference"] = resolved_kind(cfg.reference.kind, policy)
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
    spec = instantiate(cfg.reference)
    reference = build_provider(
        spec,
        policy,
        tokenizer,
        datamodule,
        cfg.logprob_chunk_size,
        needs_kl_rows=loss.needs_kl_rows,
        precision=cfg.trainer.precision,
        deferred=True,  # a cache is filled in KTOModule.setup, where every DDP rank takes a shard
        sharded=_sharded(cfg),
    )
    log.info("%s", reference_note(spec.kind, reference, policy))
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
