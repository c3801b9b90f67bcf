"""Callbacks around the fit, one job each; `run_build.build` gives them to every run.

- `ReleaseHostMemory`: hand memory freed by a step back to the OS.
- `ValidateAtLastStep`: a run that `trainer.max_steps` ends mid-epoch still validates at the end.
- `RunSummary`: the closing summary, each validation metric before -> after training, and what
  the end of the run did, timed.
- `TrainingCurves`: the training-curves PNG of the run.
- `HuggingFaceExport`: the policy as a Hugging Face folder, `<run dir>/hf_model`, with its card,
  pushed to the hub when `export.push_to_hub` names a repo.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.trainer.states import TrainerFn
from transformers import PreTrainedTokenizerBase

from kto_lightning.cli.hf_export import export_policy, merges
from kto_lightning.cli.hub_push import HubTarget, check_run_push, push_folder
from kto_lightning.errors import KTOError
from kto_lightning.models import EXPORT_DIR
from kto_lightning.reporting.model_card import write_model_card
from kto_lightning.reporting.plots import plot_run
from kto_lightning.runs.run_records import metrics_path, validation_metrics
from kto_lightning.training.strategies import FSDP2Strategy

log = logging.getLogger("kto_lightning")


def _malloc_trim() -> Callable[[int], object] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


class ReleaseHostMemory(L.Callback):
    """Hand memory freed during the step back to the OS (glibc keeps it mapped otherwise).

    A step frees hundreds of MB of temporaries; glibc keeps much of it in its heaps, and the next
    step's allocations land beside it rather than in it, which raises the peak RSS of a CPU run
    (benchmarks/RESULTS.md, "What changed since the first recorded run"). On a GPU, where a
    step's tensors are not in host memory, it is not done.
    """

    def __init__(self) -> None:
        self._trim = _malloc_trim()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.strategy.root_device.type != "cpu":
            self._trim = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self._trim is not None:
            self._trim(0)


def _checkpoint_lines(trainer: L.Trainer) -> list[str]:
    """The summary's line on the best checkpoint, with its score."""
    lines = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        monitor, best, score = callback.monitor, callback.best_model_path, callback.best_model_score
        if monitor and monitor != "step" and best and score is not None:
            lines.append(f"  best checkpoint: {best} ({monitor} {float(score):.4f})")
    return lines


def _end_of_run_lines(trainer: L.Trainer) -> list[str]:
    """A line for each thing done at the end of the run, with its seconds: the callbacks that do
    one (the last checkpoint, the curves, the export) keep `end_of_run = (line, seconds)`."""
    done = [getattr(c, "end_of_run", None) for c in trainer.callbacks]  # type: ignore[attr-defined]
    return [f"  {line} ({seconds:.1f} s)" for line, seconds in filter(None, done)]


class ValidateAtLastStep(L.Callback):
    """Validate once more when `trainer.max_steps` ends the run in the middle of an epoch.

    Lightning validates at the end of an epoch (and every `val_check_interval`); a run that
    max_steps stops mid-epoch would end with no validation metric, so with no closing summary
    and no objective. Asking the trainer to stop at its last step makes Lightning's own loop
    validate before it leaves, as it does for early stopping; at an epoch's end it validates once,
    as it would anyway.
    """

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of `trainer.callback_metrics`, as floats."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, torch.Tensor | float | int)}


# (label, metric, format) of each summary row; a row whose metric the run does not log (the
# rewards of an SFT run, the perplexity of a KTO run) is left out.
SUMMARY_ROWS = (
    ("validation reward AUROC", "val/rewards/auroc", "{:.3f}"),
    ("validation reward accuracy", "val/rewards/accuracy", "{:.3f}"),
    ("validation reward margin", "val/rewards/margins", "{:+.3f}"),
    ("validation KL reference point", "val/kl", "{:.4f}"),
    ("validation loss", "val/loss", "{:.4f}"),
    ("validation perplexity", "val/perplexity", "{:.3f}"),
    ("validation greedy reward", "val/online/reward_greedy", "{:.3f}"),  # online runs'
    ("validation sampled reward", "val/online/reward_sampled", "{:.3f}"),
)


class RunSummary(L.Callback):
    """The closing summary: each validation metric before and after training, on rank 0, what
    the end of the run did (last checkpoint, curves, export) with its seconds, and the seconds
    from the last optimizer step to the summary. Listed after the callbacks it reports on.

    "Before" is the validation run by `trainer.validate` ahead of `fit`, if there was one.
    """

    def __init__(self) -> None:
        self.before: dict[str, float] = {}
        self._start = 0.0
        self._last_step_end = 0.0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._last_step_end = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self.before = scalar_metrics(trainer.callback_metrics)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            now = time.perf_counter()
            after = scalar_metrics(trainer.callback_metrics)
            padding = getattr(pl_module, "train_padding_share", None)
            title = getattr(pl_module, "summary_title", "training")
            tail = now - self._last_step_end if self._last_step_end else None
            log.info("%s", self.format(after, now - self._start, trainer, padding, title, tail))

    def format(
        self,
        after: dict[str, float],
        seconds: float,
        trainer: L.Trainer,
        padding: float | None,
        title: str = "KTO training",
        tail: float | None = None,
    ) -> str:
        lines = [
            f"{title} finished in {seconds:.1f} s: {trainer.global_step} optimizer steps, "
            f"{trainer.current_epoch} epoch(s)"
        ]
        width = max(len(label) for label, _, _ in SUMMARY_ROWS)
        for label, key, fmt in SUMMARY_ROWS:
            if key not in after:
                continue
            start = fmt.format(self.before[key]) if key in self.before else "n/a"
            lines.append(f"  {label:<{width}}  {start} -> {fmt.format(after[key])}")
        if padding is not None:
            lines.append(f"  padding in training batches: {100 * padding:.1f}% of token slots")
        lines.extend(_checkpoint_lines(trainer))
        lines.extend(_end_of_run_lines(trainer))
        if tail is not None:
            lines.append(
                f"  after the last step: {tail:.1f} s (its validation and all of the above)"
            )
        lines.append(f"  run directory: {trainer.default_root_dir}")
        return "\n".join(lines)


class TrainingCurves(L.Callback):
    """`<run dir>/training_curves.png` at the end of the fit, when the run logged CSV metrics."""

    def __init__(self) -> None:
        self.end_of_run: tuple[str, float] | None = None  # for the summary

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = trainer.default_root_dir
        if not trainer.is_global_zero or not metrics_path(run_dir).is_file():
            return
        start = time.perf_counter()
        try:
            path = plot_run(run_dir)
        except KTOError as error:  # e.g. no training step logged: nothing to draw
            log.warning("no training curves: %s", error)
            return
        self.end_of_run = (f"training curves: {path}", time.perf_counter() - start)


class HuggingFaceExport(L.Callback):
    """The trained policy as a Hugging Face folder, `<run dir>/hf_model`, at the end of the fit,
    with its model card (README.md, kto_lightning.reporting.model_card), then uploaded to the
    hub when the run config's `export.push_to_hub` names a repo (cli/hub_push.py).

    Args:
        tokenizer: saved beside the weights.
        merge_lora: merge LoRA adapters into plain weights (true) or keep the adapter alone.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, merge_lora: bool = True) -> None:
        self.tokenizer = tokenizer
        self.merge_lora = merge_lora
        self.push: HubTarget | None = None
        self.end_of_run: tuple[str, float] | None = None  # for the summary

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Read from the run config, as the card is; checked (a repo id, a token, not offline)
        # before the first validation or step, not after hours of training.
        run_config = getattr(pl_module, "run_config", None) or {}
        self.push = check_run_push(run_config.get("export") or {})

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if isinstance(trainer.strategy, FSDP2Strategy | DeepSpeedStrategy):
            log.warning(
                "  Hugging Face export%s skipped: under %s the policy's weights are sharded across "
                "ranks; save full checkpoints (strategy.save_distributed_checkpoint=false) and run "
                "python -m kto_lightning.export ckpt_path=CKPT out=OUT%s",
                " (and its push to the hub)" if self.push else "",
                type(trainer.strategy).__name__,
                " " + " ".join(self.push.arguments()) if self.push else "",
            )
            return
        run_dir = Path(trainer.default_root_dir)
        start = time.perf_counter()
        self.merge_lora = merges(pl_module.policy, self.merge_lora)
        exported = export_policy(
            pl_module.policy, self.tokenizer, run_dir / EXPORT_DIR, merge_lora=self.merge_lora
        )
        # The card from what a checkpoint of this step gives kto_lightning.export: the run config
        # and the last validation (here still in memory; objective.json is written later).
        write_model_card(
            exported,
            getattr(pl_module, "run_config", None),
            run_dir,
            trainer.global_step,
            validation_metrics(scalar_metrics(trainer.callback_metrics)),
            merge_lora=self.merge_lora,
        )
        line = f"Hugging Face model: {exported}"
        if self.push is not None:
            line += self._pushed(exported, run_dir)
        self.end_of_run = (line, time.perf_counter() - start)

    def _pushed(self, folder: Path, run_dir: Path) -> str:
        """Push `folder`; the summary's words on it. A failed upload loses nothing: the run
        ends as it would have, its folder kept, and the error says how to push it later."""
        assert self.push is not None
        try:
            url = push_folder(folder, self.push)
        except KTOError as error:
            again = ["python", "-m", "kto_lightning.export", f"ckpt_path={run_dir}"]
            again += [f"out={folder}", "overwrite=true", *self.push.arguments()]
            if not self.merge_lora:
                again.append("keep_adapter=true")
            log.error(
                "%s; the run and %s are kept: push them later with\n  %s",
                error,
                folder,
                shlex.join(again),
            )
            return ", not pushed to the hub (the error above says why)"
        return f", pushed to {url}"
