"""The model card (`README.md`) written beside an exported policy, in the Hugging Face convention.

A YAML front matter that the hub reads (library_name, base_model, tags, datasets), a title that
names the base model and the task (reporting/card_title.py), then what a reader needs to trust
and reuse the weights: the base model, the data, the loss settings as trained (the run config's
`resolved_loss`: an `auto` class weight as the number it became), the final validation metrics,
the run's health report when it wrote one (reporting/card_health.py), the command that
reproduces the run, and how to load the folder.

Both exports write it: kto_lightning.export from a checkpoint, and the end-of-training
HuggingFaceExport callback. They read the same facts (the run config a checkpoint stores, the run
directory), so a run's card is the same whichever wrote it.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from kto_lightning.core.losses import LOSS_TYPES
from kto_lightning.models.reference import configured_kind
from kto_lightning.reporting.card_health import health_text
from kto_lightning.reporting.card_title import (
    built_in_model,
    card_title,
    is_hub_dataset,
    is_hub_id,
    section,
    target_name,
)
from kto_lightning.runs.run_record import export_folder
from kto_lightning.runs.run_records import DATA_COUNTS_KEY, OVERRIDES_FILE, recorded_overrides
from kto_lightning.runs.sweeps import shown_overrides

CARD_FILE = "README.md"
# Where the snippets point: the card travels with the folder (and to the hub), its path does not.
FOLDER = "path/to/this/folder"
LOSS_TITLES = {"kto": "KTO", "apo_zero_unpaired": "APO-zero (unpaired)", "sft": "SFT"}
# The headline metrics, first in the table; the run's other validation metrics follow.
HEADLINE = (
    "val/rewards/auroc",
    "val/rewards/accuracy",
    "val/rewards/margins",
    "val/kl",
    "val/loss",
    "val/perplexity",
)
NOT_RECORDED = "not recorded"
# The loss settings in the order a reader looks for them; any others follow.
LOSS_ORDER = ("loss_type", "beta", "desirable_weight", "undesirable_weight", "estimator")


def data_counts(datamodule: object) -> dict[str, dict[str, int]] | None:
    """{split: {desirable, undesirable}} rows the data module kept (after setup), for the run
    config, so that a checkpoint, and so its card, says what it was trained on; None for a data
    module that keeps no summary."""
    summaries = getattr(datamodule, "summaries", None)
    if not isinstance(summaries, dict) or not summaries:
        return None
    return {
        split: {"desirable": int(s.desirable), "undesirable": int(s.undesirable)}
        for split, s in summaries.items()
    }


def _arguments(node: dict[str, Any], skip: tuple[str, ...] = ()) -> str:
    return ", ".join(
        f"{k}={v}" for k, v in node.items() if k != "_target_" and k not in skip and v is not None
    )


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def front_matter(config: dict[str, Any], adapter: bool) -> dict[str, Any]:
    """The card's YAML header: what the hub indexes the model by. No license: the run does not
    know the base model's or the data's; the uploader adds it."""
    model, source = section(config, "model"), section(section(config, "data"), "source")
    loss_type = _loss_settings(config).get("loss_type", "kto")
    header: dict[str, Any] = {"library_name": "peft" if adapter else "transformers"}
    name = model.get("name_or_path")
    if isinstance(name, str) and is_hub_id(name):
        # The hub refuses a base_model that is no model id: a local path stays in the text.
        header["base_model"] = name
    tags = ["kto", "kto_lightning"] if loss_type in LOSS_TYPES else ["kto_lightning"]
    if loss_type != "kto":
        tags.append(str(loss_type))
    if model.get("lora"):
        tags.append("lora")
    header["tags"] = tags
    datasets = [
        path
        for path in (source.get("path"), source.get("val_path"))
        if isinstance(path, str) and is_hub_dataset(path)
    ]
    if datasets:
        header["datasets"] = list(dict.fromkeys(datasets))
    header["pipeline_tag"] = "text-generation"
    return header


def _loss_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The loss as trained: `resolved_loss`, else the loss config as written."""
    resolved = config.get("resolved_loss")
    if isinstance(resolved, dict) and resolved:
        return resolved
    loss = section(config, "loss")
    settings = {k: v for k, v in loss.items() if k != "_target_"}
    if "loss_type" not in settings and target_name(loss) == "SFTLoss":
        settings["loss_type"] = "sft"
    return settings


def _base_model_text(config: dict[str, Any], adapter: bool) -> list[str]:
    model = section(config, "model")
    if not model:
        return [f"{NOT_RECORDED} (the checkpoint holds no model config)."]
    name = model.get("name_or_path")
    if isinstance(name, str):
        where = "the Hugging Face hub model" if is_hub_id(name) else "the local model folder"
        revision = f" at revision `{model['revision']}`" if model.get("revision") else ""
        lines = [f"{where} `{name}`{revision}."]
    elif isinstance(model.get("run_dir"), str):  # models.FromRun: an earlier run's export
        folder = export_folder(model["run_dir"])
        lines = [
            f"the model an earlier kto_lightning run exported, `{folder}` (e.g. its SFT stage); "
            f"its own card, `{folder / CARD_FILE}`, describes it."
        ]
    elif target_name(model) == "TinyLlama":
        lines = [
            f"{built_in_model(model)} ({_arguments(model, skip=('lora',))}), with kto_lightning's "
            f"byte-level tokenizer, under seed {config.get('seed')}."
        ]
    else:
        lines = [f"`{model.get('_target_')}` ({_arguments(model, skip=('lora',))})."]
    lora = model.get("lora")
    if lora:
        kept = (
            "this folder holds the adapter alone"
            if adapter
            else "merged into the weights of this folder"
        )
        settings = ", ".join(f"{k}={v}" for k, v in lora.items())
        lines.append(f"LoRA adapters ({settings}) were trained on it, {kept}.")
    return lines


def _data_text(config: dict[str, Any]) -> list[str]:
    source = section(section(config, "data"), "source")
    path = source.get("path")
    if not path:
        return [f"Source: {NOT_RECORDED}."]
    if path == "toy":
        lines = [f"Source: kto_lightning's bundled toy task, {source.get('toy_rows')} rows."]
    elif is_hub_dataset(str(path)):
        details = _arguments(source, skip=("path", "cache_dir", "num_proc", "toy_rows"))
        lines = [f"Source: the Hugging Face dataset `{path}` ({details})."]
    else:
        details = _arguments(source, skip=("path", "cache_dir", "num_proc", "toy_rows", "subset"))
        lines = [f"Source: the local file `{path}` ({details})."]
    counts = config.get(DATA_COUNTS_KEY)
    if isinstance(counts, dict) and counts:
        for split, labels in counts.items():
            desirable, undesirable = labels.get("desirable", 0), labels.get("undesirable", 0)
            lines.append(
                f"- {split}: {desirable + undesirable} rows ({desirable} desirable, "
                f"{undesirable} undesirable), after tokenizing and filtering"
            )
    else:
        lines.append(f"Row counts: {NOT_RECORDED}.")
    return lines


def _loss_text(config: dict[str, Any]) -> list[str]:
    settings = _loss_settings(config)
    if not settings:
        return [f"{NOT_RECORDED}."]
    written = section(config, "loss")
    lines = ["| setting | value |", "|---|---|"]
    first = [key for key in LOSS_ORDER if key in settings]
    for key in first + [key for key in settings if key not in LOSS_ORDER]:
        value, note = settings[key], ""
        if key in written and written[key] != value and isinstance(written[key], str):
            note = f" (`{written[key]}` in the config)"  # e.g. an `auto` class weight
        lines.append(f"| {key} | {_number(value)}{note} |")
    kind = section(config, "reference").get("kind")
    reference = kind and configured_kind(str(kind), section(config, "model").get("lora"))
    if reference and settings.get("loss_type") in LOSS_TYPES:
        lines.append(f"| reference model | {reference} |")
    optimizer = section(config, "optimizer")
    if "lr" in optimizer:
        lines.append(f"| learning rate | {_number(optimizer['lr'])} |")
    batching = section(section(config, "data"), "batching")
    if "batch_size" in batching:
        lines.append(f"| batch size (per device) | {batching['batch_size']} |")
    if "seed" in config:
        lines.append(f"| seed | {config['seed']} |")
    return lines


def _metrics_text(step: int | None, metrics: dict[str, float], objective: str | None) -> list[str]:
    trained = f"Trained for {step} optimizer steps. " if step is not None else ""
    if not metrics:
        return [f"{trained}Metrics: {NOT_RECORDED} (the run logged no validation up to then)."]
    lines = [f"{trained}The run's last validation up to then:", "", "| metric | value |"]
    lines.append("|---|---|")
    order = [name for name in HEADLINE if name in metrics]
    order += sorted(name for name in metrics if name not in HEADLINE)
    for name in order:
        value = metrics[name]
        shown = f"{value:.6g}" if math.isfinite(value) else str(value)
        mark = " (the run's objective)" if name == objective else ""
        lines.append(f"| {name}{mark} | {shown} |")
    return lines


def reproduce_command(run_dir: Path | None) -> str | None:
    """`python -m kto_lightning.train <overrides>` from the run's .hydra/overrides.yaml, secret
    values shown as *** and `resume` left out; None when the run has no such record."""
    overrides = recorded_overrides(run_dir) if run_dir is not None else None
    if overrides is None:
        return None
    kept = [o for o in overrides if o.partition("=")[0].lstrip("+~") != "resume"]
    return shlex.join(["python", "-m", "kto_lightning.train", *shown_overrides(kept)])


def _reproduce_text(run_dir: Path | None) -> list[str]:
    command = reproduce_command(run_dir)
    if command is None:
        return [
            f"{NOT_RECORDED}: the run directory has no {OVERRIDES_FILE} (the run was not "
            "launched by `python -m kto_lightning.train`)."
        ]
    lines = ["```bash", command, "```"]
    if "***" in command:
        lines.append("Values shown as `***` are secrets: give them again (or in the environment).")
    return lines


def _load_text(config: dict[str, Any], adapter: bool) -> list[str]:
    if not adapter:
        return [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{FOLDER}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{FOLDER}")',
            'inputs = tokenizer("Hello", return_tensors="pt")',
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))",
            "```",
        ]
    model = section(config, "model")
    name = model.get("name_or_path")
    if not isinstance(name, str) and isinstance(model.get("run_dir"), str):
        name = str(export_folder(model["run_dir"]))
    base = name if isinstance(name, str) else "BASE_MODEL"
    lines = [
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "{FOLDER}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{FOLDER}")',
        "```",
    ]
    if not isinstance(name, str):
        lines.append(
            "The base is not a saved model: export the checkpoint without `keep_adapter=true` for "
            "weights that load on their own."
        )
    return lines


def model_card(
    config: dict[str, Any],
    run_dir: Path | None,
    step: int | None,
    metrics: dict[str, float],
    adapter: bool,
) -> str:
    """The card's text.

    Args:
        config: the run config a checkpoint stores (run_build.build's hparams: secrets already ***).
        run_dir: the run directory, for the command that reproduces the run; None if unknown.
        step: the optimizer steps the exported weights were trained for.
        metrics: the final validation metrics; {} when none was recorded.
        adapter: the folder holds a LoRA adapter alone (not merged weights).
    """
    loss_type = str(_loss_settings(config).get("loss_type", "kto"))
    header = OmegaConf.to_yaml(front_matter(config, adapter))
    sections: list[tuple[str, list[str] | None]] = [
        ("Base model", _base_model_text(config, adapter)),
        ("Data", _data_text(config)),
        ("Loss settings", _loss_text(config)),
        ("Final metrics", _metrics_text(step, metrics, config.get("objective"))),
        ("Run health", health_text(run_dir)),
        ("Reproduce", _reproduce_text(run_dir)),
        ("Load", _load_text(config, adapter)),
    ]
    parts = [
        f"---\n{header}---",
        f"# {card_title(config, LOSS_TITLES.get(loss_type, loss_type))}",
        "Trained with kto_lightning (KTO: Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306)."
        if loss_type != "sft"
        else "Trained with kto_lightning's supervised fine-tuning stage.",
    ]
    for title, lines in sections:
        if lines is not None:  # None: a section the run has nothing for (no health report)
            parts.append(f"## {title}\n\n" + "\n".join(lines))
    return "\n\n".join(parts) + "\n"


def write_model_card(
    out_dir: Path,
    config: dict[str, Any] | None,
    run_dir: Path | None,
    step: int | None,
    metrics: dict[str, float],
    merge_lora: bool,
) -> Path:
    """Write `<out_dir>/README.md` (see `model_card`); returns its path. `merge_lora`: as the
    export was asked, so a LoRA policy's folder holds an adapter when it is false."""
    config = config or {}
    adapter = bool(section(config, "model").get("lora")) and not merge_lora
    path = Path(out_dir) / CARD_FILE
    path.write_text(model_card(config, run_dir, step, metrics, adapter))
    return path
