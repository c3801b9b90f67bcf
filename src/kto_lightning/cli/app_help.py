"""`--help` of train and evaluate: the config groups with their options, and every key with its
default and one-line doc, in well under a second.

Generated, not written: the groups are the folders of conf/, their options the YAML files; the
keys and defaults are the root file's and its default options' (conf/train.yaml or
conf/evaluate.yaml); a key's doc is its schema's (cli/schemas.py builds each group's schema from
the class its `_target_` names: the `Args:`/`Attributes:` line of that class's docstring, or the
comment on a dataclass field), else the YAML comment on or above the key. The schemas' source is
read with `ast`, not imported: `--help` must not pay for torch, Lightning or transformers.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from kto_lightning.cli.config_location import config_dir

PACKAGE = Path(__file__).resolve().parents[1]  # src/kto_lightning
_ARG = re.compile(r"^\s+([\w, ]+?)(?: \([^)]*\))?: (.+)$")
_KEY = re.compile(r"^(\s*)([\w-]+):(.*)$")


def _first_sentence(text: str, width: int = 110) -> str:
    """The first sentence of `text`, on one line of at most `width` characters."""
    text = " ".join(text.split())
    sentence = re.split(r"(?<=[.;])\s", text, maxsplit=1)[0].rstrip(".;")
    return sentence if len(sentence) <= width else sentence[: width - 3].rstrip() + "..."


def _docstring_args(node: ast.AST) -> dict[str, str]:
    """`name: doc` of the Args:/Attributes: sections of a class's or function's docstring (an
    entry's continuation lines, indented deeper, joined to it)."""
    entries: list[tuple[list[str], list[str]]] = []
    text = ast.get_docstring(node) if isinstance(node, ast.ClassDef | ast.FunctionDef) else None
    section = False
    for line in (text or "").splitlines():
        if line.strip() in ("Args:", "Attributes:"):
            section = True
        elif section and line.strip() and not line.startswith("    "):
            section = False
        elif section and line.startswith("        ") and entries:
            entries[-1][1].append(line.strip())
        elif section and (match := _ARG.match(line)):
            entries.append(([n.strip() for n in match.group(1).split(",")], [match.group(2)]))
    return {name: _first_sentence(" ".join(doc)) for names, doc in entries for name in names}


@functools.cache
def _module_ast(module: str) -> tuple[ast.Module, list[str]] | None:
    """The parsed source of a kto_lightning module (a package: its __init__), and its lines."""
    if not module.startswith("kto_lightning."):
        return None
    base = PACKAGE.joinpath(*module.split(".")[1:])
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    return ast.parse(text), text.splitlines()


def _find(module: str, name: str, depth: int = 0) -> tuple[ast.AST, list[str], str] | None:
    """The definition of `name` in `module`, following `from x import name` re-exports."""
    parsed = _module_ast(module)
    if parsed is None or depth > 3:
        return None
    tree, lines = parsed
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef) and node.name == name:
            return node, lines, module
    for node in tree.body:
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and any(alias.name == name for alias in node.names)
        ):
            return _find(node.module, name, depth + 1)
    return None


def _annotation_classes(annotation: ast.expr | None) -> list[str]:
    return [n.id for n in ast.walk(annotation) if isinstance(n, ast.Name)] if annotation else []


def schema_docs(target: str) -> dict[str, str]:
    """Dotted key -> doc for what `target` (a `_target_` path) takes, nested groups included."""
    module, _, name = target.rpartition(".")
    found = _find(module, name)
    return _docs_of(found, "") if found is not None else {}


def _docs_of(found: tuple[ast.AST, list[str], str], prefix: str, depth: int = 0) -> dict[str, str]:
    node, lines, module = found
    docs = {f"{prefix}{key}": doc for key, doc in _docstring_args(node).items()}
    fields: list[tuple[str, ast.expr | None, int]] = []
    if isinstance(node, ast.ClassDef):
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                fields.append((item.target.id, item.annotation, item.lineno))
            if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                docs |= {f"{prefix}{k}": v for k, v in _docstring_args(item).items()}
                fields += [(a.arg, a.annotation, a.lineno) for a in item.args.args[1:]]
    for key, annotation, lineno in fields:
        comment = lines[lineno - 1].partition("  # ")[2]
        if comment and f"{prefix}{key}" not in docs:
            docs[f"{prefix}{key}"] = _first_sentence(comment)
        for class_name in _annotation_classes(annotation):
            inner = _find(module, class_name)
            if depth < 2 and inner is not None and isinstance(inner[0], ast.ClassDef):
                docs |= _docs_of(inner, f"{prefix}{key}.", depth + 1)
    return docs


def yaml_comments(path: Path, prefix: str = "") -> dict[str, str]:
    """Dotted key -> the comment on its line, else the comment block just above it."""
    docs: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    above: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("#"):
            above.append(line.strip().lstrip("#").strip())
            continue
        match = _KEY.match(line)
        if not match:
            above = []
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([*(k for _, k in stack), key])
        stack.append((indent, key))
        trailing = rest.partition(" # ")[2].strip() if " # " in rest else ""
        doc = trailing or " ".join(above)
        if doc:
            docs[prefix + dotted] = _first_sentence(doc)
        above = []
    return docs


def groups(conf: Path) -> dict[str, list[str]]:
    """Each config group (a folder of conf/) and its options (the YAML files in it)."""
    return {
        folder.name: sorted(path.stem for path in folder.glob("*.yaml"))
        for folder in sorted(conf.iterdir())
        if folder.is_dir() and folder.name != "hydra"
    }


def _load(path: Path) -> DictConfig:
    loaded = OmegaConf.load(path)
    return loaded if isinstance(loaded, DictConfig) else OmegaConf.create({})


def default_options(root: Path) -> dict[str, str | None]:
    """group -> the option the root file's defaults list picks (None: `group: null`)."""
    chosen: dict[str, str | None] = {}
    for entry in _load(root).get("defaults", []):
        if isinstance(entry, DictConfig):
            for group, option in entry.items():
                name = str(group).removeprefix("override ").lstrip("/").split("@")[0]
                chosen[name] = None if option is None else str(option)
    return chosen


def _leaves(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, DictConfig):
        for key in node:
            if str(key) == "defaults":
                continue
            value = node._get_node(key)  # unresolved: `${paths.output_dir}` as written
            child = node[key] if isinstance(value, DictConfig | ListConfig) else value
            yield from _leaves(child, f"{prefix}{key!s}.")
    else:
        value = node._value() if hasattr(node, "_value") else node
        yield prefix.rstrip("."), value


def _targets(node: Any, prefix: str) -> Iterator[tuple[str, str]]:
    """(key prefix, `_target_`) of every node of a loaded file that names one."""
    if isinstance(node, DictConfig):
        target = node._get_node("_target_") if "_target_" in node else None
        if target is not None and isinstance(target._value(), str):
            yield prefix, str(target._value())
        for key in node:
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                yield from _targets(child, f"{prefix}{key!s}.")


def _option_files(conf: Path, group: str, option: str) -> list[tuple[Path, str]]:
    """An option's file, after the files of its group it extends (`defaults: [local]`), each
    with the prefix of its keys (`model.`; none for a `_global_` file)."""
    path = conf / group / f"{option}.yaml"
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    bases = [
        base
        for entry in _load(path).get("defaults", [])
        if isinstance(entry, str) and (base := entry) not in ("_self_",) and "/" not in base
    ]
    files = [f for base in bases for f in _option_files(conf, group, base)]
    return [*files, (path, "" if "@package _global_" in text else f"{group}.")]


def keys(conf: Path, root: Path) -> list[tuple[str, str, str]]:
    """(dotted key, default as YAML writes it, doc) of the root file and its default options."""
    rows: dict[str, tuple[str, str]] = {}
    docs: dict[str, str] = {}
    sources = [(root, "")]
    for group, option in default_options(root).items():
        if option is not None and group != "hydra":
            sources += _option_files(conf, group, option)
    for path, prefix in sources:
        if not path.is_file():
            continue
        loaded = OmegaConf.load(path)
        docs |= yaml_comments(path, prefix)
        # A schema's doc wins over the YAML comment: it is the target's own word.
        for where, target in _targets(loaded, prefix):
            docs |= {f"{where}{k}": v for k, v in schema_docs(target).items()}
        for key, value in _leaves(loaded, prefix):
            if key.rpartition(".")[2].startswith("_"):  # _target_, _partial_: not a setting
                continue
            rows[key] = (_show(value), docs.get(key, ""))
    return [(key, default, doc) for key, (default, doc) in rows.items()]


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def app_help(command: str, config_name: str, summary: str, examples: list[str]) -> str:
    """The --help text of a Hydra entry point whose root config is conf/<config_name>.yaml."""
    conf = config_dir()
    root = conf / f"{config_name}.yaml"
    chosen = default_options(root)
    lines = [
        f"usage: {command} [group=option ...] [key=value ...] [-m for a sweep]",
        "",
        summary,
        "",
        "config groups (group=option; the default in brackets; conf/<group>/<option>.yaml):",
    ]
    for group, options in groups(conf).items():
        if group not in chosen and group != "schema":
            continue
        shown = [f"[{o}]" if o == chosen.get(group) else o for o in options]
        lines.append(f"  {group}: {', '.join(shown)}")
    lines += ["", "keys (key=value; the default after =):"]
    for key, default, doc in keys(conf, root):
        lines.append(f"  {key}={default}" + (f"  # {doc}" if doc else ""))
    lines += [
        "",
        "Hydra's own flags: --hydra-help, --cfg job (the composed config), --info, -m (a sweep)",
        "examples:",
        *(f"  {example}" for example in examples),
    ]
    return "\n".join(lines)
