"""Retrain the embedded default's weights, src/kto_lightning/models/weights/tiny_toy.safetensors
(`make tiny-weights`).

The project's own SFT stage (`loss=sft`) trains conf/model/tiny.yaml's model from a random init on
the completions of the toy task's rows, desirable AND undesirable: SFT keeps desirable rows only,
so the rows are written to a file without their label column and read with
`data.columns.label=null`. The model so learns the task's language and answers either way, helpful
or dismissive; telling them apart is left to KTO, which the default run then shows.

The rows are the default run's (the toy task at its seed), held out as it holds them out: the SFT
model never sees the default run's validation rows. Seeded, on a CPU: the same bytes on every run
with the same torch (tests/unit/test_models.py records their hash).

    python scripts/tiny_weights.py                 # writes the package's file (~4 min, 2 CPUs)
    python scripts/tiny_weights.py --out w.safetensors --epochs 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from kto_lightning.data.toy import toy_rows
from kto_lightning.models.tiny import BUNDLED_WEIGHTS, TinyLlama

SEED = 42  # conf/train.yaml's seed: the default run's rows and validation split
ROWS = 1200  # data.source.toy_rows
EPOCHS = 12
# Rows a step: the steps of a model this small cost their overhead more than their rows.
BATCH_SIZE = 64
LR = 3e-3


def write_rows(path: Path) -> None:
    """The toy task's rows as the default run reads them, without their labels."""
    with path.open("w") as file:
        for row in toy_rows(ROWS, seed=SEED):
            file.write(
                json.dumps({"prompt": row["prompt"], "completion": row["completion"]}) + "\n"
            )


def sft(rows: Path, run_dir: Path, epochs: int, lr: float) -> Path:
    """Run the SFT stage on `rows`; the exported model's safetensors file."""
    command = [
        sys.executable, "-m", "kto_lightning.train", "loss=sft", "model=tiny",
        "model.weights=null", f"data.source.path={rows}", "data.columns.label=null",
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
        rows = Path(tmp) / "toy_completions.jsonl"
        write_rows(rows)
        exported = sft(rows, Path(tmp) / "run", args.epochs, args.lr)
        # The sizes go in the metadata, so a model of other sizes is told which key differs.
        sizes = {key: str(value) for key, value in TinyLlama().sizes().items()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_file(load_file(exported), args.out, metadata=sizes)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
