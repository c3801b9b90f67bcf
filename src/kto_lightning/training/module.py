"""KTOModule: the policy, its frozen reference, the KTO loss and the metrics.

Its base, `PolicyModule`, holds what every stage that trains a policy shares (KTO here, SFT in
training/sft.py): the policy, its optimizer and schedule, FSDP sharding, and what a checkpoint
holds. The module orchestrates; the maths lives elsewhere. One KTO step, shared by training and
validation:
    policy    log-probs of the main rows (with grad)
    policy    log-probs of the KL rows (no grad; only when the loss needs KL rows)
    reference log-probs of main and KL rows (no grad; a model, the disabled adapters or a cache)
    kto_lightning.core.step.kto_step: z_ref and the row count all-reduced -> loss -> metric sums
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from kto_lightning.common.distributed import all_reduce_sum, gather_cat, world_size
from kto_lightning.core import health
from kto_lightning.core.logprobs import rows_logprobs
from kto_lightning.core.losses import KTOLoss
from kto_lightning.core.metrics import FIELDS, metrics_from_sums, reward_auroc
from kto_lightning.core.packing import Packing
from kto_lightning.core.step import Reduction, StepLogps, StepResult, kto_step
from kto_lightning.errors import ConfigError
from kto_lightning.models.reference import ReferenceProvider
from kto_lightning.runs.checkpointing import (
    RUN_CONFIG_KEY,
    keep_trainable_weights,
    put_back_frozen_weights,
    restore_rng_states,
    save_rng_states,
)
from kto_lightning.training.optim import build_optimizer, clip_gradients, parameter_groups
from kto_lightning.training.strategies import FSDP2Strategy


class PolicyModule(L.LightningModule):
    """The policy being trained, its optimizer and schedule, sharding and checkpoint contents.

    Subclasses add the step and the metrics (`KTOModule`, `kto_lightning.training.sft.SFTModule`).

    Args:
        policy: the causal LM being trained.
        optimizer: a partial optimizer, called with the parameter groups (`_partial_: true`).
        scheduler: a partial schedule, called with `optimizer` and `total_steps`; None for none.
        logprob_chunk_size: rows of the LM head computed at once when scoring completions.
        packing: run the rows packed without padding (`data.batching.packing`); None: padded.
    """

    # What the closing summary calls the run: "KTO training finished in ...".
    summary_title = "training"
    # Metrics shown in the progress bar, under short names; the loggers get the full names.
    progress_bar: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        policy: nn.Module,
        optimizer: Callable[..., Optimizer],
        scheduler: Callable[..., Any] | None = None,
        logprob_chunk_size: int = 256,
        packing: Packing | None = None,
    ) -> None:
        super().__init__()
        self.packing = packing
        self.policy = policy
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.logprob_chunk_size = logprob_chunk_size
        self.run_config: dict | None = None  # set by the entry point; stored in checkpoints
        self._train_metric_sums: Tensor | None = None  # this rank's totals over the whole run
        self._val_metric_sums: Tensor | None = None  # ... and over this validation epoch
        self._step_sums: Tensor | None = None  # the last training step's sums over all ranks
        self._step_values: dict[str, float] | None = None  # ... as floats, once asked for
        self._step_at_batch_start = 0
        self._batch_size = 0

    def _logps(self, model: nn.Module, batch: dict[str, Tensor], prefix: str = "") -> Tensor:
        return rows_logprobs(model, batch, prefix, self.logprob_chunk_size, self.packing)

    def metrics_of(self, sums: Tensor) -> dict[str, Tensor]:
        """Means from a sums vector of this module's steps (each stage has its own fields)."""
        raise NotImplementedError

    def _record_train_step(self, sums: Tensor, batch_size: int) -> Tensor:
        """Keep a training step's metric sums: in the run's totals, and over all ranks (one
        all-reduce of a small vector) for `step_metrics`, which are returned. Nothing is read on
        the host here."""
        totals = self._train_metric_sums
        self._train_metric_sums = sums if totals is None else totals + sums
        self._step_sums = step_sums = all_reduce_sum(sums)
        self._step_values = None
        self._batch_size = batch_size
        return step_sums

    def step_metrics(self) -> dict[str, float]:
        """The last training step's metrics over all ranks, as `train/<name>` floats.

        Read from the device once per step, and only when asked: by the log at the steps where
        Lightning writes to the loggers (`on_train_batch_end`), and by the progress lines. Every
        other step leaves its metrics on the device, so the host never waits for them.
        """
        if self._step_values is None and self._step_sums is not None:
            metrics = self.step_tensors(self._step_sums)
            values = torch.stack([v.float() for v in metrics.values()]).tolist()  # one sync
            names = [f"train/{name}" for name in metrics]
            self._step_values = dict(zip(names, values, strict=True))
        return dict(self._step_values or {})

    def step_tensors(self, step_sums: Tensor) -> dict[str, Tensor]:
        """What `step_metrics` reads of a step, by name without `train/`: its metrics."""
        return self.metrics_of(step_sums)

    def logs_this_step(self) -> bool:
        """Whether the training step that just ended is one whose metrics go to the loggers.

        Lightning writes step metrics every `trainer.log_every_n_steps` optimizer steps and at a
        stop (the rule of its logger connector); logged anywhere else, a metric would only be
        converted, one sync per value, and dropped. False in the middle of gradient accumulation.
        A callback may read `step_metrics` at these steps at no cost: the module reads them then.
        """
        trainer = self.trainer
        if trainer.global_step == self._step_at_batch_start or self._step_sums is None:
            return False
        every = int(getattr(trainer, "log_every_n_steps", 0))  # set by its logger connector
        written = bool(every) and (trainer.global_step % every == 0 or trainer.should_stop)
        return written or bool(getattr(trainer, "fast_dev_run", False))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_at_batch_start = self.trainer.global_step

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Logged at the steps Lightning writes (its logger connector runs right after this hook),
        # as host tensors read in one copy.
        if not self.logs_this_step():
            return
        values = self.step_metrics()
        for name, value in values.items():
            self.log(name, torch.tensor(value), batch_size=self._batch_size, sync_dist=False)
        for name, short in self.progress_bar.items():
            if f"train/{name}" in values:
                self.log(
                    short,
                    torch.tensor(values[f"train/{name}"]),
                    prog_bar=True,
                    logger=False,
                    batch_size=self._batch_size,
                )

    @property
    def train_padding_share(self) -> float | None:
        """Share of padding in all training batches of this rank so far (None before any)."""
        if self._train_metric_sums is None:
            return None
        return float(self.metrics_of(self._train_metric_sums)["padding"])

    def configure_model(self) -> None:
        # FSDP2 shards the models here, once the process group and its device mesh exist.
        if isinstance(self.trainer.strategy, FSDP2Strategy):
            self.trainer.strategy.shard(self)

    # ---------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(
            self.optimizer_factory,
            parameter_groups(self.policy),
            self.trainer.precision_plugin,
            self.trainer.gradient_clip_val,
        )
        if self.scheduler_factory is None:
            return optimizer
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ConfigError(
                "the learning-rate schedule needs a finite run: set trainer.max_steps or "
                "trainer.max_epochs, or scheduler=null"
            )
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=int(total_steps))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        clip_gradients(
            self.trainer.precision_plugin, optimizer, gradient_clip_val, gradient_clip_algorithm
        )

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint[RUN_CONFIG_KEY] = self.run_config
        keep_trainable_weights(checkpoint, self)
        save_rng_states(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        put_back_frozen_weights(checkpoint, self)
        restore_rng_states(checkpoint)


class KTOModule(PolicyModule):
    """Train `policy` with KTO against the frozen `reference`.

    Args:
        policy: the causal LM being trained.
        reference: where reference log-probs come from: a frozen copy of the initial policy, the
            policy with its adapters disabled, or a cache (see kto_lightning.models.reference).
        loss: the loss hyperparameters, class weights resolved (`KTOLossConfig.with_class_counts`).
        optimizer: a partial optimizer, called with the parameter groups (`_partial_: true`).
        scheduler: a partial schedule, called with `optimizer` and `total_steps`; None for none.
        logprob_chunk_size: rows of the LM head computed at once when scoring completions.
        packing: run the rows packed without padding (`data.batching.packing`); None: padded.
    """

    summary_title = "KTO training"
    progress_bar: ClassVar[dict[str, str]] = {
        "loss": "loss",
        "kl": "kl",
        "rewards/margins": "margin",
    }

    def __init__(
        self,
        policy: nn.Module,
        reference: ReferenceProvider,
        loss: KTOLoss,
        optimizer: Callable[..., Optimizer],
        scheduler: Callable[..., Any] | None = None,
        logprob_chunk_size: int = 256,
        packing: Packing | None = None,
    ) -> None:
        super().__init__(policy, optimizer, scheduler, logprob_chunk_size, packing)
        self.reference = reference.eval().requires_grad_(False)
        self.loss = loss
        self._val_rewards: list[Tensor] = []
        self._val_labels: list[Tensor] = []
        # The run's health counters over all ranks, on the device (core.health.COUNTERS).
        self._health: Tensor | None = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["health_counters"] = self._health  # a resumed run counts on from here

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        counters = checkpoint.get("health_counters")
        self._health = None if counters is None else counters.to(self.device)

    def train(self, mode: bool = True) -> KTOModule:
        # Lightning puts the whole module in train mode at the start of fit; the reference stays
        # in eval mode so that its dropout never fires.
        super().train(mode)
        self.reference.eval()
        return self

    def last_trained_metrics(self) -> dict[str, float]:
        """The metrics of the run's last step that trained (with the run's health counters),
        for the end-of-run report: the last step's."""
        return self.step_metrics()

    def trained_class_weights(self) -> tuple[float, float]:
        """(lambda_D, lambda_U) the run's rows trained with, for the health report's eq. 8
        check: the loss's (online KTO resolves them per draw)."""
        return self.loss.desirable_weight, self.loss.undesirable_weight

    def metrics_of(self, sums: Tensor) -> dict[str, Tensor]:
        # A training step's sums carry the saturated rows after the metric sums (core.health).
        metrics = metrics_from_sums(sums[: len(FIELDS)])
        if len(sums) > len(FIELDS):
            metrics.update(health.saturation_metrics(sums))
        return metrics

    def step_tensors(self, step_sums: Tensor) -> dict[str, Tensor]:
        # The run's health counters are read with the step's metrics: one copy for both.
        counters = {} if self._health is None else health.counter_metrics(self._health)
        return {**self.metrics_of(step_sums), **counters}

    def setup(self, stage: str) -> None:
        # Lightning calls this on every rank once the process group exists, before the model is
        # moved, cast or wrapped: a cached reference fills its table here, each rank a shard.
        self.reference.prepare(self.policy)

    # ---------------------------------------------------------------- forward passes
    def forward_logps(self, batch: dict[str, Tensor], split: str) -> StepLogps:
        """The log-probs a KTO step needs; the KL ones only when the loss needs KL rows.

        `split` ("train" or "validation") is the data split the batch comes from; a cached
        reference reads that split's log-probs.
        """
        needs_kl_rows = self.loss.needs_kl_rows
        kl_policy = None
        # The no-grad passes first: their temporaries are freed before the graded forward starts
        # holding activations for backward, so the two never add up to the step's peak memory.
        with torch.no_grad():
            if needs_kl_rows:
                kl_policy = self._logps(self.policy, batch, "kl_")
            reference, kl_reference = self.reference.logps(
                self.policy, batch, split, self.logprob_chunk_size, needs_kl_rows, self.packing
            )
        policy = self._logps(self.policy, batch)
        return StepLogps(policy, reference, kl_policy, kl_reference)

    # ---------------------------------------------------------------- the shared step
    def _step(self, batch: dict[str, Tensor], split: str) -> StepResult:
        masks = [batch["attention_mask"]]
        if "kl_attention_mask" in batch:
            masks.append(batch["kl_attention_mask"])
        return kto_step(
            self.forward_logps(batch, split),
            batch["labels"],
            self.loss,
            Reduction(all_reduce_sum, world_size()),
            real_tokens=sum(m.sum() for m in masks),
            slot_tokens=float(sum(m.numel() for m in masks)),
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._train_on(batch)

    def _train_on(self, batch: dict[str, Tensor]) -> Tensor:
        """A training step on `batch`: its loss, with the step's metrics and health counted."""
        result = self._step(batch, "train")
        output, labels = result.output, batch["labels"]
        saturated = health.saturation_sums(
            output.rewards, labels, self.loss.beta * output.reference_point
        )
        step_sums = self._record_train_step(torch.cat([result.metric_sums, saturated]), len(labels))
        self._health = health.update_counters(self._health, step_sums)  # on the device, no read
        return result.loss

    # ---------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_metric_sums = None
        self._val_rewards, self._val_labels = [], []

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        result = self._step(batch, "validation")
        sums, totals = result.metric_sums, self._val_metric_sums
        self._val_metric_sums = sums if totals is None else totals + sums
        self._val_rewards.append(result.output.rewards.float())
        self._val_labels.append(batch["labels"])

    def on_validation_epoch_end(self) -> None:
        if self._val_metric_sums is None:
            return
        metrics = metrics_from_sums(all_reduce_sum(self._val_metric_sums))
        rewards = gather_cat(torch.cat(self._val_rewards))
        labels = gather_cat(torch.cat(self._val_labels).to(torch.uint8)).bool()
        metrics["rewards/auroc"] = reward_auroc(rewards, labels).to(self.device)
        for name, value in metrics.items():
            self.log(f"val/{name}", value, sync_dist=False)
        self.log("val_auroc", metrics["rewards/auroc"], prog_bar=True, logger=False)
