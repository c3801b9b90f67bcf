"""OnlineKTOModule: KTO on completions the policy samples during the run (the `step` loop).

Each training batch is prompts. The step draws k completions of each from the policy as it is at
that step, scores them with the reward function, labels them, and trains on them with the same
KTO step as offline rows (`KTOModule`):

    prompts -> sampler (eval mode, seeded by the run's seed and the batch's number)
            -> reward function (one float per completion, checked: online/rewards.score)
            -> labelling (threshold or group) -> class weights from the drawn counts (eq. 8)
            -> KL rows: each completion beside another prompt's (data/pairing.py)
            -> the KTO step, backward, optimizer

A draw depends only on the run's seed, the batch's position in the run and the rank: a run
resumed from a checkpoint draws exactly what the interrupted run drew at the same batch.
Validation draws for its held-out prompts a greedy completion and k sampled ones, and reports
their mean rewards beside the KTO metrics of the sampled ones.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from transformers import PreTrainedTokenizerBase

from kto_lightning.common.distributed import all_reduce_sum, rank, world_size
from kto_lightning.core.losses import KTOLossConfig
from kto_lightning.data.collate import KTOCollator
from kto_lightning.data.pairing import assign_kl_partners
from kto_lightning.data.tokenize import Example, fit_beside, render_prompt
from kto_lightning.errors import ConfigError, DataError
from kto_lightning.models.reference import CachedReference, ReferenceProvider
from kto_lightning.online.labelling import Labelling, Labels
from kto_lightning.online.reward_model import RewardModel
from kto_lightning.online.rewards import RewardFunction, score
from kto_lightning.online.sampler import Sampler, Samples
from kto_lightning.training.module import KTOModule

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


class Prompted(Protocol):
    """What the module reads of a prompt row: its token ids (as training encodes the prompt),
    the prompt itself (text or a conversation) and its fields (what the reward function reads).
    """

    @property
    def prompt_ids(self) -> Sequence[int]: ...

    @property
    def prompt(self) -> str | list[dict[str, str]]: ...

    @property
    def fields(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Draw:
    """One draw of a batch: its completions, their rewards and labels, and its training rows.

    Args:
        samples: the sampler's completions, each prompt's k together.
        prompts: each completion's prompt as the reward function read it.
        texts: the completions as text.
        rewards: (N,) float32, one per completion.
        labels: which completions are desirable and which train.
        batch: the KTO batch of the kept completions (tensors on the CPU), None when it has
            no row to train on, or was not asked for.
    """

    samples: Samples
    prompts: list[str]
    texts: list[str]
    rewards: Tensor
    labels: Labels
    batch: dict[str, Tensor] | None


# Online rows are sampled during training; a cache holds log-probs of rows known before it.
CACHE_REFUSED = (
    "reference=cache holds log-probs of rows known before training; online KTO samples its rows "
    "during training: use reference=copy, or adapter with LoRA"
)


def draw_seed(seed: int, split: str, batch_number: int, rank_: int) -> int:
    """A draw's seed from the run's seed, the split, the batch's number in the run and the rank:
    the same four numbers, the same draw (a resumed run draws again what was drawn)."""
    digest = hashlib.sha256(f"{seed}/{split}/{batch_number}/{rank_}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


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
        seed: the run's seed; with the batch's number and the rank, it seeds each draw.
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
        self._batch_start = 0.0
        self._val_online: Tensor | None = None

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
        self, rows: Sequence[Prompted], sampler: Sampler, seed: int, with_batch: bool = True
    ) -> Draw:
        """Sample, score and label completions of `rows`; with `with_batch`, build the KTO batch
        of the kept ones.

        The reward function reads a text prompt as it is, a conversation rendered by the chat
        template with the generation prompt, each rendered once for its k completions.
        """
        samples = sampler.sample(self.policy, [list(r.prompt_ids) for r in rows], seed)
        texts = samples.texts(self.tokenizer)
        shown = [self._shown(r.prompt) for r in rows]
        index = samples.prompt_index.tolist()
        owners = [rows[i] for i in index]
        prompts = [shown[i] for i in index]
        rewards = score(self.reward, prompts, texts, [dict(r.fields) for r in owners])
        labels = self.labelling(rewards, sampler.k)
        batch = self._kto_batch(owners, samples, labels, seed) if with_batch else None
        return Draw(samples, prompts, texts, rewards, labels, batch)

    def _kto_batch(
        self, owners: Sequence[Prompted], samples: Samples, labels: Labels, seed: int
    ) -> dict[str, Tensor] | None:
        examples = [
            Example(list(r.prompt_ids), fit_beside(len(r.prompt_ids), c, self.max_length), bool(d))
            for r, c, d in zip(
                owners, samples.completion_ids, labels.desirable.tolist(), strict=True
            )
        ]
        if self.loss.needs_kl_rows:
            try:  # partners among all of the draw's completions, kept or not
                examples = assign_kl_partners(examples, self.max_length, seed)
            except DataError:  # fewer than 2 different completions: no unrelated one
                return None
        kept = [examples[i] for i in labels.kept_index.tolist()]
        return self.collator(kept) if kept else None

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: tensor.to(self.device) for name, tensor in batch.items()}

    def _batch_number(self) -> int:
        """The training batch's number in the run (0-based), restored with a checkpoint."""
        return int(self.trainer.fit_loop.epoch_loop.batch_progress.total.ready) - 1

    # ---------------------------------------------------------------- training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._batch_start = time.perf_counter()

    # A batch of prompt rows, not of tensors; None skips the batch (see below).
    def training_step(  # type: ignore[override]
        self, batch: Sequence[Prompted], batch_idx: int
    ) -> Tensor | None:
        seed = draw_seed(self.seed, "train", self._batch_number(), rank())
        drawn = self.draw(batch, self.sampler, seed)
        self._remember(drawn)
        counts = torch.tensor(
            [drawn.labels.n_desirable, drawn.labels.n_undesirable, drawn.batch is not None],
            device=self.device,
        )
        n_desirable, n_undesirable, ranks_with_rows = all_reduce_sum(counts).tolist()
        if ranks_with_rows < world_size():
            # A rank with nothing to train on cannot join the step's collectives: every rank
            # skips this batch (counted in train/online/skipped_draws).
            self._skipped += 1
            self._online["skipped_draws"] = float(self._skipped)
            # No step metrics: the logs and progress lines show no previous step's as this one's.
            self._step_sums, self._step_values = None, None
            return None
        self.loss, notes = self.loss_config.with_class_counts(int(n_desirable), int(n_undesirable))
        for note in notes:
            log.debug("%s", note)  # a draw's ratio outside [1, 4/3] is expected, step to step
        assert drawn.batch is not None
        return self._train_on(self._to_device(drawn.batch))

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
            greedy = self.draw(batch, self.greedy_sampler, 0, with_batch=False)
            sums[0], sums[1] = greedy.rewards.double().sum(), len(greedy.rewards)
        seed = draw_seed(self.seed, "validation", batch_idx, rank())
        drawn = self.draw(batch, self.sampler, seed)
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
        super().on_validation_epoch_end()
