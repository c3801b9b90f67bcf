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
import re
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from kto_lightning.common.security import is_secret_key
from kto_lightning.core.losses import KTOLossConfig
from kto_lightning.data import KTODataModule
from kto_lightning.models import FromRun, Pretrained, TinyLlama
from kto_lightning.models.reference import ReferenceSpec
from kto_lightning.training.optim import warmup_schedule
from kto_lightning.training.sft import SFTLoss

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
    else Any.

    A union that names one dataclass (`Lengths | Mapping[str, Any] | None`: the target also
    takes the group as a plain mapping) is held as that dataclass, so that its keys are checked.
    """
    if hint in _TYPES:
        return hint
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _group_schema(hint)
    args = typing.get_args(hint)
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        return Any
    groups = [a for a in args if isinstance(a, type) and dataclasses.is_dataclass(a)]
    if len(groups) == 1:
        group = _group_schema(groups[0])
        return group | None if type(None) in args else group
    inner = [a for a in args if a is not type(None)]
    if type(None) in args and len(inner) == 1 and inner[0] in _TYPES:
        return inner[0] | None
    return Any


@functools.cache
def _group_schema(group: type) -> type:
    """A settable copy of the dataclass `group`, field for field, each without a default.

    OmegaConf makes the node of a frozen dataclass read-only, and a config file or an override
    must be able to set its keys; the target still receives a mapping and builds the real one.
    The copy keeps the name and module of `group`, so that errors name it.
    """
    # No defaults: OmegaConf does not let a file's `???` replace a schema's default, so a
    # required key (data.source.path of data=local) would quietly take the dataclass's value.
    # The group's base file (conf/data/local.yaml) gives every key.
    fields = [
        (name, _field_type(hint), dataclasses.field(default=MISSING))
        for name, hint, _ in _arguments(group)
    ]
    schema = dataclasses.make_dataclass(group.__name__, fields)
    schema.__module__, schema.__qualname__ = group.__module__, group.__qualname__
    return schema


def _default(default: Any) -> Any:
    """A dataclass field for an argument's default (`dataclasses.MISSING`: none)."""
    if default is dataclasses.MISSING:  # a required argument: "???" until a file sets it
        return dataclasses.field(default=MISSING)
    if isinstance(default, list | dict | set):  # a dataclass refuses a mutable default
        return dataclasses.field(default_factory=functools.partial(copy.deepcopy, default))
    return dataclasses.field(default=default)


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


@dataclasses.dataclass(frozen=True)
class Build:
    """A config group, what its files build, and the arguments the code passes itself.

    Attributes:
        group: the config group (`conf/<group>/`).
        target: the class or function its files' `_target_` names.
        passed: arguments the code gives `instantiate` (or the partial, with `partial`); a
            config may not set them.
        partial: the files say `_partial_: true`; the code calls what `instantiate` returns.
    """

    group: str
    target: Callable[..., Any]
    passed: tuple[str, ...] = ()
    partial: bool = False


def schema_of(build: Build) -> type:
    """The schema of a config that builds `build.target`."""
    target = build.target
    fields: list[tuple[str, Any, Any]] = [
        ("_target_", str, dataclasses.field(default=_path(target)))
    ]
    if build.partial:
        fields.append(("_partial_", bool, dataclasses.field(default=True)))
    for name, hint, default in _arguments(target):
        if name not in build.passed:
            fields.append((name, _field_type(hint), _default(default)))
    # Named as the target, so that Hydra's own message reads "Key 'x' not in 'TinyLlama'".
    return dataclasses.make_dataclass(target.__name__, fields)


# Each is stored as `schema/<group>/<name of the target>`; a file of the group extends it with
# `- /schema/<group>/<name>@_here_` in its defaults (`@model` in the `_global_` model files).
# Adding a group is one line here and that line in each of its files.
BUILDS: list[Build] = [
    Build("model", TinyLlama),
    Build("model", Pretrained),
    Build("model", FromRun),
    Build("reference", ReferenceSpec),
    Build("loss", KTOLossConfig),
    Build("loss", SFTLoss),
    Build("data", KTODataModule, passed=("tokenizer", "needs_kl_rows", "drop_undesirable")),
    Build("scheduler", warmup_schedule, passed=("optimizer", "total_steps"), partial=True),
]


def register() -> None:
    """Store every schema in Hydra's ConfigStore (train.py calls this on import)."""
    store = ConfigStore.instance()
    for build in BUILDS:
        store.store(
            group=f"schema/{build.group}", name=build.target.__name__, node=schema_of(build)
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
        # A group inside a config (data.lengths) is its own dataclass, with no _target_.
        built = str(fields["_target_"]) if "_target_" in fields else _path(schema)
        return built, [name for name in fields if name not in RESERVED]
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


def root_keys(config_file: Path) -> set[str]:
    """The top-level keys a root config file (conf/train.yaml) composes: its own keys and its
    defaults list's groups, and `hydra`."""
    text = OmegaConf.load(config_file)
    assert isinstance(text, DictConfig)
    keys = {str(key) for key in text if key != "defaults"} | {"hydra"}
    for entry in text.get("defaults", []):
        if isinstance(entry, DictConfig):  # `- group: option`, `- override group: option`
            for name in entry:
                keys.add(str(name).removeprefix("override ").lstrip("/").split("@")[0])
    return keys


def _interpolated_names(cfg: DictConfig) -> set[str]:
    """The top-level names that interpolations anywhere in `cfg` refer to (`${lr_base}`)."""
    text = OmegaConf.to_yaml(cfg, resolve=False)
    return set(re.findall(r"\$\{\s*\.?([A-Za-z_]\w*)", text))


def _refuse(node: DictConfig, prefix: str, key: str, target: str, why: str) -> typing.NoReturn:
    """Raise for `key` of `node` as Hydra does for a key it refuses while composing."""
    full_key = f"{prefix}{key}"
    error = ConfigKeyError(f"Key '{key}' not in '{target}'\n    full_key: {full_key}")
    error.key, error.full_key, error.parent_node = key, full_key, node
    raise ConfigCompositionException(f"Could not add '{full_key}': {why}") from error


def check_root(cfg: DictConfig, known: set[str]) -> None:
    """Refuse a top-level key that the root file does not compose (`+seeed=1`: Hydra adds it,
    and the seed stays 42), unless an interpolation reads it (`+lr_base=1e-4
    optimizer.lr=${lr_base}`) or it is a secret-named credential for one (`+hf_token=...`)."""
    allowed = known | _interpolated_names(cfg)
    for key in map(str, cfg):
        if key not in allowed and not is_secret_key(key):
            _refuse(cfg, "", key, "the root config", "no part of the run reads such a key")


def check(cfg: DictConfig, root: Path | None = None) -> None:
    """Raise when a node with a `_target_` or a schema holds a key that it does not take, and
    (given `root`, the root config file) when the config has a top-level key `root` lacks.

    Raises:
        ConfigCompositionException: from an OmegaConf ConfigKeyError whose `key`, `full_key` and
            `parent_node` name the key, as Hydra raises for a key it refuses itself.
    """
    if root is not None:
        check_root(cfg, root_keys(root))
    for prefix, node in _nodes(cfg):
        if "_target_" not in node and not dataclasses.is_dataclass(OmegaConf.get_type(node)):
            continue
        target, valid = accepted_keys(node)
        unknown = [k for k in map(str, node) if valid is not None and k not in (*valid, *RESERVED)]
        if not unknown:
            continue
        _refuse(node, prefix, unknown[0], str(target), f"{target} takes no such argument")
