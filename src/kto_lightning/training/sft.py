"""The SFT stage: the policy learns the desirable completions by likelihood (`loss=sft`).

KTO usually starts from a policy fine-tuned on the desirable completions; this trains it in the
same framework, on the same data, strategies, loggers, checkpoints and export as a KTO run:

    python -m kto_lightning.train loss=sft                        # the toy task's desirable rows
    python -m kto_lightning.train model=from_run model.run_dir=RUN_DIR   # then KTO from it

The loss is the mean negative log-likelihood of the completion tokens given the prompt (prompt
tokens masked), over every completion token of every rank. No reference model is built and no KL
rows are made; the data module drops the undesirable rows (and says how many in its summary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from kto_lightning.common.distributed import all_reduce_sum, world_size
from kto_lightning.core.step import LOCAL, Reduction
from kto_lightning.training.module import PolicyModule

# Order of the entries in an SFT sums vector.
FIELDS = ("nll_sum", "tokens", "rows", "real_tokens", "slot_tokens")
_INDEX = {name: i for i, name in enumerate(FIELDS)}


@dataclass(frozen=True)
class SFTLoss:
    """The `loss=sft` config: the mean token NLL of the desirable completions.

    No hyperparameters: the learning rate and the schedule are the optimizer's and scheduler's.
    """

    @property
    def needs_kl_rows(self) -> bool:
        """Whether batches carry KL rows, as `KTOLossConfig.needs_kl_rows` says: never."""
        return False


@dataclass(frozen=True)
class SFTStepResult:
    """What `sft_step` computes.

    Attributes:
        loss: () the mean token NLL to backpropagate, over every completion token of every rank
            once the strategy has averaged gradients over ranks.
        metric_sums: this rank's sums, ordered as `FIELDS`.
    """

    loss: Tensor
    metric_sums: Tensor


def completion_tokens(completion_mask: Tensor) -> Tensor:
    """(B, L) -> (B,) the tokens each row's log-prob sums over: completion tokens after the
    first position, which nothing predicts (kto_lightning.core.logprobs.sequence_logprobs)."""
    return completion_mask[:, 1:].sum(-1)


def sft_step(
    policy_logps: Tensor,
    tokens: Tensor,
    reduction: Reduction = LOCAL,
    real_tokens: Tensor | float = 0.0,
    slot_tokens: Tensor | float = 0.0,
) -> SFTStepResult:
    """The mean token NLL of one step, normalised by the completion tokens of all ranks.

    policy_logps (B,) summed completion log-probs (with grad); tokens (B,) the completion tokens
    each sums over. A mean over tokens, not over rows: a long completion weighs by its length, as
    in causal-LM pretraining. `real_tokens` and `slot_tokens` count the batch's non-pad tokens
    and all its token slots, for the padding metric.
    """
    local_tokens = tokens.sum().float()
    # Every rank divides by the same global count (one all-reduce of a scalar), and gradient
    # averaging's division by the world size is multiplied back: the exact mean over all tokens.
    global_tokens = reduction.sum(local_tokens.detach().clone()).clamp(min=1.0)
    nll_sum = -policy_logps.float().sum()
    loss = nll_sum * reduction.world_size / global_tokens

    # new_full fills on the device; new_tensor would copy from the host and wait for it.
    def as_tensor(value: float) -> Tensor:
        return local_tokens.new_full((), value)

    sums = torch.stack(
        [
            nll_sum.detach(),
            local_tokens,
            as_tensor(float(len(policy_logps))),
            real_tokens.float() if torch.is_tensor(real_tokens) else as_tensor(real_tokens),
            slot_tokens.float() if torch.is_tensor(slot_tokens) else as_tensor(slot_tokens),
        ]
    )
    return SFTStepResult(loss=loss, metric_sums=sums)


def sft_metrics(sums: Tensor) -> dict[str, Tensor]:
    """Means from a (possibly reduced, possibly accumulated) SFT sums vector."""
    tokens = sums[_INDEX["tokens"]]
    nll = sums[_INDEX["nll_sum"]] / tokens.clamp(min=1.0)
    return {
        "loss": nll,  # the mean token NLL
        "perplexity": torch.exp(nll),
        "count/tokens": tokens,
        "count/rows": sums[_INDEX["rows"]],
        "padding": 1.0 - sums[_INDEX["real_tokens"]] / sums[_INDEX["slot_tokens"]].clamp(min=1.0),
    }


class SFTModule(PolicyModule):
    """Train `policy` on the mean token NLL of its batches' completions; no reference model.

    Args: those of `PolicyModule`.
    """

    summary_title = "SFT training"
    progress_bar: ClassVar[dict[str, str]] = {"loss": "loss", "perplexity": "ppl"}

    def metrics_of(self, sums: Tensor) -> dict[str, Tensor]:
        return sft_metrics(sums)

    def _step(self, batch: dict[str, Tensor]) -> SFTStepResult:
        """One step, shared by training and validation."""
        attention = batch["attention_mask"]
        return sft_step(
            self._logps(self.policy, batch),
            completion_tokens(batch["completion_mask"]),
            Reduction(all_reduce_sum, world_size()),
            real_tokens=attention.sum(),
            slot_tokens=float(attention.numel()),
        )

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        result = self._step(batch)
        self._record_train_step(result.metric_sums, batch_size=len(batch["input_ids"]))
        return result.loss

    def on_validation_epoch_start(self) -> None:
        self._val_metric_sums = None

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        sums, totals = self._step(batch).metric_sums, self._val_metric_sums
        self._val_metric_sums = sums if totals is None else totals + sums

    def on_validation_epoch_end(self) -> None:
        if self._val_metric_sums is None:
            return
        # The epoch's token-weighted mean: sums over all batches and ranks, divided once.
        metrics = sft_metrics(all_reduce_sum(self._val_metric_sums))
        for name, value in metrics.items():
            self.log(f"val/{name}", value, sync_dist=False)
        self.log("val_ppl", metrics["perplexity"], prog_bar=True, logger=False)
