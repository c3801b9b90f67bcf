"""OnlineKTOModule: KTO on completions the policy samples during the run (the `step` loop).

Each training batch is prompts. The step draws k completions of each from the policy as it is at
that step, scores them with the reward function, labels them, and trains on them with the same
KTO step as offline rows (`KTOModule`):

    prompts -> sampler (eval mode, each prompt seeded by the run's seed, the epoch and its row)
            -> reward function (one float per completion, checked: online/rewards.score)
            -> labelling (threshold or group) -> class weights from the drawn counts (eq. 8)
            -> KL rows: each completion beside another prompt's, paired over all ranks' draws
               (data/pairing.py)
            -> the KTO step, backward, optimizer

A prompt's completions depend only on the run's seed, the epoch and the prompt's row, and the KL
pairs on the whole batch of all ranks: a run resumed from a checkpoint draws exactly what the
interrupted run drew at the same batch, and 2 ranks of b prompts each draw and train on what one
process of 2b prompts does (each rank's loss is normalised by the counts of all ranks).
Validation draws for its held-out prompts a greedy completion and k sampled ones, and reports
their mean rewards beside the KTO metrics of the sampled ones.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from transformers import PreTrainedTokenizerBase

from kto_lightning.common.distributed import all_reduce_sum, world_size
from kto_lightning.core.losses import KTOLossConfig
from kto_lightning.data.collate import KTOCollator
from kto_lightning.data.tokenize import render_prompt
from kto_lightning.errors import ConfigError
from kto_lightning.models.reference import CachedReference, ReferenceProvider
from kto_lightning.online.labelling import Labelling
from kto_lightning.online.reward_model import RewardModel
from kto_lightning.online.rewards import RewardFunction, score
from kto_lightning.online.sampler import Sampler
from kto_lightning.training.module import KTOModule
from kto_lightning.training.online_draws import (
    Draw,
    Prompted,
    deal_training_rows,
    draw_seed,
    training_examples,
)

log = logging.getLogger("kto_lightning")

# What an online run logs besides the KTO metrics: train/online/<name> at the logged steps (the
# last draw's), and the held-out rewards of each validation.
TRAIN_METRICS = (
    "reward_mean", "reward_std", "desirable_share", "kept_share", "completion_tokens",
    "stopped_share", "sample_seconds", "skipped_draws", "step_seconds", "sample_share",
)  # fmt: skip
VAL_METRICS = ("val/online/reward_greedy", "val/online/reward_sampled")

# Sums a validation epoch keeps per rank: greedy reward, greedy count, sampled reward, count.
_VAL_FIELDS = 4


# Online rows are sampled during training; a cache holds log-probs of rows known before it.
CACHE_REFUSED = (
    "reference=cache holds log-probs of rows known before training; online KTO samples its rows "
    "during training: use reference=copy, or adapter with LoRA"
)


class OnlineKTOModule(KTOModule):
    """Train `policy` with KTO on completions it samples, labelled by a reward function.

    Args:
        policy: the causal LM being trained.
        reference: a frozen copy of the initial policy, or the policy with its adapters
            disabled (a cache cannot hold log-probs of completions not yet sampled).
        loss_config: the loss as YAML gives it; an "auto" class weight is resolved at each step
            from the completions that step keeps, counted over all ranks (paper eq. 8).
        optimizer: a partial optimizer, called with the parameter groups.
        tokenizer: decodes completions for the reward function; renders conversation prompts.
        sampler: draws the training completions (and validation's sampled ones).
        greedy_sampler: draws validation's greedy completion; None: no greedy reward.
        reward: the reward function (online/rewards.py).
        labelling: how rewards become labels.
        max_length: `data.lengths.max_length`: a prompt and its completion together.
        seed: the run's seed; with the epoch and a prompt's row, it seeds the prompt's draw.
        scheduler: a partial schedule; None for none.
        logprob_chunk_size: rows of the LM head computed at once when scoring completions.
    """

    summary_title = "online KTO training"

    def __init__(
        self,
        policy: nn.Module,
        reference: ReferenceProvider,
        loss_config: KTOLossConfig,
        optimizer: Callable[..., Optimizer],
        tokenizer: PreTrainedTokenizerBase,
        sampler: Sampler,
        reward: RewardFunction,
        labelling: Labelling,
        max_length: int,
        seed: int,
        greedy_sampler: Sampler | None = None,
        scheduler: Callable[..., Any] | None = None,
        logprob_chunk_size: int = 256,
    ) -> None:
        if isinstance(reference, CachedReference):
            raise ConfigError(CACHE_REFUSED)
        loss, _ = loss_config.with_class_counts(1, 1)  # each step resolves its own weights
        super().__init__(policy, reference, loss, optimizer, scheduler, logprob_chunk_size)
        self.loss_config = loss_config
        self.tokenizer = tokenizer
        self.sampler = sampler
        self.greedy_sampler = greedy_sampler
        self.reward = reward
        self.labelling = labelling
        self.max_length = max_length
        self.seed = seed
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.collator = KTOCollator(pad, loss.needs_kl_rows, max_length=max_length)
        self.last_draw: list[dict[str, Any]] = []  # the last training draw, row by row
        self._online: dict[str, float] = {}  # the last training draw's figures
        self._skipped = 0  # training draws with nothing to train on, this run
        self._trained_since_step = False  # a batch trained since the last optimizer step
        # lambda_D * n_D, n_D, lambda_U * n_U, n_U over the rows trained, all ranks: the class
        # weights the run trained with, for the health report (they change draw to draw).
        self._class_sums = [0.0, 0.0, 0.0, 0.0]
        # The step sums and values of the last step that trained, kept when a later one skips.
        self._last_trained: tuple[Tensor, dict[str, float] | None] | None = None
        self._batch_start = 0.0
        self._val_online: Tensor | None = None
        # Validation's sampled completions get the KTO metrics too (a reference scores them).
        self.validates_kto = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["online_class_sums"] = list(self._class_sums)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._class_sums = list(checkpoint.get("online_class_sums", self._class_sums))

    def count_trained(self, n_desirable: int, n_undesirable: int) -> None:
        """Count a step's rows (all ranks) under the loss's class weights of that step."""
        loss, sums = self.loss, self._class_sums
        sums[0] += loss.desirable_weight * n_desirable
        sums[1] += n_desirable
        sums[2] += loss.undesirable_weight * n_undesirable
        sums[3] += n_undesirable

    def last_trained_metrics(self) -> dict[str, float]:
        """The last step's metrics, or when it was skipped the last step's that trained."""
        if self._step_sums is None and self._last_trained is not None:
            self._step_sums, self._step_values = self._last_trained
        return self.step_metrics()

    def trained_class_weights(self) -> tuple[float, float]:
        """The class weights averaged over the rows trained with them: lambda_D * n_D summed
        over the run equals the mean lambda_D times the run's n_D, as eq. 8 reads it."""
        weighted_d, n_d, weighted_u, n_u = self._class_sums
        if not n_d or not n_u:
            return super().trained_class_weights()
        return weighted_d / n_d, weighted_u / n_u

    def on_fit_start(self) -> None:
        # A reward model scores on the policy's device, once the strategy has placed it.
        if isinstance(self.reward, RewardModel) and self.reward.device is None:
            self.reward.device = self.device

    # ---------------------------------------------------------------- batches
    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        # Prompt rows stay on the host: the sampler moves their ids, the step its own batch.
        return batch

    def _shown(self, prompt: str | list[dict[str, str]]) -> str:
        return prompt if isinstance(prompt, str) else render_prompt(self.tokenizer, prompt)

    def draw(
        self,
        rows: Sequence[Prompted],
        sampler: Sampler,
        key: str,
        pairs_seed: int | None = None,
        across_ranks: bool = False,
    ) -> Draw:
        """Sample, score and label completions of `rows`, each prompt seeded by `key` and its
        row (`draw_seed`); with `pairs_seed`, build the KTO batch of the kept ones, their KL
        partners drawn with that seed among all ranks' completions when `across_ranks` (every
        rank must then draw at the same time), else among this rank's.

        The reward function reads a text prompt as it is, a conversation rendered by the chat
        template with the generation prompt, each rendered once for its k completions.
        """
        seeds = [draw_seed(self.seed, key, r.index) for r in rows]
        samples = sampler.sample(self.policy, [list(r.prompt_ids) for r in rows], seeds)
        texts = samples.texts(self.tokenizer)
        shown = [self._shown(r.prompt) for r in rows]
        index = samples.prompt_index.tolist()
        owners = [rows[i] for i in index]
        prompts = [shown[i] for i in index]
        rewards = score(self.reward, prompts, texts, [dict(r.fields) for r in owners])
        labels = self.labelling(rewards, sampler.k)
        batch = None
        if pairs_seed is not None:
            examples = training_examples(
                owners, samples.completion_ids, labels.desirable.tolist(), self.max_length
            )
            keys = [(r.index, j % sampler.k) for j, r in enumerate(owners)]
            trained = deal_training_rows(
                examples, keys, labels.keep.tolist(), pairs_seed, self.max_length,
                self.loss.needs_kl_rows, across_ranks,
            )  # fmt: skip
            batch = self.collator(trained) if trained else None
        return Draw(samples, prompts, texts, rewards, labels, batch)

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: tensor.to(self.device) for name, tensor in batch.items()}

    def _batch_number(self) -> int:
        """The training batch's number in the run (0-based), restored with a checkpoint: the
        same on every rank, and the same for one process as for several."""
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.total.ready) - 1

    # ---------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._batch_start = time.perf_counter()

    # A batch of prompt rows, not of tensors.
    def training_step(  # type: ignore[override]
        self, batch: Sequence[Prompted], batch_idx: int
    ) -> Tensor:
        key = f"train/{self.current_epoch}"
        pairs_seed = draw_seed(self.seed, f"{key}/pairs", self._batch_number())
        drawn = self.draw(batch, self.sampler, key, pairs_seed, across_ranks=True)
        self._remember(drawn)
        counts = torch.tensor(
            [drawn.labels.n_desirable, drawn.labels.n_undesirable, drawn.batch is not None],
            device=self.device,
        )
        n_desirable, n_undesirable, ranks_with_rows = all_reduce_sum(counts).tolist()
        if ranks_with_rows < world_size():
            # A rank with nothing to train on cannot join the step's collectives: every rank
            # skips this batch (counted in train/online/skipped_draws).
            return self._skip()
        self.loss, notes = self.loss_config.with_class_counts(int(n_desirable), int(n_undesirable))
        for note in notes:
            log.debug("%s", note)  # a draw's ratio outside [1, 4/3] is expected, step to step
        assert drawn.batch is not None
        self.count_trained(int(n_desirable), int(n_undesirable))
        self._trained_since_step = True
        return self._train_on(self._to_device(drawn.batch))

    def _skip(self) -> Tensor:
        """A batch with nothing to train on, on every rank: counted, and no step's metrics (the
        logs show no previous step's as this one's).

        Lightning refuses a step that returns None under DDP. A zero loss over every trainable
        weight runs the backward (and its gradient reduction) with no gradient, and
        `optimizer_step` drops the update when no batch of its window trained: the same as one
        process skipping the batch.
        """
        self._skipped += 1
        self._online["skipped_draws"] = float(self._skipped)
        if self._step_sums is not None:
            self._last_trained = (self._step_sums, self._step_values)
        self._step_sums, self._step_values = None, None
        zero = torch.zeros((), device=self.device)
        return sum((p.sum() * 0.0 for p in self.policy.parameters() if p.requires_grad), zero)

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        def closure() -> Any:
            result = optimizer_closure() if optimizer_closure is not None else None
            if not self._trained_since_step:  # every batch of the window was skipped
                for group in optimizer.param_groups:
                    for parameter in group["params"]:
                        parameter.grad = None  # an optimizer passes over a weight without one
            return result

        optimizer.step(closure=closure)
        self._trained_since_step = False

    def _remember(self, drawn: Draw) -> None:
        """Keep the draw's figures for the step's metrics and its rows for the samples table."""
        samples, labels, rewards = drawn.samples, drawn.labels, drawn.rewards
        n = max(len(samples), 1)
        lengths = [len(c) for c in samples.completion_ids]
        self._online = {
            "reward_mean": float(rewards.mean()) if len(rewards) else math.nan,
            "reward_std": float(rewards.std(unbiased=False)) if len(rewards) else math.nan,
            "desirable_share": labels.n_desirable / max(labels.n_kept, 1),
            "kept_share": labels.n_kept / n,
            "completion_tokens": sum(lengths) / n,
            "stopped_share": float(samples.stopped.float().mean()) if len(samples) else math.nan,
            "sample_seconds": samples.seconds,
            "skipped_draws": float(self._skipped),
        }
        self.last_draw = [
            {
                "prompt": prompt,
                "completion": text,
                "reward": float(reward),
                "label": bool(desirable),
                "kept": bool(kept),
            }
            for prompt, text, reward, desirable, kept in zip(
                drawn.prompts,
                drawn.texts,
                rewards.tolist(),
                labels.desirable.tolist(),
                labels.keep.tolist(),
                strict=True,
            )
        ]

    def on_train_end(self) -> None:
        draws = self._batch_number() + 1
        if self._skipped and self.trainer.is_global_zero:
            log.warning(
                "%d of %d training draws kept nothing to train on and were skipped (every "
                "completion of a prompt scored alike, or ties dropped): try more samples "
                "(online.sampling.k), a higher online.sampling.temperature, "
                "online.labelling.rule=threshold, or a start model that gets some answers right",
                self._skipped, draws,
            )  # fmt: skip

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        seconds = time.perf_counter() - self._batch_start
        self._online["step_seconds"] = seconds
        self._online["sample_share"] = self._online.get("sample_seconds", 0.0) / max(seconds, 1e-9)
        super().on_train_batch_end(outputs, batch, batch_idx)

    def step_metrics(self) -> dict[str, float]:
        values = super().step_metrics()
        values.update({f"train/online/{name}": value for name, value in self._online.items()})
        return values

    # ---------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._val_online = torch.zeros(_VAL_FIELDS, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: Sequence[Prompted], batch_idx: int) -> None:  # type: ignore[override]
        sums = torch.zeros(_VAL_FIELDS, dtype=torch.float64)
        if self.greedy_sampler is not None:
            # Greedy: the seed plays no part, and only the rewards are read.
            greedy = self.draw(batch, self.greedy_sampler, "validation")
            sums[0], sums[1] = greedy.rewards.double().sum(), len(greedy.rewards)
        # Validation batches differ in number across ranks: KL pairs within this rank's draw.
        pairs_seed = draw_seed(self.seed, "validation/pairs", batch_idx)
        drawn = self.draw(
            batch, self.sampler, "validation", pairs_seed if self.validates_kto else None
        )
        sums[2], sums[3] = drawn.rewards.double().sum(), len(drawn.rewards)
        assert self._val_online is not None
        self._val_online += sums.to(self.device)
        if drawn.batch is not None:
            super().validation_step(self._to_device(drawn.batch), batch_idx)

    def on_validation_epoch_end(self) -> None:
        if self._val_online is not None:
            greedy, n_greedy, sampled, n_sampled = all_reduce_sum(self._val_online).tolist()
            if n_greedy:
                self.log(VAL_METRICS[0], greedy / n_greedy, sync_dist=False)
            if n_sampled:
                self.log(VAL_METRICS[1], sampled / n_sampled, sync_dist=False)
        # The KTO metrics of the sampled completions are reduced over ranks: only when every
        # rank's draws kept some (a rank without would not join the reduction).
        held = torch.tensor([int(self._val_metric_sums is not None)], device=self.device)
        if int(all_reduce_sum(held).item()) < world_size():
            self._val_metric_sums = None
        super().on_validation_epoch_end()
