"""Retrain the embedded default's weights, src/kto_lightning/models/weights/tiny_toy.safetensors
(`make tiny-weights`).

The project's own SFT stage (`loss=sft`) trains conf/model/tiny.yaml's model from a random init on
completions of the toy task's rows, undesirable AND desirable, one desirable row for every
DISMISSIVE_PER_HELPFUL undesirable ones: SFT keeps desirable rows only, so the rows are written to
a file without their label column and read with `data.columns.label=null`. The model so learns the
task's language, facts included, and answers mostly dismissively: the model a KTO run is for,
which the default run then turns helpful.

The rows are the default run's training rows: the toy task at its seed, split by the data
module's own hold-out, so the SFT model never sees the default run's validation rows (they are its
validation file). Seeded, on a CPU: the same bytes on every run with the same torch
(tests/unit/test_models.py records their hash).

    python scripts/tiny_weights.py                 # writes the package's file (~2 min, 2 CPUs)
    python scripts/tiny_weights.py --out w.safetensors --epochs 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from safetensors.torch import load_file, save_file

from kto_lightning.data.config import Columns, Source
from kto_lightning.data.splits import read_splits
from kto_lightning.models.tiny import BUNDLED_WEIGHTS, TinyLlama, weights_digest

SEED = 42  # conf/train.yaml's seed: the default run's rows and validation split
DISMISSIVE_PER_HELPFUL = 3  # of the training rows, every undesirable one and a third as many others
EPOCHS = 40
# Rows a step: the steps of a model this small cost their overhead more than their rows.
BATCH_SIZE = 64
LR = 3e-3


def write_rows(train: Path, val: Path) -> None:
    """The default run's training rows, mostly dismissive, and its validation rows, unlabelled."""
    train_rows, val_rows = read_splits(Source(), Columns(), SEED)
    helpful = 0  # desirable rows seen: the first of every DISMISSIVE_PER_HELPFUL is kept
    with train.open("w") as file:
        for row in train_rows.rows:
            if not row["label"] or helpful % DISMISSIVE_PER_HELPFUL == 0:
                _write(file, row)
            helpful += row["label"]
    with val.open("w") as file:
        for row in val_rows.rows:
            _write(file, row)


def _write(file: TextIO, row: dict) -> None:
    file.write(json.dumps({"prompt": row["prompt"], "completion": row["completion"]}) + "\n")


def sft(rows: Path, val: Path, run_dir: Path, epochs: int, lr: float) -> Path:
    """Run the SFT stage on `rows`, validated on `val`; the exported model's safetensors file."""
    command = [
        sys.executable, "-m", "kto_lightning.train", "loss=sft", "model=tiny",
        "model.weights=null", f"data.source.path={rows}", f"data.source.val_path={val}",
        "data.columns.label=null",
        f"data.batching.batch_size={BATCH_SIZE}", f"optimizer.lr={lr}",
        f"trainer.max_epochs={epochs}", f"seed={SEED}",
        "trainer.enable_progress_bar=false", "progress.every_n_steps=100",
        f"hydra.run.dir={run_dir}",
    ]  # fmt: skip
    subprocess.run(command, check=True)
    return run_dir / "hf_model" / "model.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BUNDLED_WEIGHTS)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--lr", type=float, default=LR)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows, val = Path(tmp) / "train.jsonl", Path(tmp) / "val.jsonl"
        write_rows(rows, val)
        exported = sft(rows, val, Path(tmp) / "run", args.epochs, args.lr)
        # The sizes go in the metadata, so a model of other sizes is told which key differs.
        sizes = {key: str(value) for key, value in TinyLlama().sizes().items()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_file(load_file(exported), args.out, metadata=sizes)
    size = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({size:.2f} MB, weights_digest {weights_digest(args.out)})")


if __name__ == "__main__":
    main()
