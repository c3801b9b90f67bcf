"""The command line of generate, export and plot: `key=value` overrides of a dataclass schema.

Train and evaluate are Hydra apps, whose keys compose into configs and sweeps; the other three
commands take the same grammar, so that one way of writing arguments serves all five:
`python -m kto_lightning.generate ckpt_path=outputs/kto/runs/<time> prompt="Hi" compare=true`.

Each command's options are one dataclass whose fields carry a one-line doc
(`field(metadata={"doc": ...})`). A value is converted to the field's type (`64`, `0.7`, `true`,
`null`); a list field takes `[a,b]` or one item. An unknown key, a `--flag` of the old style or a
value of the wrong type is a `ConfigError` that names the key and the valid ones. This module
imports no torch, so that `--help` prints at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from omegaconf import ListConfig, OmegaConf

from kto_lightning.errors import ConfigError

T = TypeVar("T")
HELP_FLAGS = ("--help", "-h")


def doc(text: str, default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a one-line doc for --help (`default` MISSING: required)."""
    return dataclasses.field(default=default, metadata={"doc": text})


def _inner(hint: Any) -> tuple[Any, bool]:
    """The type a hint holds, and whether None is allowed (`int | None`: int, True)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return rest[0], type(None) in args
    return hint, False


def _convert(key: str, raw: str, hint: Any) -> Any:
    """`raw` as the type `hint` names; ConfigError naming `key=raw` when it is not one."""
    kind, optional = _inner(hint)
    if optional and raw in ("null", "None", ""):
        return None
    if typing.get_origin(kind) is list:
        if raw.startswith("["):
            items = OmegaConf.create(raw)  # YAML's flow list, as Hydra reads `[a,b]`
            if not isinstance(items, ListConfig):
                raise ConfigError(f"{key}={raw}: not a list; write {key}=[a,b] or {key}=one")
            return [str(item) for item in items]
        return [raw]
    if kind is bool:
        if raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        raise ConfigError(f"{key}={raw}: expected true or false")
    if kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw}: expected a number ({kind.__name__})") from None
    return raw


def _fields(schema: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(schema)}


def _refuse_flag(arg: str, schema: type, command: str) -> typing.NoReturn:
    """The old `--flag value` style: the message names the new `key=value` form."""
    name, _, value = arg.removeprefix("--").partition("=")
    key = name.replace("-", "_")
    fields = _fields(schema)
    hint = None
    if key in fields:
        flag = typing.get_type_hints(schema)[key] is bool and not value
        hint = f"{key}=" + ("true" if flag else value or "...")
    if name.startswith("no-") and name[3:].replace("-", "_") in _fields(schema):
        hint = f"{name[3:].replace('-', '_')}=false"
    elif (
        key not in _fields(schema)
        and name == "no-chat-template"
        and "chat_template" in _fields(schema)
    ):
        hint = "chat_template=false"
    advice = f" (here: {hint})" if hint else f"; valid keys: {', '.join(_fields(schema))}"
    raise ConfigError(
        f"{arg}: {command} takes key=value arguments, not --flags{advice}; see {command} --help"
    )


def parse(schema: type[T], argv: Sequence[str], command: str) -> T:
    """The options `argv` (`key=value` strings) set, over the schema's defaults.

    Raises:
        ConfigError: an unknown key (naming the valid ones), an old-style `--flag`, a value of
            the wrong type, or a required key left unset.
    """
    fields = _fields(schema)
    hints = typing.get_type_hints(schema)
    values: dict[str, Any] = {}
    for arg in argv:
        if arg.startswith("-"):
            _refuse_flag(arg, schema, command)
        key, equals, raw = arg.partition("=")
        if not equals:
            raise ConfigError(
                f"{arg!r}: {command} takes key=value arguments; did you mean "
                f"{next(iter(fields))}={arg}?"
            )
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            maybe = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(
                f"{key}: {command} has no such key; {maybe}valid keys: {', '.join(fields)}"
            )
        value = _convert(key, raw, hints[key])
        if typing.get_origin(_inner(hints[key])[0]) is list and key in values:
            value = [*values[key], *value]  # prompt=a prompt=b: both
        values[key] = value
    missing = [
        name
        for name, f in fields.items()
        if name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{missing[0]} must be set: {fields[missing[0]].metadata['doc']}")
    return schema(**values)


def _type_name(hint: Any) -> str:
    kind, optional = _inner(hint)
    name = "list" if typing.get_origin(kind) is list else getattr(kind, "__name__", str(kind))
    return f"{name} | null" if optional else name


def help_text(schema: type, command: str, summary: str, examples: Sequence[str]) -> str:
    """--help: the summary, the grammar, each key with its type, default and one-line doc."""
    hints = typing.get_type_hints(schema)
    lines = [f"usage: {command} key=value ...", "", summary, "", "keys:"]
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            default = (
                "null"
                if f.default is None
                else str(f.default).lower()
                if isinstance(f.default, bool)
                else repr(f.default)
                if isinstance(f.default, str)
                else str(f.default)
            )
        elif f.default_factory is not dataclasses.MISSING:
            default = str(f.default_factory())
        else:
            default = "required"
        lines.append(f"  {f.name}={_type_name(hints[f.name])}  (default: {default})")
        lines.append(f"      {f.metadata.get('doc', '')}")
    lines += ["", "examples:", *(f"  {example}" for example in examples)]
    return "\n".join(lines)


def wants_help(argv: Sequence[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in argv)


def print_help(text: str) -> None:
    """Print a command's --help; a reader that stops early (`--help | head`) ends it quietly
    instead of with a BrokenPipeError traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def read_options(
    schema: type[T], argv: Sequence[str] | None, command: str, summary: str, examples: Sequence[str]
) -> T | int:
    """`parse`, for an entry point's `main`: the options, or the exit status once --help is
    printed (0) or a ConfigError is printed as one line `error: ...` (1)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if wants_help(args):
        print_help(help_text(schema, command, summary, examples))
        return 0
    try:
        return parse(schema, args, command)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
