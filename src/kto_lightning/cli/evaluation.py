"""Score a trained policy against its reference: the library behind `kto_lightning.evaluate`.

`ckpt_path` names a checkpoint, a run (or sweep job) directory or a Hugging Face folder, read by
kto_lightning.runs.run_record; what each gives as the policy and its reference is in
cli/evaluation_target.py. A checkpoint's run config decides the model, the loss (class weights
as trained), the seed and the data; the command line decides the rest.

The rows: the run's own data config (`scored_data`), with any `data.<key>=` of the command line
on top: `data.source.test_path` / `test_split` when set, else the validation rows, held out as
the run held them out (its file, hold-out and seed). `trainer.validate` runs KTOModule's
validation step: no optimizer, no checkpoint, no logger. This evaluation's run directory
(outputs/eval/runs/<time>) receives eval.json and reward_distributions.png (cli/scoring.py).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor

from kto_lightning.cli import schemas
from kto_lightning.cli.config_files import on_gpu
from kto_lightning.cli.evaluation_target import (
    build_models,
    load_tokenizer,
    override_keys,
    refuse_guessed_run,
    resolve_target,
)
from kto_lightning.cli.guards import explain_missing_value
from kto_lightning.cli.lifecycle import scalar_metrics
from kto_lightning.cli.scoring import (
    PLOT,
    RESULTS,
    EvaluationData,
    ScoringModule,
    distribution,
    finite,
    format_report,
    plot_reward_distributions,
)
from kto_lightning.common.security import scrub_hydra_record
from kto_lightning.core.chunked_head import resolve_chunk_size
from kto_lightning.core.losses import KTOLoss, KTOLossConfig
from kto_lightning.data.config import Source, as_group
from kto_lightning.errors import ConfigError, user_error
from kto_lightning.models import check_context_window
from kto_lightning.reporting.progress import quiet_library_noise
from kto_lightning.training.strategies import keep_state_on_device

log = logging.getLogger("kto_lightning")


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
    if run.get("online") and not any(k == "data" or k.startswith("data.") for k in keys):
        raise ConfigError(
            "this is an online KTO run (online=step): its data are prompts, with no completions "
            "or labels to score; its held-out rewards are val/online/* in its csv/metrics.csv. "
            "To score labelled rows, name them: data=<group> or data.source.path=<file>"
        )
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
        f"eval/{name.removeprefix('val/')}": finite(value)
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
            "desirable": distribution(rewards[labels]),
            "undesirable": distribution(rewards[~labels]),
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


def run_evaluation(cfg: DictConfig) -> None:
    """The body of the `evaluate` entry point: `evaluate`, its errors as one line, exit 1."""
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
