"""What a run prints while it trains, readable on a terminal and in a file or a pipe alike.

- `console_callbacks`: Lightning's progress bar on a terminal; elsewhere (SLURM, nohup, a pipe)
  `PlainProgress`, plain log lines. The model summary is `PlainModelSummary`'s.
- `log_config`: the resolved config, secrets as ***, once at the start.
- `quiet_library_noise`: drop what libraries print that tells a user nothing.

Every line goes through the `kto_lightning` logger, so Hydra's log file holds it too.
"""

from __future__ import annotations

import datetime
import logging
import math
import re
import sys
import textwrap
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import lightning as L
import transformers
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_summary.model_summary import (
    get_formatted_model_size,
    get_human_readable_count,
)
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kto_lightning.common.security import redact_secrets
from kto_lightning.errors import ConfigError
from kto_lightning.runs.checkpointing import AfterOptimizerStep

log = logging.getLogger("kto_lightning")

# (label, metric, format) of the fields of a step line and of a validation line, in order; a
# field whose metric the run does not log (the KL of an SFT run) is left out.
STEP_FIELDS = (
    ("loss", "train/loss", "{:.4f}"),
    ("ppl", "train/perplexity", "{:.3f}"),  # SFT
    ("kl", "train/kl", "{:.4f}"),  # the KL reference point z_ref
    ("margin", "train/rewards/margins", "{:+.3f}"),
)
VALIDATION_FIELDS = (
    ("loss", "val/loss", "{:.4f}"),
    ("reward accuracy", "val/rewards/accuracy", "{:.3f}"),
    ("AUROC", "val/rewards/auroc", "{:.3f}"),
    ("margin", "val/rewards/margins", "{:+.3f}"),
    ("kl", "val/kl", "{:.4f}"),
    ("perplexity", "val/perplexity", "{:.3f}"),  # SFT
)


def _fields(metrics: Mapping[str, Any], fields: tuple[tuple[str, str, str], ...]) -> list[str]:
    """`label value` for each field logged in `metrics` (a tensor is read here: one sync)."""
    return [
        f"{label} {fmt.format(float(metrics[key]))}" for label, key, fmt in fields if key in metrics
    ]


def _rows(batch: Any) -> int:
    """Training rows in a batch of this rank (the KTO collator's dict; 0 for anything else)."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    return len(labels) if labels is not None else 0


def _step_metrics(trainer: L.Trainer, pl_module: L.LightningModule | None) -> Mapping[str, Any]:
    """The metrics of the step that just ended: the module's own (PolicyModule.step_metrics, read
    from the device once for that step), else what Lightning holds from the last logging step."""
    step_metrics = getattr(pl_module, "step_metrics", None)
    return step_metrics() if callable(step_metrics) else trainer.callback_metrics


class PlainProgress(AfterOptimizerStep):
    """A log line every `every_n_steps` optimizer steps, and one per validation, on rank 0.

    What Lightning's progress bar shows, for output that is not a terminal: there the bar, redrawn
    in place, shows nothing until the run ends.

    Args:
        every_n_steps: optimizer steps between lines (`progress.every_n_steps`); the last step of
            the run always has its line, and 0 prints that one alone.
    """

    def __init__(self, every_n_steps: int) -> None:
        if type(every_n_steps) is not int or every_n_steps < 0:  # bool is an int, but a typo
            raise ConfigError(
                f"progress.every_n_steps must be an integer >= 0, got {every_n_steps!r}"
            )
        super().__init__()
        self.every_n_steps = every_n_steps
        self._total: float = math.inf
        self._start = 0.0  # when this launch started training, and its first step
        self._first_step = 0
        self._window_start = 0.0  # since the last line: rows, and seconds spent validating
        self._window_rows = 0
        self._validating_since: float | None = None
        self._validating = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._total = trainer.estimated_stepping_batches
        self._start = self._window_start = time.perf_counter()
        self._first_step = trainer.global_step
        self._window_rows, self._validating = 0, 0.0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        self._window_rows += _rows(batch) * trainer.world_size
        step = trainer.global_step
        if not self.stepped(trainer):  # mid-accumulation
            return
        every = self.every_n_steps
        if not (step >= self._total or (every and step % every == 0)):
            return
        now = time.perf_counter()
        if trainer.is_global_zero:
            log.info("%s", self.step_line(trainer, now, _step_metrics(trainer, pl_module)))
        self._window_start, self._window_rows, self._validating = now, 0, 0.0

    def step_line(self, trainer: L.Trainer, now: float, metrics: Mapping[str, Any]) -> str:
        """`step 10/67 | epoch 1/1 | loss 0.4012 | kl 1.2345 | margin +0.512 | 61.3 examples/s |
        ETA 0:00:21`, with the step's `train/...` metrics."""
        step, total = trainer.global_step, self._total
        parts = [f"step {step}/{int(total)}" if math.isfinite(total) else f"step {step}"]
        epochs = trainer.max_epochs
        epoch = trainer.current_epoch + 1
        parts.append(f"epoch {epoch}/{epochs}" if epochs and epochs > 0 else f"epoch {epoch}")
        parts += _fields(metrics, STEP_FIELDS)
        # Throughput leaves validation out; the ETA keeps it in, as the rest of the run will.
        seconds = now - self._window_start - self._validating
        if self._window_rows and seconds > 0:
            parts.append(f"{self._window_rows / seconds:.1f} examples/s")
        done = step - self._first_step
        if math.isfinite(total) and done > 0:
            eta = (now - self._start) / done * max(total - step, 0)
            parts.append(f"ETA {datetime.timedelta(seconds=round(eta))}")
        return " | ".join(parts)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._validating_since = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._validating_since is not None:
            self._validating += time.perf_counter() - self._validating_since
            self._validating_since = None
        fields = _fields(trainer.callback_metrics, VALIDATION_FIELDS)
        if not trainer.is_global_zero or not fields:
            return
        when = (
            "before training"
            if trainer.state.fn == TrainerFn.VALIDATING and trainer.global_step == 0
            else f"at step {trainer.global_step}"
        )
        log.info("validation %s: %s", when, " | ".join(fields))


class PlainModelSummary(ModelSummary):
    """Lightning's model summary, as plain text through the log, without its FLOPs column.

    Lightning counts FLOPs only by running `example_input_array`, which a KTO module has no use
    for, so that column and its total read 0.
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int = 0,
        **summarize_kwargs: Any,
    ) -> None:
        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        widths = [max(len(name), *(len(str(v)) for v in values)) for name, values in columns]
        rows = [
            [name for name, _ in columns],
            *zip(*(values for _, values in columns), strict=True),
        ]
        table = [
            "  ".join(
                str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
            for row in rows
        ]
        frozen = total_parameters - trainable_parameters
        table.append(
            f"{get_human_readable_count(trainable_parameters)} trainable, "
            f"{get_human_readable_count(frozen)} frozen parameters "
            f"({get_formatted_model_size(model_size)} MB in all)"
        )
        log.info("model summary:\n%s", textwrap.indent("\n".join(table), "  "))


def console_callbacks(
    trainer_config: Mapping[str, Any], callbacks: Sequence[L.Callback], every_n_steps: int
) -> tuple[list[L.Callback], dict[str, bool]]:
    """The callbacks that print while a run trains, and the Trainer switches that go with them.

    On a terminal, Lightning's progress bar (as `trainer.enable_progress_bar` says). Elsewhere,
    or with the bar turned off, `PlainProgress`'s lines. A progress bar or model summary that the
    callbacks group holds already is left as it is.

    Args:
        trainer_config: the `trainer` config (`enable_progress_bar`, `enable_model_summary`).
        callbacks: the run's other callbacks.
        every_n_steps: `progress.every_n_steps`.
    """
    added: list[L.Callback] = []
    bar = bool(trainer_config.get("enable_progress_bar", True))
    if not any(isinstance(c, ProgressBar) for c in callbacks) and (
        not bar or not sys.stdout.isatty()
    ):
        added.append(PlainProgress(every_n_steps))
        bar = False
    summary = bool(trainer_config.get("enable_model_summary", True))
    if summary and not any(isinstance(c, ModelSummary) for c in callbacks):
        added.append(PlainModelSummary())
    # Lightning's own summary stays off: with ours in the list it would only say that it skips.
    return added, {"enable_progress_bar": bar, "enable_model_summary": False}


@rank_zero_only
def log_config(cfg: DictConfig) -> None:
    """Log the run's config as YAML, resolved, each secret-named value as ***; on rank 0."""
    try:
        composed = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:  # a bad interpolation: `build` names it; show it as written
        composed = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(composed, dict)
    text = OmegaConf.to_yaml(redact_secrets(composed)).rstrip()
    log.info("config:\n%s", textwrap.indent(text, "  "))


class _DropMessages(logging.Filter):
    """Drop the records of one logger whose message starts with one of `patterns` (regexes)."""

    def __init__(self, *patterns: str) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


# Logger name -> what it says that tells a user nothing. Matched by message, never by level:
# any other line of these loggers still shows.
_NOISE = {
    "lightning.pytorch.utilities.rank_zero": _DropMessages(
        r"💡 Tip: ",  # advertisements for Lightning's cloud products
        r"(TPU|HPU) available: False",
        r"`Trainer\(val_check_interval=1\.0\)` was configured so validation will run at the end",
        r"Loading `train_dataloader` to estimate number of stepping batches",
    ),
    # The config above shows the seed; other ranks say it too, as `[rank: 1] Seed set to 42`.
    "lightning.fabric.utilities.seed": _DropMessages(r"(\[rank: \d+\] )?Seed set to "),
    # Importing transformers' integrations (saving the HF export) imports DeepSpeed when it is
    # installed, and DeepSpeed announces, as a warning, that it found no GPU.
    "DeepSpeed": _DropMessages(r"Setting (ds_)?accelerator to "),
}


def quiet_library_noise(interactive: bool) -> None:
    """Drop the lines libraries print that tell a user nothing. Safe to call more than once.

    Args:
        interactive: whether stdout is a terminal. Elsewhere the progress bars of `datasets`
            (reading, tokenizing, filtering) and of transformers (writing the export) are off
            too: redrawn in place, they leave a line of carriage returns each in a file.
    """
    for name, noise in _NOISE.items():
        logging.getLogger(name).addFilter(noise)  # the same filter twice is one filter
    # Lightning 2.6 calls torch's deprecated pytree API; nothing for a user to change.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    # The module sums its metrics across ranks itself and logs them with sync_dist=False on
    # purpose (see module.py); under DDP Lightning advises sync_dist=True, once per metric.
    warnings.filterwarnings(
        "ignore",
        message=r"It is recommended to use `self\.log\('[^']*', \.\.\., sync_dist=True\)`",
        category=PossibleUserWarning,
    )
    if interactive:
        return
    datasets.disable_progress_bars()
    # Only transformers' own bars: `disable_progress_bar()` would hide Hub downloads as well.
    set_hook = getattr(transformers.utils.logging, "set_tqdm_hook", None)
    if set_hook is not None:
        set_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
