"""Validation under DDP scores every row once: two CPU processes report what one process does.

Lightning's default `DistributedSampler` pads the validation set to a multiple of the world size,
so with an odd number of rows one row is scored twice. The runs below hold 15 validation rows.
The module's reference point is a mean over each *global* batch, so the two runs group the rows
alike: one process takes batches of 6 rows, two processes 3 rows each, and rank r's rows are
r::2, so global batch k of both runs is rows 6k..6k+5 (the last one rows 12..14).

Each run is this file run as a script: it builds the real run (`kto_lightning.cli.run_build.build`),
moves policy and reference apart with seeded noise (so that rewards, the reference point and
the AUROC are not trivially 0, 0 and 0.5) and calls `trainer.validate`. Under DDP, Lightning
starts the second rank by running the same script again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

COMMON = [
    "data.source.toy_rows=150", "model.weights=null", "trainer.accelerator=cpu", "callbacks=none",
    "~logger",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
]  # fmt: skip
SINGLE = ["trainer.devices=1", "data.batching.eval_batch_size=6"]
TWO_RANKS = ["strategy=ddp", "trainer.devices=2", "data.batching.eval_batch_size=3"]
# Depends on how rows fall into batches (each pads to its longest row), not on what is scored.
BATCHING_ONLY = {"val/padding"}


def _launch(folder: Path, overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(folder / "hf_home")}
    folder.mkdir()
    return subprocess.Popen(
        [sys.executable, __file__, str(folder), *COMMON, *overrides],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[dict[str, float], str]]:
    """(validation metrics, console output) of each run."""
    folder = tmp_path_factory.mktemp("ddp_validation")
    # Both at once: most of each run is start-up, which overlaps well on two cores.
    processes = {name: _launch(folder / name, extra) for name, extra in
                 (("single", SINGLE), ("two_ranks", TWO_RANKS))}  # fmt: skip
    results = {}
    for name, process in processes.items():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"{name}:\n{output[-3000:]}"
        metrics = json.loads((folder / name / "metrics.json").read_text())
        results[name] = (metrics, output)
    return results


def test_two_processes_validate_each_row_once(runs) -> None:
    (single, _), (two_ranks, _) = runs["single"], runs["two_ranks"]
    assert single["val/count/desirable"] + single["val/count/undesirable"] == 15
    assert single["val/kl"] > 0, "the reference point must be non-zero to be tested"
    assert 0.6 < single["val/rewards/auroc"] < 0.95
    assert set(single) == set(two_ranks)
    differ = {
        key: (single[key], two_ranks[key])
        for key in sorted(set(single) - BATCHING_ONLY)
        if two_ranks[key] != pytest.approx(single[key], rel=1e-6, abs=1e-5)
    }
    assert not differ, f"(one process, two processes): {differ}"


def test_lightning_keeps_the_validation_sampler(runs) -> None:
    # Lightning warns when it puts its own (padding) DistributedSampler into validation.
    _, output = runs["two_ranks"]
    assert "Using `DistributedSampler` with the dataloaders" not in output


def _validate(folder: Path, overrides: list[str]) -> None:
    """One run: build, move policy and reference apart, validate; rank 0 writes the metrics."""
    import torch
    from hydra import compose, initialize_config_dir

    from kto_lightning.cli.config_files import config_dir
    from kto_lightning.cli.run_build import build

    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={folder}", *overrides])
    run = build(cfg)
    # The same seeded noise on every rank. This seed and scale give z_ref > 0 and an AUROC of
    # about 0.88: neither trivial 0.5 nor saturated 1, so a row scored twice would move it.
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for model in (run.module.reference.model, run.module.policy):
            for parameter in model.parameters():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    (metrics,) = run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
    if run.trainer.is_global_zero:
        values = {k: float(v) for k, v in metrics.items() if k.startswith("val/")}
        (folder / "metrics.json").write_text(json.dumps(values))


if __name__ == "__main__":
    _validate(Path(sys.argv[1]), sys.argv[2:])
