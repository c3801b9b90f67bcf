"""KTOModule: the policy, its frozen reference, the KTO loss and the metrics.

The module orchestrates; the maths lives elsewhere. One training step:
    policy    log-probs of the main rows (with grad)
    policy    log-probs of the KL rows (no grad; `mismatched` estimator only)
    reference log-probs of main and KL rows in one batched forward (no grad)
    z_ref from (sum, count) all-reduced across ranks -> kto_loss -> metrics as sums and counts
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import random
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from kto_lightning.distributed import all_reduce_sum, gather_cat, world_size
from kto_lightning.errors import ConfigError
from kto_lightning.logprobs import sequence_logprobs
from kto_lightning.losses import (
    KTOLossConfig,
    kl_statistics,
    kto_loss,
    reference_point_from_statistics,
)
from kto_lightning.metrics import batch_sums, finalize, reward_auroc
from kto_lightning.optim import build_optimizer, clip_gradients, parameter_groups
from kto_lightning.reference import ReferenceProvider
from kto_lightning.strategies import FSDP2Strategy

REFERENCE_PREFIX = "reference."
# Shown in the progress bar under short names; the loggers get the full names.
PROGRESS_BAR = {"loss": "loss", "kl": "kl", "rewards/margins": "margin"}


def _malloc_trim() -> Callable[[], object] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


_TRIM = _malloc_trim()


def release_freed_host_memory() -> None:
    """Hand memory freed during the step back to the OS (glibc keeps it mapped otherwise).

    A step frees hundreds of MB of temporaries; glibc keeps much of it in its heaps, and the next
    step's allocations land beside it rather than in it, which raises the peak RSS of a CPU run.
    Costs about a millisecond.
    """
    if _TRIM is not None:
        _TRIM(0)


class KTOModule(L.LightningModule):
    """Train `policy` with KTO against the frozen `reference`.

    Args:
        policy: the causal LM being trained.
        reference: where reference log-probs come from: a frozen copy of the initial policy, the
            policy with its adapters disabled, or a cache (see kto_lightning.reference).
        loss: the loss hyperparameters (beta, class weights, reference-point estimator).
        optimizer: a partial optimizer, called with the parameter groups (`_partial_: true`).
        scheduler: a partial schedule, called with `optimizer` and `total_steps`; None for none.
        logprob_chunk_size: rows of the LM head computed at once when scoring completions.
    """

    def __init__(
        self,
        policy: nn.Module,
        reference: ReferenceProvider,
        loss: KTOLossConfig,
        optimizer: Callable[..., Optimizer],
        scheduler: Callable[..., Any] | None = None,
        logprob_chunk_size: int = 256,
    ) -> None:
        super().__init__()
        if not loss.weights_resolved:
            raise ConfigError(
                "the loss still has an 'auto' class weight; resolve it with "
                "KTOLossConfig.with_class_counts(n_desirable, n_undesirable) first"
            )
        self.policy = policy
        self.reference = reference.eval().requires_grad_(False)
        self.loss_config = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.logprob_chunk_size = logprob_chunk_size
        # The reference point: APO-zero needs none, whatever estimator the config names.
        self.estimator = loss.estimator if loss.loss_type == "kto" else "zero"
        self.run_config: dict | None = None  # set by the entry point; stored in checkpoints
        self._train_sums: Tensor | None = None  # this rank's totals over the whole run
        self._val_sums: Tensor | None = None
        self._val_rewards: list[Tensor] = []
        self._val_labels: list[Tensor] = []

    def train(self, mode: bool = True) -> KTOModule:
        # Lightning puts the whole module in train mode at the start of fit; the reference stays
        # in eval mode so that its dropout never fires.
        super().train(mode)
        self.reference.eval()
        return self

    # ---------------------------------------------------------------- forward passes
    def _logps(self, model: nn.Module, batch: dict[str, Tensor], prefix: str = "") -> Tensor:
        return sequence_logprobs(
            model,
            batch[f"{prefix}input_ids"],
            batch[f"{prefix}attention_mask"],
            batch[f"{prefix}completion_mask"],
            chunk_size=self.logprob_chunk_size,
        )

    def forward_logps(self, batch: dict[str, Tensor], split: str) -> dict[str, Tensor | None]:
        """The four log-prob vectors a KTO step needs; KL ones are None unless `mismatched`.

        `split` ("train" or "validation") tells a cached reference which table to read.
        """
        with_kl = self.estimator == "mismatched"
        kl_policy_logps = None
        # The no-grad passes first: their temporaries are freed before the graded forward starts
        # holding activations for backward, so the two never add up to the step's peak memory.
        with torch.no_grad():
            if with_kl:
                kl_policy_logps = self._logps(self.policy, batch, "kl_")
            reference_logps, kl_reference_logps = self.reference.logps(
                self.policy, batch, split, self.logprob_chunk_size, with_kl
            )
        policy_logps = self._logps(self.policy, batch)
        return {
            "policy": policy_logps,
            "reference": reference_logps,
            "kl_policy": kl_policy_logps,
            "kl_reference": kl_reference_logps,
        }

    # ---------------------------------------------------------------- the shared step
    def _step(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor, Tensor, Tensor]:
        """Returns the loss to backpropagate, the local metric sums and the rewards."""
        logps = self.forward_logps(batch, split)
        labels = batch["labels"]
        kl_sum, kl_count = kl_statistics(
            self.estimator,
            logps["policy"],
            logps["reference"],
            logps["kl_policy"],
            logps["kl_reference"],
        )
        rows = kl_sum.new_tensor(float(len(labels)))
        # One all-reduce for the reference point and the global row count: every rank then uses
        # the same z_ref, and the loss is normalised by the global number of rows.
        global_kl_sum, global_kl_count, global_rows = all_reduce_sum(
            torch.stack([kl_sum, kl_count, rows])
        )
        z_ref = reference_point_from_statistics(global_kl_sum, global_kl_count)
        out = kto_loss(logps["policy"], logps["reference"], labels, z_ref, self.loss_config)
        # Gradient averaging across ranks divides by the world size; multiplying it back makes the
        # result the exact mean over all rows of all ranks, even when ranks hold unequal batches.
        loss = out.losses.sum() * world_size() / global_rows
        masks = [batch["attention_mask"]]
        if "kl_attention_mask" in batch:
            masks.append(batch["kl_attention_mask"])
        sums = batch_sums(
            out.losses,
            out.rewards,
            logps["policy"],
            labels,
            kl_sum,
            kl_count,
            threshold=self.loss_config.beta * out.reference_point,
            real_tokens=sum(m.sum() for m in masks),
            slot_tokens=float(sum(m.numel() for m in masks)),
        )
        return loss, sums, out.rewards

    def _log_metrics(self, stage: str, metrics: dict[str, Tensor], batch_size: int) -> None:
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, batch_size=batch_size, sync_dist=False)
        for name, short in PROGRESS_BAR.items():
            self.log(short, metrics[name], prog_bar=True, logger=False, batch_size=batch_size)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss, sums, _ = self._step(batch, "train")
        self._train_sums = sums if self._train_sums is None else self._train_sums + sums
        # Metrics of this step over all ranks: one all-reduce of a small vector, no .item().
        metrics = finalize(all_reduce_sum(sums))
        self._log_metrics("train", metrics, batch_size=len(batch["labels"]))
        return loss

    @property
    def train_padding_share(self) -> float | None:
        """Share of padding in all training batches of this rank so far (None before any)."""
        if self._train_sums is None:
            return None
        return float(finalize(self._train_sums)["padding"])

    def on_train_start(self) -> None:
        loop = self.trainer.fit_loop
        if loop.restarting and loop._combined_loader_states_to_load:
            # configure_optimizers asked for estimated_stepping_batches (the LR schedule's
            # length), which built and prefetched the train loader before the checkpoint was
            # restored. Rebuild it, so that its restored position (mid-epoch) applies.
            loop._combined_loader = None
            loop.setup_data()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        release_freed_host_memory()

    # ---------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_sums = None
        self._val_rewards, self._val_labels = [], []

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        _, sums, rewards = self._step(batch, "validation")
        self._val_sums = sums if self._val_sums is None else self._val_sums + sums
        self._val_rewards.append(rewards.float())
        self._val_labels.append(batch["labels"])

    def on_validation_epoch_end(self) -> None:
        if self._val_sums is None:
            return
        metrics = finalize(all_reduce_sum(self._val_sums))
        rewards = gather_cat(torch.cat(self._val_rewards))
        labels = gather_cat(torch.cat(self._val_labels).to(torch.uint8)).bool()
        metrics["rewards/auroc"] = reward_auroc(rewards, labels).to(self.device)
        for name, value in metrics.items():
            self.log(f"val/{name}", value, sync_dist=False)
        self.log("val_auroc", metrics["rewards/auroc"], prog_bar=True, logger=False)

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
        total_steps = int(total_steps)
        scheduler = self.scheduler_factory(optimizer=optimizer, total_steps=total_steps)
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
        # The resolved run config (plain types only: loadable with weights_only=True), so that a
        # checkpoint alone says how to rebuild its model and tokenizer.
        if self.run_config is not None:
            checkpoint["kto_lightning_config"] = self.run_config
        # Trainable weights only: never the reference (it never changes and is rebuilt from the
        # model config), nor frozen base weights under LoRA (rebuilt the same way).
        trainable = {f"policy.{n}" for n, p in self.policy.named_parameters() if p.requires_grad}
        state = checkpoint["state_dict"]
        for key in [k for k in state if k not in trainable]:
            del state[key]
        # RNG states, so a resumed run draws what the uninterrupted one would have.
        checkpoint["rng_states"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Put the frozen weights back from the live module, so that strict loading still checks
        # that every trainable key is there.
        state = checkpoint.get("state_dict")  # absent where a sharded strategy loaded it already
        if state is not None:
            for key, value in self.state_dict().items():
                state.setdefault(key, value)
        rng = checkpoint.get("rng_states")
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate(_as_tuple(rng["python"]))
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


def _as_tuple(value: Any) -> Any:
    """random.setstate needs the nested tuples back (a checkpoint may hold lists)."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value
