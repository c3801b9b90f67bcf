"""Callbacks: a table of generations for fixed validation prompts, each validation epoch, and
an online run's table of sampled completions every N steps."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from transformers import StoppingCriteria, StoppingCriteriaList

from kto_lightning.common.compile_stance import eager
from kto_lightning.core.logprobs import CausalLM
from kto_lightning.data.collate import left_padded
from kto_lightning.errors import ConfigError
from kto_lightning.runs.interrupts import stop_requested

log = logging.getLogger(__name__)


class _UntilStopRequested(StoppingCriteria):
    """Ends a generation when SIGTERM or Ctrl-C asked the run to stop: the run then saves the
    state validation started from and exits, without waiting for the rest of the table."""

    def __init__(self, trainer: L.Trainer) -> None:
        self.trainer = trainer

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        stop = GenerationsTable._cut_short(self.trainer)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class GenerationsTable(L.Callback):
    """Greedy completions of the first `num_prompts` validation prompts, every validation epoch.

    Each table goes to W&B (as `val/generations`), to TensorBoard (as text), and to disk as
    `<run dir>/generations/step_<step>.jsonl`, so every logger setup keeps them.

    Args:
        num_prompts: how many validation prompts (the first ones, the same every epoch).
        max_new_tokens: the length limit of each generation.
    """

    def __init__(self, num_prompts: int = 4, max_new_tokens: int = 64) -> None:
        self.num_prompts = num_prompts
        self.max_new_tokens = max_new_tokens

    @torch.no_grad()
    def generate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict] | None:
        """The table's rows; None when a stop was asked for meanwhile (the table is not kept)."""
        datamodule = trainer.datamodule  # type: ignore[attr-defined]  # set by Lightning at fit
        tokenizer, dataset = datamodule.tokenizer, datamodule.val_set
        prompts = [dataset[i].prompt_ids for i in range(min(self.num_prompts, len(dataset)))]
        if not prompts or self._cut_short(trainer):
            return None
        policy: CausalLM = pl_module.policy
        was_training = policy.training
        policy.eval()
        # Eager under compile.enabled: generating with a KV cache would compile every layer anew
        # and fill the layers' shared compile cache (see kto_lightning.common.compile_stance.eager).
        try:
            with eager():
                completions = self._completions(trainer, pl_module, prompts)
        finally:
            policy.train(was_training)
        if self._cut_short(trainer):
            return None
        return [
            {
                "step": trainer.global_step,
                "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                "generation": completion,
            }
            for prompt, completion in zip(prompts, completions, strict=True)
        ]

    @staticmethod
    def _cut_short(trainer: L.Trainer) -> bool:
        # One process only: the ranks of a sharded model generate together, and one stopping
        # alone would leave the others waiting.
        return trainer.world_size == 1 and stop_requested(trainer)

    def _completions(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prompts: list[list[int]]
    ) -> list[str]:
        """The greedy completions of `prompts`, generated as one batch (left-padded): one decoding
        loop for the table, not one per prompt."""
        tokenizer = trainer.datamodule.tokenizer  # type: ignore[attr-defined]
        input_ids, attention_mask = left_padded(prompts, tokenizer.pad_token_id)
        policy: CausalLM = pl_module.policy
        output = policy.generate(
            input_ids=input_ids.to(pl_module.device),
            attention_mask=attention_mask.to(pl_module.device),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList([_UntilStopRequested(trainer)]),
        )
        # A row that ended early is padded after its EOS (the pad token may be EOS itself).
        stop, new_tokens = tokenizer.eos_token_id, output[:, input_ids.shape[1] :].tolist()
        rows = [row[: row.index(stop)] if stop in row else row for row in new_tokens]
        return [tokenizer.decode(row, skip_special_tokens=True) for row in rows]

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.num_prompts < 1:
            return
        # Every rank generates (a sharded model needs all ranks); rank 0 records.
        rows = self.generate(trainer, pl_module)
        if rows is None or not trainer.is_global_zero:
            return
        folder = Path(trainer.default_root_dir) / "generations"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{trainer.global_step}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        columns = ["step", "prompt", "generation"]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                data = [[r[c] for c in columns] for r in rows]
                logger.log_table(key="val/generations", columns=columns, data=data)
            elif isinstance(logger, TensorBoardLogger):
                text = "\n".join(f"| {r['prompt']} | {r['generation']} |" for r in rows)
                logger.experiment.add_text(
                    "val/generations", "| prompt | generation |\n|---|---|\n" + text,
                    trainer.global_step,
                )  # fmt: skip


class OnlineSamples(L.Callback):
    """Every `every_n_steps` optimizer steps of an online run, the step's draw as a table: each
    sampled completion with its prompt, reward, label and whether it trained. Written on rank 0
    (its own draw) to `<run dir>/samples/step_<N>.jsonl`, and as a W&B table when W&B logs.

    Args:
        every_n_steps: optimizer steps between tables; 0 writes none.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        if type(every_n_steps) is not int or every_n_steps < 0:
            raise ConfigError(
                f"callbacks.online_samples.every_n_steps must be an integer >= 0, got "
                f"{every_n_steps!r}"
            )
        self.every_n_steps = every_n_steps
        self._written = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step, every = trainer.global_step, self.every_n_steps
        draw = getattr(pl_module, "last_draw", None)
        if not every or step % every or step == self._written or not draw:
            return
        self._written = step
        if not trainer.is_global_zero:
            return
        rows = [{"step": step, **row} for row in draw]
        folder = Path(trainer.default_root_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{step}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        columns = ["step", "prompt", "completion", "reward", "label", "kept"]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                data = [[r[c] for c in columns] for r in rows]
                logger.log_table(key="train/online/samples", columns=columns, data=data)
