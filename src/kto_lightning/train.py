"""Entry point: compose the config, build everything, fit, summarise; returns the sweep objective.

python -m kto_lightning.train                               # tiny model + bundled task, CPU
python -m kto_lightning.train model=llama1b loss.beta=0.1   # a real model
python -m kto_lightning.train -m loss.beta=0.05,0.1,0.3     # a sweep
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.strategies import DeepSpeedStrategy
from omegaconf import DictConfig, OmegaConf

from kto_lightning.checkpointing import AtomicCheckpointIO, resume_checkpoint
from kto_lightning.errors import ConfigError, KTOError, user_error
from kto_lightning.export import export_policy
from kto_lightning.guards import explain_unknown_key
from kto_lightning.losses import KTOLossConfig
from kto_lightning.models import ModelSource
from kto_lightning.module import KTOModule
from kto_lightning.plot import plot_run
from kto_lightning.reference import CopyReference, build_provider
from kto_lightning.security import redact_secrets, scrub_files, secret_values
from kto_lightning.strategies import FSDP2Strategy, check_deepspeed

log = logging.getLogger("kto_lightning")


def config_dir() -> Path:
    """`conf/` of a source checkout, else the copy packed into the installed wheel."""
    checkout = Path(__file__).resolve().parents[2] / "conf"
    return checkout if (checkout / "train.yaml").is_file() else Path(__file__).parent / "conf"


def _sharded(trainer: L.Trainer) -> bool:
    """Whether the policy's parameters are split across ranks (FSDP, DeepSpeed)."""
    return isinstance(trainer.strategy, FSDP2Strategy | DeepSpeedStrategy)


def _plot(run_dir: str) -> Path | None:
    """The training-curves PNG of the run, when it logged CSV metrics."""
    if not (Path(run_dir) / "csv" / "metrics.csv").is_file():
        return None
    try:
        return plot_run(run_dir)
    except KTOError as error:  # e.g. no training step logged: nothing to draw
        log.warning("no training curves: %s", error)
        return None


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Build every entry of a group that holds several named objects (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry is not None]


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, torch.Tensor | float | int)}


def _summary(
    before: dict[str, float],
    after: dict[str, float],
    seconds: float,
    trainer: L.Trainer,
    padding: float | None,
) -> str:
    rows = [
        ("validation reward AUROC", "val/rewards/auroc", "{:.3f}"),
        ("validation reward accuracy", "val/rewards/accuracy", "{:.3f}"),
        ("validation reward margin", "val/rewards/margins", "{:+.3f}"),
        ("validation KL reference point", "val/kl", "{:.4f}"),
        ("validation loss", "val/loss", "{:.4f}"),
    ]
    lines = [
        f"KTO training finished in {seconds:.1f} s: {trainer.global_step} optimizer steps, "
        f"{trainer.current_epoch} epoch(s)"
    ]
    width = max(len(label) for label, _, _ in rows)
    for label, key, fmt in rows:
        if key not in after:
            continue
        start = fmt.format(before[key]) if key in before else "n/a"
        lines.append(f"  {label:<{width}}  {start} -> {fmt.format(after[key])}")
    if padding is not None:
        lines.append(f"  padding in training batches: {100 * padding:.1f}% of token slots")
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.dirpath:
        lines.append(f"  checkpoints: {checkpoint.dirpath}")
    lines.append(f"  run directory: {trainer.default_root_dir}")
    return "\n".join(lines)


def compile_backbones(
    policy: torch.nn.Module, reference: torch.nn.Module, options: DictConfig
) -> None:
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


def build(cfg: DictConfig) -> Run:
    """Seed, then build model, data, module and trainer from `cfg`."""
    # The reference model is in eval mode on purpose; Lightning warns about any such module.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    if "DeepSpeedStrategy" in str(cfg.strategy.get("_target_")):
        check_deepspeed(cfg.trainer.accelerator)  # before any data or model is loaded
    L.seed_everything(cfg.seed, workers=True)
    source: ModelSource = instantiate(cfg.model)
    loss_config: KTOLossConfig = instantiate(cfg.loss)
    tokenizer = source.load_tokenizer()
    datamodule = instantiate(cfg.data, tokenizer=tokenizer, with_kl=loss_config.needs_kl_rows)
    # Data first: a bad row stops the run before a large model is loaded, and the class counts
    # are needed to resolve `auto` class weights.
    datamodule.setup("fit")
    # The weights balance the labels as trained on, which data.balanced_batches can change.
    drawn, rows = datamodule.trained_label_counts, datamodule.label_counts
    if drawn[0] * rows[1] != drawn[1] * rows[0]:
        log.info(
            "class weights use the %d desirable and %d undesirable rows an epoch draws, not the "
            "dataset's %d and %d: data.balanced_batches repeats rows to put both labels in "
            "every batch",
            *drawn, *rows,
        )  # fmt: skip
    loss_config, notes = loss_config.with_class_counts(*drawn)
    for note in notes:
        log.warning("%s", note)
    log.info(
        "loss: %s, beta=%g, desirable_weight=%.4g, undesirable_weight=%.4g, estimator=%s",
        loss_config.loss_type,
        loss_config.beta,
        loss_config.desirable_weight,
        loss_config.undesirable_weight,
        loss_config.estimator,
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
        with_kl=loss_config.needs_kl_rows,
        precision=cfg.trainer.precision,
    )
    if cfg.compile.enabled:
        compile_backbones(policy, reference, cfg.compile)
    module = KTOModule(
        policy=policy,
        reference=reference,
        loss=loss_config,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        logprob_chunk_size=cfg.logprob_chunk_size,
    )
    loggers = _instantiate_group(cfg.get("logger"))
    strategy = instantiate(cfg.strategy)
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        strategy=strategy,
        callbacks=_instantiate_group(cfg.get("callbacks")),
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
    )
    # Secrets (a hub token, an API key) never reach a logger or a checkpoint.
    hparams = redact_secrets(OmegaConf.to_container(cfg, resolve=True))
    # Log the weights the loss uses, not "auto".
    hparams["loss"]["desirable_weight"] = loss_config.desirable_weight
    hparams["loss"]["undesirable_weight"] = loss_config.undesirable_weight
    for logger in loggers:
        logger.log_hyperparams(hparams)
    module.run_config = hparams
    return Run(trainer, module, datamodule)


def train(cfg: DictConfig, run: Run | None = None) -> float | None:
    """Build from `cfg` (unless given `run`), fit, print a summary; returns `cfg.objective`."""
    run = run or build(cfg)
    trainer, module, datamodule = run.trainer, run.module, run.datamodule
    resume = resume_checkpoint(cfg.get("resume"), cfg.paths.output_dir)
    before: dict[str, float] = {}
    if cfg.validate_before_training and resume is None:
        trainer.validate(module, datamodule=datamodule, verbose=False)
        before = _scalars(trainer.callback_metrics)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    seconds = time.perf_counter() - start
    after = _scalars(trainer.callback_metrics)
    if trainer.is_global_zero:
        summary = _summary(before, after, seconds, trainer, module.train_padding_share)
        curves = _plot(trainer.default_root_dir)
        log.info("%s%s", summary, f"\n  training curves: {curves}" if curves else "")
        if cfg.export.enabled and _sharded(trainer):
            log.warning(
                "  Hugging Face export skipped: under %s the policy's weights are sharded across "
                "ranks; save full checkpoints (strategy.save_distributed_checkpoint=false) and run "
                "python -m kto_lightning.export CKPT OUT",
                type(trainer.strategy).__name__,
            )
        elif cfg.export.enabled:
            exported = export_policy(
                module.policy,
                datamodule.tokenizer,
                Path(trainer.default_root_dir) / "hf_model",
                merge_lora=cfg.export.merge_lora,
            )
            log.info("  Hugging Face model: %s", exported)

    objective = cfg.get("objective")
    if not objective:
        return None
    if objective not in after:
        raise ConfigError(
            f"objective={objective!r} was not logged; logged metrics: {sorted(after)}"
        )
    value = after[objective] if math.isfinite(after[objective]) else None
    if trainer.is_global_zero:
        record = {"objective": objective, "value": value}
        (Path(trainer.default_root_dir) / "objective.json").write_text(json.dumps(record) + "\n")
    return value


def _scrub_hydra_record(cfg: DictConfig) -> None:
    """Hydra has already written the config and overrides to <run dir>/.hydra: drop secrets."""
    hydra_config = HydraConfig.get()
    if hydra_config.output_subdir is None:
        return
    secrets = secret_values(OmegaConf.to_container(cfg, resolve=False))
    scrub_files(Path(hydra_config.runtime.output_dir) / hydra_config.output_subdir, secrets)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
def main(cfg: DictConfig) -> float | None:
    _scrub_hydra_record(cfg)
    try:
        return train(cfg)
    except Exception as error:
        problem = user_error(error) or explain_unknown_key(error)
        if problem is None:
            raise
        # A problem the user can fix: one clear line, no traceback.
        log.error("%s", problem)
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
