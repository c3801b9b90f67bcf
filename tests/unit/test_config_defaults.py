"""One source of truth for the config: the YAML and the dataclasses agree on every default, the
always-run callbacks are named where `callbacks=none` is read, and a file that sets another
group's key says so on that line."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from kto_lightning.cli.config_files import config_dir
from kto_lightning.data.config import Batching, Columns, Lengths, Source

CONF = config_dir()
GROUPS = {"source": Source, "columns": Columns, "lengths": Lengths, "batching": Batching}
# The one key conf/data/local.yaml sets apart from the dataclasses, on purpose: a local run
# names its file (???), while KTODataModule(tokenizer) from Python runs the bundled task.
LOCAL_ONLY = {"source.path"}
DATA_FILES = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))


def _written(node: Any, prefix: str = "") -> set[str]:
    """The dotted keys a YAML node writes itself (its defaults list left out)."""
    if not isinstance(node, dict):
        return {prefix.rstrip(".")}
    keys: set[str] = set()
    for key, value in node.items():
        if key != "defaults":
            keys |= _written(value, f"{prefix}{key}.")
    return keys


@pytest.mark.parametrize("name", DATA_FILES)
def test_a_data_file_differs_from_the_dataclass_defaults_only_where_it_writes(
    make_config, name: str
) -> None:
    data = make_config(f"data={name}", fast=False).data
    composed = OmegaConf.to_container(data, resolve=True, throw_on_missing=False)
    assert isinstance(composed, dict)
    written = OmegaConf.to_container(OmegaConf.load(CONF / "data" / f"{name}.yaml"))
    # local.yaml, the base, writes out every key: only LOCAL_ONLY may differ there. A preset
    # changes the keys it writes.
    deliberate = LOCAL_ONLY | (set() if name == "local" else _written(written))
    drifted = [
        f"data.{group}.{field.name}: conf/data/{name}.yaml {composed[group][field.name]!r}, "
        f"{cls.__name__} {field.default!r}"
        for group, cls in GROUPS.items()
        for field in dataclasses.fields(cls)
        if f"{group}.{field.name}" not in deliberate
        and composed[group][field.name] != field.default
    ]
    assert not drifted, "a default declared twice disagrees:\n" + "\n".join(drifted)


def test_local_yaml_writes_out_every_key_of_the_dataclasses() -> None:
    # The file users read lists every setting, so a new field cannot default silently.
    local = OmegaConf.load(CONF / "data" / "local.yaml")
    for group, cls in GROUPS.items():
        assert list(local[group]) == [f.name for f in dataclasses.fields(cls)], group


def test_callbacks_none_runs_only_the_always_run_callbacks_and_names_them(make_config) -> None:
    from kto_lightning.cli.run_build import build

    run = build(make_config("callbacks=none"))
    ours = {
        type(c).__name__ for c in run.trainer.callbacks if type(c).__module__.startswith("kto_")
    }
    optional = OmegaConf.load(CONF / "callbacks" / "default.yaml")
    optional_names = {str(entry._target_).rsplit(".", 1)[-1] for entry in optional.values()}
    assert ours and not ours & optional_names  # none of the group's callbacks
    text = (CONF / "callbacks" / "none.yaml").read_text()
    unnamed = sorted(name for name in ours if not re.search(rf"\b{name}\b", text))
    assert not unnamed, f"conf/callbacks/none.yaml does not say that {unnamed} always run"


# Files whose purpose is to set keys across groups: no note needed on each line.
BUNDLES = {"experiment", "debug", "hparams_search", "hydra"}
GLOBAL_FILES = [
    path
    for path in sorted(CONF.glob("*/*.yaml"))
    if path.parent.name not in BUNDLES and "# @package _global_" in path.read_text()
]


@pytest.mark.parametrize("path", GLOBAL_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_key_of_another_group_is_marked_cross_group_on_its_line(path: Path) -> None:
    group = path.parent.name
    unmarked = []
    for line in path.read_text().splitlines():
        top_level = re.match(r"([A-Za-z_]\w*):", line)
        override = re.match(r"\s*- override /", line)
        sets_another = (top_level and top_level.group(1) not in (group, "defaults")) or override
        if sets_another and "# cross-group:" not in line:
            unmarked.append(line)
    assert not unmarked, f"{path} sets another group's key without '# cross-group:': {unmarked}"
