"""The bundled consistency task: the label follows the prompt, validation objects are unseen."""

from __future__ import annotations

import json
import re
from pathlib import Path

from kto_lightning.data.toy import consistency_rows

STATED = re.compile(r"keeps a (\w+) in the")


def test_the_desirable_answer_names_the_stated_object_and_the_other_does_not() -> None:
    rows = consistency_rows(400, "train", seed=3)
    assert sum(row["label"] for row in rows) == 200
    for row in rows:
        stated = STATED.search(row["prompt"]).group(1)
        answered = STATED.search(row["completion"]).group(1)
        assert (answered == stated) is row["label"]
        # Same words and shape either way: only the object differs.
        statement = row["prompt"].split(".")[0] + "."
        assert STATED.sub("", row["completion"]) == STATED.sub("", statement)


def test_validation_objects_never_appear_in_training_whatever_the_seed() -> None:
    def objects(rows: list[dict]) -> set[str]:
        return {STATED.search(r["prompt"] + r["completion"]).group(1) for r in rows} | {
            STATED.search(r["completion"]).group(1) for r in rows
        }

    train = objects(consistency_rows(2000, "train", seed=0))
    for seed in (0, 1):
        assert not train & objects(consistency_rows(250, "validation", seed=seed))
    assert consistency_rows(10, "train", seed=0) == consistency_rows(10, "train", seed=0)


def test_the_task_file_trains_and_validates_on_its_unseen_objects(make_config) -> None:
    from kto_lightning.cli.run_fit import train

    cfg = make_config("data=toy_consistency", "validate_before_training=false")
    assert cfg.data.source.path == "toy_consistency"
    train(cfg)
    metrics = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text()
    header = metrics.splitlines()[0].split(",")
    assert "val/count/desirable" in header and "train/loss" in header
    objective = json.loads((Path(cfg.paths.output_dir) / "objective.json").read_text())
    assert 0.0 <= objective["value"] <= 1.0
