"""Module paths as runs written before the package's reorganisation into layers recorded them.

A run config names classes and functions by module path (`_target_: kto_lightning.losses.
KTOLossConfig`, a logging filter's `(): kto_lightning.security.RedactingFilter`), and a checkpoint
keeps its run config: a checkpoint written before the modules moved into subpackages names them
where they were. `current_paths` rewrites such a config to where they are now, so that resume,
evaluate, generate and export read an old checkpoint as a new one. The table is the move itself:
each flat module and the subpackage it went to.
"""

from __future__ import annotations

from typing import Any

PACKAGE = "kto_lightning"

# Each module that left the package's top level, by the subpackage it moved into.
_MOVED_INTO = {
    "cli": ("config_files", "config_values", "evaluation_target", "guards", "lifecycle", "schemas"),
    "common": ("distributed", "hub", "security"),
    "core": ("class_weights", "logprobs", "losses", "metrics", "packing", "step"),
    "data": ("prompts",),
    "models": ("byte_tokenizer", "reference", "reference_cache"),
    "reporting": ("csv_logger", "model_card", "progress", "sweep_report", "wandb_logging"),
    "runs": (
        "checkpointing", "interrupts", "resume", "run_dir", "run_record", "run_records", "sweeps",
    ),
    "training": ("callbacks", "compiling", "module", "optim", "sft", "strategies"),
}  # fmt: skip

# "kto_lightning.losses" -> "kto_lightning.core.losses", ...
MOVED_MODULES = {
    f"{PACKAGE}.{name}": f"{PACKAGE}.{package}.{name}"
    for package, names in _MOVED_INTO.items()
    for name in names
}


def current_path(path: str) -> str:
    """`path` (a module, or a name in one) with a moved module's old path replaced by its new one;
    any other string as it is."""
    if not path.startswith(f"{PACKAGE}."):
        return path
    module, dot, rest = path.partition(".")[2].partition(".")
    moved = MOVED_MODULES.get(f"{PACKAGE}.{module}")
    return path if moved is None else f"{moved}{dot}{rest}"


def current_paths(config: Any) -> Any:
    """A copy of a run config (dicts, lists, scalars) with every string that names a moved module
    by its old path naming it by its new one (`current_path`)."""
    if isinstance(config, dict):
        return {key: current_paths(value) for key, value in config.items()}
    if isinstance(config, list):
        return [current_paths(value) for value in config]
    if isinstance(config, str):
        return current_path(config)
    return config
