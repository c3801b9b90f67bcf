"""What evaluate scores with and writes: the one-split data module, the module that keeps each
row's implied reward, the reward histograms, and the closing summary.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kto_lightning.common.distributed import gather_cat
from kto_lightning.core.logprobs import CausalLM
from kto_lightning.core.losses import KTOLoss
from kto_lightning.core.step import StepLogps
from kto_lightning.data.datamodule import KTODataModule
from kto_lightning.data.splits import read_evaluation_split
from kto_lightning.data.summary import format_summary
from kto_lightning.models.reference import ReferenceProvider
from kto_lightning.training.module import KTOModule

log = logging.getLogger("kto_lightning")
RESULTS = "eval.json"
PLOT = "reward_distributions.png"
# (label, metric, format) of the summary's rows.
SUMMARY_ROWS = (
    ("reward AUROC", "eval/rewards/auroc", "{:.4f}"),
    ("reward accuracy", "eval/rewards/accuracy", "{:.4f}"),
    ("reward margin", "eval/rewards/margins", "{:+.4f}"),
    ("KL reference point", "eval/kl", "{:.4f}"),
    ("loss", "eval/loss", "{:.4f}"),
)


class EvaluationData(KTODataModule):
    """The data module with one split, the rows to score, as its validation set.

    Training rows are read only when the validation rows are held out of them.
    """

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is not None:
            return
        read = read_evaluation_split(self.source, self.columns, self.seed)
        # seed + 1 pairs the KL rows as training paired its validation rows.
        self.val_set, summary = self._keep(read, *self._tokenize(read), self.seed + 1)
        self.summaries = {read.split: summary}
        lengths = self.lengths
        log.info("%s", format_summary([summary], lengths.max_length, lengths.max_prompt_length))


def _no_optimizer(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
    raise RuntimeError("kto_lightning.evaluate trains nothing: it builds no optimizer")


class ScoringModule(KTOModule):
    """KTOModule that also keeps each scored row's implied reward and label (for the histogram).

    For `trainer.validate` only: it has no optimizer.
    """

    def __init__(
        self, policy: CausalLM, reference: ReferenceProvider, loss: KTOLoss, chunk_size: int
    ) -> None:
        super().__init__(policy, reference, loss, _no_optimizer, logprob_chunk_size=chunk_size)
        self._rows: list[tuple[Tensor, Tensor]] = []
        self.rewards = torch.empty(0)  # (N,) every rank's rows, after validation
        self.labels = torch.empty(0, dtype=torch.bool)  # (N,)

    def forward_logps(self, batch: dict[str, Tensor], split: str) -> StepLogps:
        logps = super().forward_logps(batch, split)
        # The implied reward as kto_loss computes it, in float32.
        reward = self.loss.beta * (logps.policy.float() - logps.reference.float())
        self._rows.append((reward.detach(), batch["labels"]))
        return logps

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        self._rows = []

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self._rows:  # on every rank: gather_cat is a collective
            rewards, labels = (torch.cat(column) for column in zip(*self._rows, strict=True))
            self.rewards = gather_cat(rewards).cpu()
            self.labels = gather_cat(labels.to(torch.uint8)).bool().cpu()


def finite(value: float) -> float | None:
    """JSON has no NaN: an undefined metric (AUROC of one class) is written as null."""
    return value if math.isfinite(value) else None


def distribution(rewards: Tensor) -> dict[str, float | int | None]:
    """The numbers behind one label's histogram: rows, mean, spread and range of its rewards."""
    if rewards.numel() == 0:
        return {"rows": 0}
    values = rewards.double()
    return {
        "rows": rewards.numel(),
        "mean": finite(float(values.mean())),
        "std": finite(float(values.std())) if rewards.numel() > 1 else None,
        "min": finite(float(values.min())),
        "median": finite(float(values.median())),
        "max": finite(float(values.max())),
    }


def plot_reward_distributions(rewards: Tensor, labels: Tensor, out: Path, title: str) -> Path:
    """Histograms of the implied rewards of desirable and undesirable rows, on shared bins."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    finite = torch.isfinite(rewards)  # a diverged policy's NaN rows cannot be binned
    figure, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    if finite.any():
        bins = torch.histogram(rewards[finite].double(), bins=40).bin_edges.tolist()
        for label, color in ((True, "tab:green"), (False, "tab:red")):
            values = rewards[finite & (labels == label)].double()
            if values.numel():
                name = "desirable" if label else "undesirable"
                text = f"{name}: {values.numel()} rows, mean {float(values.mean()):+.3f}"
                ax.hist(values.numpy(), bins=bins, alpha=0.55, color=color, label=text)
        ax.legend(fontsize=9)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("implied reward  beta * (log pi_policy(y|x) - log pi_ref(y|x))")
    ax.set_ylabel("rows")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def format_report(record: Mapping[str, Any], out: Path) -> str:
    """The closing summary: what was scored, on what, the headline metrics, where they went."""
    model, data, counts = record["model"], record["data"], record["counts"]
    step = f" (step {model['global_step']})" if "global_step" in model else ""
    lines = [
        f"evaluated {model['weights']}{step}",
        f"  reference: {model['base_model']} ({model['reference']})",
        f"  rows: {data['source']} ({data['split']}), {counts['desirable']} desirable and "
        f"{counts['undesirable']} undesirable scored",
    ]
    if data["differs_from_run"]:
        lines.append(f"  data other than the run's: {'; '.join(data['differs_from_run'])}")
    width = max(len(label) for label, _, _ in SUMMARY_ROWS)
    for label, key, fmt in SUMMARY_ROWS:
        value = record["metrics"].get(key)
        lines.append(f"  {label:<{width}}  {'n/a' if value is None else fmt.format(value)}")
    lines.append(f"  written: {out / RESULTS}, {out / PLOT}")
    return "\n".join(lines)
