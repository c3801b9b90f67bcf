"""Entry point: score a trained policy against its reference with the KTO validation metrics.

python -m kto_lightning.evaluate ckpt_path=outputs/kto/runs/<time>               # its last.ckpt
python -m kto_lightning.evaluate ckpt_path=RUN/checkpoints/best-step120.ckpt     # one checkpoint
python -m kto_lightning.evaluate ckpt_path=RUN/hf_model data.source.test_split=test

`ckpt_path` names a checkpoint, a run (or sweep job) directory or a Hugging Face folder, read by
kto_lightning.runs.run_record; what each gives as the policy and its reference is in
kto_lightning.cli.evaluation_target. A checkpoint's run config decides the model, the loss (class
weights as trained), the seed and the data; the command line decides the rest.

The rows: the run's own data config (`scored_data`), with any `data.<key>=` of the command line
on top: `data.source.test_path` / `test_split` when set, else the validation rows, held out as
the run held them out (its file, hold-out and seed). `trainer.validate` runs KTOModule's
validation step: no optimizer, no checkpoint, no logger. This evaluation's run directory
(outputs/eval/runs/<time>) receives eval.json (the validation metrics renamed val/* -> eval/*,
and what was scored: data, model, loss) and reward_distributions.png (the implied rewards of each
label).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor

from kto_lightning.cli import schemas
from kto_lightning.cli.config_files import config_dir, on_gpu
from kto_lightning.cli.evaluation_target import (
    build_models,
    load_tokenizer,
    override_keys,
    refuse_guessed_run,
    resolve_target,
)
from kto_lightning.cli.guards import explain_missing_value, run_explained
from kto_lightning.cli.lifecycle import scalar_metrics
from kto_lightning.common.distributed import gather_cat
from kto_lightning.common.security import scrub_hydra_record
from kto_lightning.core.logprobs import CausalLM, resolve_chunk_size
from kto_lightning.core.losses import KTOLoss, KTOLossConfig
from kto_lightning.core.step import StepLogps
from kto_lightning.data.config import Source, as_group
from kto_lightning.data.datamodule import KTODataModule
from kto_lightning.data.splits import read_evaluation_split
from kto_lightning.data.summary import format_summary
from kto_lightning.errors import ConfigError, user_error
from kto_lightning.models import check_context_window
from kto_lightning.models.reference import ReferenceProvider
from kto_lightning.reporting.progress import quiet_library_noise
from kto_lightning.training.module import KTOModule
from kto_lightning.training.strategies import keep_state_on_device

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
        self.val_set, summary = self._prepare(read, *self._tokenize(read), self.seed + 1)
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


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined metric (AUROC of one class) is written as null."""
    return value if math.isfinite(value) else None


def _distribution(rewards: Tensor) -> dict[str, float | int | None]:
    """The numbers behind one label's histogram: rows, mean, spread and range of its rewards."""
    if rewards.numel() == 0:
        return {"rows": 0}
    values = rewards.double()
    return {
        "rows": rewards.numel(),
        "mean": _finite(float(values.mean())),
        "std": _finite(float(values.std())) if rewards.numel() > 1 else None,
        "min": _finite(float(values.min())),
        "median": _finite(float(values.median())),
        "max": _finite(float(values.max())),
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


def _run_loss(run: dict[str, Any]) -> KTOLoss | KTOLossConfig | None:
    """The KTO loss the run trained with (class weights as resolved then); None for a run of
    another loss (loss=sft), whose policy the `loss` group's KTO loss scores."""
    trained = instantiate(run["loss"])
    if not isinstance(trained, KTOLossConfig):
        return None
    resolved = run.get("resolved_loss")
    return KTOLoss(**resolved) if isinstance(resolved, dict) else trained


_UNSET = object()  # `~data.<key>` on the command line: the key removed


def _flat(tree: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """The leaves of a nested config as dotted keys (`data.source.path`)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}"
        out |= _flat(value, name) if isinstance(value, Mapping) else {name: value}
    return out


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set (or, for `_UNSET`, remove) `dotted` in the nested dict `tree`."""
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    if value is _UNSET:
        tree.pop(leaf, None)
    else:
        tree[leaf] = value


def scored_data(
    data: DictConfig, run: Mapping[str, Any] | None, overrides: Sequence[str]
) -> tuple[dict[str, Any], list[str] | None]:
    """The data config to score and how it differs from the run's (None: no run config).

    The run's data config, as it trained (its file, columns, lengths, hold-out and seed, so the
    validation rows are the rows it validated on), is the base: evaluate.yaml's `data` group
    stands in only for a Hugging Face folder of no run. A `data.<key>=` on the command line is
    applied on top of the run's; choosing another group (`data=<name>`) replaces it whole.
    """
    container = OmegaConf.to_container(data, resolve=True, throw_on_missing=True)
    assert isinstance(container, dict)
    composed = {str(key): value for key, value in container.items()}
    if run is None or not isinstance(run.get("data"), Mapping):
        return composed, None
    keys = [o.split("=", 1)[0].lstrip("+~").split("@")[0] for o in overrides]
    if "data" in keys:
        scored = composed
    else:
        scored = copy.deepcopy(dict(run["data"]))
        for key in keys:
            if key.startswith("data."):
                sub = key.removeprefix("data.")
                value = OmegaConf.select(data, sub, default=_UNSET)
                if isinstance(value, DictConfig | ListConfig):
                    value = OmegaConf.to_container(value, resolve=True)
                _set(scored, sub, value)
    then, now = _flat(run["data"], "data"), _flat(scored, "data")
    differs = [
        f"{key}: {then.get(key)!r} -> {now.get(key)!r}"
        for key in sorted(then.keys() | now.keys())
        if then.get(key) != now.get(key)
    ]
    return scored, differs


def _adopt_run_config(
    cfg: DictConfig, run: dict[str, Any], decided: tuple[str, ...], overrides: Sequence[str]
) -> None:
    """Take the run's seed and chunk size into `cfg`; refuse overrides of the `decided` keys."""
    keys = [override.split("=", 1)[0] for override in overrides]
    refused = [key for key in keys if key.lstrip("+~").split(".")[0] in decided]
    if refused:
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path} brings its run's config, which decides "
            f"{', '.join(decided)}; drop {', '.join(refused)} from the command line (to score "
            "against another reference, set reference_model=)"
        )
    cfg.seed = run["seed"]  # a random-init reference and the validation hold-out follow it
    cfg.logprob_chunk_size = run.get("logprob_chunk_size", cfg.logprob_chunk_size)


def _metrics(trainer: L.Trainer) -> dict[str, float | None]:
    """The validation metrics of the last `trainer.validate`, renamed val/* -> eval/*."""
    return {
        f"eval/{name.removeprefix('val/')}": _finite(value)
        for name, value in sorted(scalar_metrics(trainer.callback_metrics).items())
        if name.startswith("val/")
    }


def _scoring_loss(
    cfg: DictConfig, run: dict[str, Any] | None, overrides: Sequence[str]
) -> KTOLoss | KTOLossConfig:
    """The KTO loss to score with: the run's, else the `loss` group's. With a run, `cfg` takes
    its seed and chunk size, and overrides of what the run decides are refused."""
    loss = _run_loss(run) if run is not None else None
    if run is not None:
        decided = ("model", "seed") if loss is None else ("model", "loss", "seed")
        _adopt_run_config(cfg, run, decided, overrides)
    if loss is None:
        loss = instantiate(cfg.loss)
    if not isinstance(loss, KTOLoss | KTOLossConfig):
        raise ConfigError(
            f"loss: evaluation scores implied rewards, which a {type(loss).__name__} has none "
            "of; use loss=kto or loss=apo_zero_unpaired"
        )
    return loss


def _trainer(cfg: DictConfig) -> L.Trainer:
    """The `trainer` and `strategy` groups' Trainer, for `validate` alone: no callbacks,
    checkpoints or loggers."""
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        strategy=instantiate(cfg.strategy),
        callbacks=[],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=bool(cfg.trainer.enable_progress_bar) and sys.stdout.isatty(),
    )
    keep_state_on_device(trainer.strategy)  # no copy of the models to the host after validate
    return trainer


def _write(record: dict[str, Any], rewards: Tensor, labels: Tensor, out: Path) -> None:
    """eval.json and the PNG into `out`, and the summary into the log."""
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).write_text(json.dumps(record, indent=2) + "\n")
    data, auroc = record["data"], record["auroc"]
    title = (
        f"{record['model']['weights']}\non {data['source']} ({data['split']}), reward AUROC "
        f"{'n/a' if auroc is None else f'{auroc:.3f}'}"
    )
    plot_reward_distributions(rewards, labels, out / PLOT, title)
    log.info("%s", format_report(record, out))


def evaluate(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Score the policy `cfg.ckpt_path` names; write eval.json and the PNG; returns eval.json.

    `overrides`: the command line's; any that sets what the run config decides is refused.
    """
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise ConfigError(
            "ckpt_path must be set: a checkpoint file (.ckpt), a run directory or a Hugging Face "
            "model folder, e.g. python -m kto_lightning.evaluate ckpt_path=outputs/kto/runs/<time>"
        )
    schemas.check(cfg)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    quiet_library_noise(interactive=sys.stdout.isatty())
    target = resolve_target(str(cfg.ckpt_path))
    run = target.run_config
    source = as_group(Source, cfg.data.get("source"), "source")
    refuse_guessed_run(
        target, cfg.reference_model, cfg.model, source, int(cfg.seed), override_keys(overrides)
    )
    loss_config = _scoring_loss(cfg, run, overrides)
    tokenizer = load_tokenizer(target)
    # Data first: a bad row stops the evaluation before a large model is loaded.
    data, differs = scored_data(cfg.data, run, overrides)
    if differs is not None:
        log.info("data: the run's%s", f", except {'; '.join(differs)}" if differs else " own")
    settings = {str(key): value for key, value in data.items() if key != "_target_"}
    datamodule = EvaluationData(tokenizer, needs_kl_rows=loss_config.needs_kl_rows, **settings)
    datamodule.setup("validate")
    [(split, summary)] = datamodule.summaries.items()
    if isinstance(loss_config, KTOLoss):
        loss = loss_config
    else:  # "auto" class weights balance the rows scored
        loss, _ = loss_config.with_class_counts(summary.desirable, summary.undesirable)
    # The run's own chunk size (resolved when it trained), else "auto" for this device.
    chunk = resolve_chunk_size(cfg.logprob_chunk_size, on_gpu(cfg), len(tokenizer))
    policy, reference, identity = build_models(
        target, tokenizer, int(cfg.seed), cfg.reference_model, cfg.model, chunk,
        loss.needs_kl_rows,
    )  # fmt: skip
    assert datamodule.val_set is not None  # setup() above
    longest = max(datamodule.val_set.lengths, default=0)  # a row's tokens, or its KL row's
    check_context_window(policy, datamodule.lengths.max_length, "data.lengths.max_length", longest)
    module = ScoringModule(policy, reference, loss, chunk)
    trainer = _trainer(cfg)
    trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics, rewards, labels = _metrics(trainer), module.rewards, module.labels
    record = {
        "metrics": metrics,
        "auroc": metrics.get("eval/rewards/auroc"),
        "reward_accuracy": metrics.get("eval/rewards/accuracy"),
        "counts": {"desirable": int(labels.sum()), "undesirable": int((~labels).sum())},
        "rewards": {
            "desirable": _distribution(rewards[labels]),
            "undesirable": _distribution(rewards[~labels]),
        },
        "data": {
            "split": split,
            "source": summary.source,
            "rows_read": summary.rows_read,
            "rows": summary.kept,
            "config": data,
            # `key: run's value -> this value` for each data key the command line changed; []
            # for the run's own data, None for a Hugging Face folder of no run.
            "differs_from_run": differs,
        },
        "model": {"ckpt_path": str(cfg.ckpt_path), **identity},
        "loss": dataclasses.asdict(loss),
    }
    if trainer.is_global_zero:
        _write(record, rewards, labels, Path(cfg.paths.output_dir))
    return record


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


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    scrub_hydra_record(cfg)
    try:
        evaluate(cfg, HydraConfig.get().overrides.task)
    except Exception as error:
        problem = user_error(error) or explain_missing_value(error)
        if problem is None:
            log.exception("the evaluation failed")  # a bug: its traceback
        else:  # a problem the user can fix: one clear line, no traceback
            log.error("%s", problem)
            print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    run_explained(main)
