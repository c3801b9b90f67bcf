"""What a model card is about, named for a reader of the hub: the base model and the task.

A title such as "TinyLlama trained with KTO" would name one of our classes, and a real model
(TinyLlama/TinyLlama-1.1B) with it. The title says instead what the weights started from (a hub
id, a local folder's name, kto_lightning's small Llama-architecture model for what it is) and
what they were trained on (the bundled toy task, a local file's name, a hub dataset id).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kto_lightning.common.hub import looks_local
from kto_lightning.data.sources import BUILDERS
from kto_lightning.models.tiny import BUNDLED

TOY_TASK = "kto_lightning's bundled toy task"
# `model.weights` of the built-in model that names the weights the package ships.


def is_hub_id(name: str) -> bool:
    """Whether `name` is a hub id rather than a local path (`models.Pretrained`'s rule)."""
    return not looks_local(name) and not Path(name).expanduser().exists()


def is_hub_dataset(path: str) -> bool:
    """Whether `data.source.path` names a hub dataset (`data.sources.load_source`'s rule)."""
    return path != "toy" and Path(path).suffix.lower() not in BUILDERS and is_hub_id(path)


def section(config: dict[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def target_name(node: dict[str, Any]) -> str:
    return str(node.get("_target_", "")).rsplit(".", 1)[-1]


def built_in_model(model: dict[str, Any]) -> str:
    """kto_lightning's own small Llama (models.TinyLlama), said for what it is: its depth and
    where its weights came from (a random init, the package's toy model, a weights file)."""
    layers = model.get("num_layers", 2)
    kind = f"a {layers}-layer Llama-architecture model"
    weights = model.get("weights")
    if weights == BUNDLED:
        return f"{kind} that kto_lightning ships, pretrained on its toy task"
    if isinstance(weights, str) and weights:
        return f"{kind} of kto_lightning, with the weights of `{Path(weights).name}`"
    return f"{kind} initialised at random in kto_lightning"


def base_model_name(config: dict[str, Any]) -> str:
    """The base model in a few words: a hub id, a local folder's name, an earlier run's model,
    or kto_lightning's built-in model described."""
    model = section(config, "model")
    name = model.get("name_or_path")
    if isinstance(name, str) and name:
        return name if is_hub_id(name) else f"the local model `{Path(name).name}`"
    if isinstance(model.get("run_dir"), str):  # models.FromRun
        return f"the model of the kto_lightning run `{Path(model['run_dir']).name}`"
    if target_name(model) == "TinyLlama":
        return built_in_model(model)
    return "a causal language model"


def task_name(config: dict[str, Any]) -> str | None:
    """The data in a few words: the bundled toy task, a hub dataset id, a local file's name;
    None when the config records no data source."""
    path = section(section(config, "data"), "source").get("path")
    if not isinstance(path, str) or not path:
        return None
    if path == "toy":
        return TOY_TASK
    return path if is_hub_dataset(path) else f"`{Path(path).name}`"


def card_title(config: dict[str, Any], method: str) -> str:
    """`<base model> trained with <method> on <task>`: a hub id as it is written (`gpt2`), any
    other base as a phrase with its first letter a capital."""
    base = base_model_name(config)
    if base == section(config, "model").get("name_or_path"):
        title = f"{base} trained with {method}"
    else:
        title = f"{base[0].upper()}{base[1:]}, trained with {method}"
    task = task_name(config)
    return title if task is None else f"{title} on {task}"
