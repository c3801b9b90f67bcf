"""Config schemas: which keys a config group takes, checked by Hydra while it composes the config.

A schema is a dataclass with `_target_` (and `_partial_` for a factory the code calls later) and
one field per argument of the class or function the group builds, derived from it so the two
cannot drift apart. `register()` stores each in Hydra's ConfigStore as
`schema/<group>/<target's name>`, and a YAML file of the group extends it in its defaults list:

    defaults:
      - /schema/loss/KTOLossConfig@_here_     # `@model` in the `_global_` model files
      - _self_

Hydra then refuses, while composing, a key of that file or of a `group.key=value` override that
the schema lacks, and a value of the wrong type (a `float` field refuses "abc"). A type that
OmegaConf cannot hold as such (a union such as `float | str`, a free-form dict) becomes `Any` and
is left to the target's own validation.

Hydra adds a key given as `+group.key=value` even to a structured config (by design:
facebookresearch/hydra#1549), so `check` applies the same rule to the composed config: every node
with a `_target_`, against its schema, or against the target's arguments where no schema applies.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from kto_lightning.losses import KTOLossConfig
from kto_lightning.models import Pretrained, TinyLlama
from kto_lightning.optim import warmup_schedule
from kto_lightning.reference import ReferenceSpec

# Keys Hydra's `instantiate` reads itself; no target takes them as arguments.
RESERVED = ("_target_", "_partial_", "_args_", "_recursive_", "_convert_")
# Field types OmegaConf checks as they read (optionally None); any other becomes Any. A dict
# stays Any: its keys are free-form (`model.lora` holds peft's arguments), and Hydra cannot add
# `+model.lora.r=16` below an Optional[dict] field that is None.
_TYPES = (bool, int, float, str)


def _path(target: Callable[..., Any]) -> str:
    return f"{target.__module__}.{target.__qualname__}"


def _field_type(hint: Any) -> Any:
    """`hint` where OmegaConf can hold it as such (a scalar or a dataclass, optional or not),
    else Any."""
    if hint in _TYPES or dataclasses.is_dataclass(hint):
        return hint
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1 and (inner[0] in _TYPES or dataclasses.is_dataclass(inner[0])):
            return inner[0] | None
    return Any


def _arguments(target: Callable[..., Any]) -> Iterator[tuple[str, Any, Any]]:
    """(name, type hint, default or dataclasses.MISSING) of each argument a config may set."""
    if dataclasses.is_dataclass(target):
        hints = typing.get_type_hints(target)
        for f in dataclasses.fields(target):
            if f.init:
                default = f.default
                if f.default_factory is not dataclasses.MISSING:
                    default = f.default_factory()
                yield f.name, hints.get(f.name, Any), default
        return
    try:
        signature = inspect.signature(target, eval_str=True)
    except NameError:  # an annotation names what only a type checker imports: take it as Any
        signature = inspect.signature(target)
    for name, parameter in signature.parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise TypeError(f"{_path(target)} takes **kwargs: no schema can list its keys")
        hint = Any if isinstance(parameter.annotation, str) else parameter.annotation
        default = dataclasses.MISSING if parameter.default is parameter.empty else parameter.default
        yield name, hint, default


def schema_of(target: Callable[..., Any], called_with: tuple[str, ...] = ()) -> type:
    """The schema of a config that builds `target`.

    Args:
        target: the class or function its `_target_` names.
        called_with: arguments the code passes when it calls the partial (`_partial_: true`);
            a config may not set them.
    """
    fields: list[tuple[str, Any, Any]] = [
        ("_target_", str, dataclasses.field(default=_path(target)))
    ]
    if called_with:
        fields.append(("_partial_", bool, dataclasses.field(default=True)))
    for name, hint, default in _arguments(target):
        if name in called_with:
            continue
        if default is dataclasses.MISSING:  # a required argument: "???" until a file sets it
            value = dataclasses.field(default=MISSING)
        elif isinstance(default, list | dict | set):  # a dataclass refuses a mutable default
            value = dataclasses.field(default_factory=functools.partial(copy.deepcopy, default))
        else:
            value = dataclasses.field(default=default)
        fields.append((name, _field_type(hint), value))
    # Named as the target, so that Hydra's own message reads "Key 'x' not in 'TinyLlama'".
    return dataclasses.make_dataclass(target.__name__, fields)


# (config group, what its files build, arguments the code passes when it calls a partial).
# Each is stored as `schema/<group>/<name of the target>`; a file of the group extends it with
# `- /schema/<group>/<name>@_here_` in its defaults (`@model` in the `_global_` model files).
# Adding a group, data say, is one line here and that line in each of its files.
BUILDS: list[tuple[str, Callable[..., Any], tuple[str, ...]]] = [
    ("model", TinyLlama, ()),
    ("model", Pretrained, ()),
    ("reference", ReferenceSpec, ()),
    ("loss", KTOLossConfig, ()),
    ("scheduler", warmup_schedule, ("optimizer", "total_steps")),
]


def register() -> None:
    """Store every schema in Hydra's ConfigStore (train.py calls this on import)."""
    store = ConfigStore.instance()
    for group, target, called_with in BUILDS:
        store.store(
            group=f"schema/{group}", name=target.__name__, node=schema_of(target, called_with)
        )


def accepted_keys(node: DictConfig) -> tuple[str | None, list[str] | None]:
    """What `node` builds (None for a plain section), and the keys it takes (None: unknown).

    A node typed by a schema takes its fields; one with a `_target_`, the target's arguments
    (None when it takes **kwargs or cannot be imported: `instantiate` will say why); a plain
    section, the keys it has.
    """
    schema = OmegaConf.get_type(node)
    if isinstance(schema, type) and dataclasses.is_dataclass(schema):
        fields = {f.name: f.default for f in dataclasses.fields(schema)}
        return str(fields["_target_"]), [name for name in fields if name not in RESERVED]
    if "_target_" not in node or OmegaConf.is_interpolation(node, "_target_"):
        return None, [str(key) for key in node if key not in RESERVED]
    try:
        target = get_object(node["_target_"])
        return _path(target), [name for name, _, _ in _arguments(target)]
    except Exception:  # not importable, no signature, or **kwargs
        return str(node["_target_"]), None


def _nodes(node: DictConfig, prefix: str = "") -> Iterator[tuple[str, DictConfig]]:
    """(dotted path, node) of `node` and of every dict below it; interpolations and `???`
    values are left unread."""
    yield prefix, node
    for key in map(str, node):
        if OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
            continue
        if isinstance(node[key], DictConfig):
            yield from _nodes(node[key], f"{prefix}{key}.")


def check(cfg: DictConfig) -> None:
    """Raise when a node with a `_target_` holds a key its schema or target does not take.

    Raises:
        ConfigCompositionException: from an OmegaConf ConfigKeyError whose `key`, `full_key` and
            `parent_node` name the key, as Hydra raises for a key it refuses itself.
    """
    for prefix, node in _nodes(cfg):
        if "_target_" not in node:
            continue
        target, valid = accepted_keys(node)
        unknown = [k for k in map(str, node) if valid is not None and k not in (*valid, *RESERVED)]
        if not unknown:
            continue
        key, full_key = unknown[0], f"{prefix}{unknown[0]}"
        error = ConfigKeyError(f"Key '{key}' not in '{target}'\n    full_key: {full_key}")
        error.key, error.full_key, error.parent_node = key, full_key, node
        raise ConfigCompositionException(
            f"Could not add '{full_key}': {target} takes no such argument"
        ) from error
