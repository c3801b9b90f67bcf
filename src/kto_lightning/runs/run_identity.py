"""What makes two runs the same run, and how two run configs differ: the keys a resume compares
(`DEFINING`, `SHAPE`, `SCHEDULE`), the differences named as `key: saved -> current`, and the data
files whose bytes changed at the same path (resume.py reads a checkpoint and decides with them).
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from kto_lightning.common.security import REDACTED, is_secret_key
from kto_lightning.data.config import Source, as_group
from kto_lightning.data.data_files import DATA_FILES_KEY, data_files
from kto_lightning.models.reference import configured_kind
from kto_lightning.runs.run_records import DATA_COUNTS_KEY

# What makes two runs the same run (dotted config keys).
DEFINING = (
    "task_name",
    "seed",
    "model",
    "data",
    "loss",
    "optimizer",
    "scheduler",
    "reference",
    "trainer.precision",
    "trainer.accumulate_grad_batches",
    "trainer.max_epochs",
    "trainer.max_steps",
)
# Settings under DEFINING that change how a run is carried out, not what it computes.
NOT_DEFINING = (
    "data.batching.num_workers",
    "data.source.num_proc",
    "data.source.cache_dir",
    "data.source.lock_timeout",
    "data.source.test_path",  # read by kto_lightning.evaluate only
    "data.source.test_split",
    "reference.cache_dir",
    "reference.batch_size",
)
# What the shapes and names of a checkpoint's weights follow: a checkpoint of another model (or
# of a LoRA adapter where this run trains all weights) cannot be loaded.
SHAPE = ("model", "reference")
# What a resumed run restores from the checkpoint instead of taking from the config.
SCHEDULE = (
    "optimizer",
    "scheduler",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.accumulate_grad_batches",
    "data.batching.batch_size",
)


def config_value(config: dict[str, Any], key: str) -> Any:
    """The value at dotted `key` of a run config; None where it has none."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    """`value` as {dotted key: leaf}, secret-named keys left out (their values are redacted)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            if not is_secret_key(str(key)):
                out.update(_flat(inner, f"{prefix}.{key}"))
        return out
    return {prefix: value}


def _with_resolved_reference(config: dict[str, Any]) -> dict[str, Any]:
    """`reference.kind: auto` as what it became (adapter with model.lora, else copy): a run saved
    with `copy` and the same run under the `auto` default are one run."""
    reference = config.get("reference")
    if not isinstance(reference, dict) or "kind" not in reference:
        return config
    lora = (config.get("model") or {}).get("lora")
    kind = configured_kind(str(reference["kind"]), lora)
    return {**config, "reference": {**reference, "kind": kind}}


def differences(current: dict[str, Any], saved: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """The dotted keys under `keys` whose values differ, as `key: saved -> current`."""
    current, saved = _with_resolved_reference(current), _with_resolved_reference(saved)
    changed = []
    for key in keys:
        now, then = _flat(config_value(current, key), key), _flat(config_value(saved, key), key)
        for name in sorted(set(now) | set(then)):
            if name in NOT_DEFINING:
                continue
            if now.get(name) != then.get(name) and REDACTED not in (now.get(name), then.get(name)):
                changed.append(f"{name}: {then.get(name)!r} -> {now.get(name)!r}")
    return changed


def current_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved values of the keys that define a run, as a checkpoint stores them."""
    out: dict[str, Any] = {}
    for key in DEFINING:
        value = OmegaConf.select(cfg, key)
        if isinstance(value, DictConfig):
            value = OmegaConf.to_container(value, resolve=True)
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


def current_data_files(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """What the local data files `cfg` names hold now (`data_files`), read before the data is."""
    return data_files(as_group(Source, OmegaConf.select(cfg, "data.source"), "source"))


def _rows(saved: dict[str, Any]) -> str:
    """How many rows a run config says its run trained on, for a message; "" if it does not."""
    counts = (saved.get(DATA_COUNTS_KEY) or {}).get("train")
    if not isinstance(counts, dict):
        return ""
    return f"; it trained on {sum(int(n) for n in counts.values())} rows"


def data_changes(
    current: dict[str, Any], files: dict[str, dict[str, Any]], saved: dict[str, Any]
) -> list[str] | None:
    """The data files that hold other bytes than when `saved` (a run config) was trained, as
    `key=value: its contents changed (blake2b old, N bytes -> new, M bytes)`; None when `saved`
    records no files (a checkpoint of an older kto_lightning).

    Only where the key's value is the same: a changed `data.source.path` is a changed key, which
    `differences` reports.
    """
    recorded = saved.get(DATA_FILES_KEY)
    if not isinstance(recorded, dict):
        return None
    changed = []
    for key in sorted(set(recorded) | set(files)):
        if config_value(current, key) != config_value(saved, key):
            continue
        then, now = recorded.get(key) or {}, files.get(key) or {}
        if then.get("blake2b") == now.get("blake2b"):
            continue
        where = now.get("file") or then.get("file") or config_value(current, key)
        rows = _rows(saved) if key == "data.source.path" else ""  # the training rows' count
        changed.append(
            f"{key}={config_value(current, key)!r} ({where}): its contents changed since the "
            f"checkpoint (blake2b {_short(then)} -> {_short(now)}{rows})"
        )
    return changed


def _short(entry: dict[str, Any]) -> str:
    if not entry:
        return "none: no such file"
    return f"{str(entry.get('blake2b'))[:12]}, {int(entry.get('bytes', 0)):,} bytes"
