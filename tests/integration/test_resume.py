"""A run killed with SIGKILL, or stopped with SIGTERM, mid-epoch resumes to exactly the
uninterrupted run's result; Ctrl-C saves and says how to resume."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cli import train_in_process

STEPS_PER_EPOCH = 18  # 144 training rows of the 160-row toy task, batch 8
COMMON = [
    "data.source.toy_rows=160",
    "data.batching.batch_size=8",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "callbacks.last_checkpoint.every_n_train_steps=5",
    "callbacks.generations.num_prompts=0",
    "validate_before_training=false",
]


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "kto_lightning.train", *COMMON, *args]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}


def _run(tmp_path: Path, *args: str) -> None:
    """A run to its end, in this process: the uninterrupted run, a resume (only the interrupted
    launches need a process of their own, to be signalled or killed)."""
    result = train_in_process(*COMMON, *args, cwd=tmp_path)
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


def _train_rows_if_any(run_dir: Path) -> dict[int, dict[str, float]]:
    try:
        return _train_rows(run_dir)
    except (FileNotFoundError, KeyError, ValueError):  # not written yet, or mid-write
        return {}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run, shared by the tests below: its run directory."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    _run(folder, f"hydra.run.dir={folder}/whole")
    return folder / "whole"


def _wait_for_a_checkpoint(process: subprocess.Popen, run_dir: Path) -> None:
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoints" / "last.ckpt").exists():
        assert process.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() < deadline, "no checkpoint at step 5"
        time.sleep(0.02)


def _assert_resumed_equals(whole: Path, resumed: Path, resumed_at: int) -> None:
    expected_weights = _weights(whole / "checkpoints" / "last.ckpt")
    resumed_weights = _weights(resumed / "checkpoints" / "last.ckpt")
    assert set(expected_weights) == set(resumed_weights)
    for key in expected_weights:
        torch.testing.assert_close(
            resumed_weights[key], expected_weights[key], rtol=0, atol=1e-6, msg=key
        )
    # The resumed run goes on in the same run directory: one metrics.csv holds every step once,
    # those logged before the interruption and after it, equal to the uninterrupted run's.
    expected, got = _train_rows(whole), _train_rows(resumed)
    steps = list(range(1, 2 * STEPS_PER_EPOCH + 1))  # a row's step: the optimizer step it made
    assert sorted(got) == steps, "each optimizer step, no gap"
    with open(resumed / "csv" / "metrics.csv") as handle:
        loss_rows = [int(row["step"]) for row in csv.DictReader(handle) if row["train/loss"]]
    assert sorted(loss_rows) == steps, "and each step once"
    for step, values in got.items():
        for name, value in values.items():
            assert abs(value - expected[step][name]) <= 1e-6 or (value != value), (step, name)
    assert any(step < resumed_at for step in got) and any(step > resumed_at for step in got)


def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path, whole) -> None:
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        _command(f"hydra.run.dir={killed}"), cwd=tmp_path, env=_env(tmp_path),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    # The metrics up to a checkpoint's step reach metrics.csv one batch after it (Lightning hands
    # a batch's metrics to the loggers after the hook that saves): kill once step 5's row is there.
    _wait_for_a_checkpoint(process, killed)
    deadline = time.monotonic() + 120
    while 5 not in _train_rows_if_any(killed):
        assert process.poll() is None and time.monotonic() < deadline, "no row of step 5"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    latest = killed / "checkpoints" / "last.ckpt"
    resumed_at = torch.load(latest, map_location="cpu", weights_only=True)["global_step"]
    assert resumed_at % STEPS_PER_EPOCH > 0, "the checkpoint must be from the middle of an epoch"

    _run(tmp_path, f"resume={latest}", f"hydra.run.dir={tmp_path}/resumed")
    _assert_resumed_equals(whole, killed, resumed_at)
    assert not (tmp_path / "resumed" / "checkpoints").exists(), "only this launch's log is there"


def test_sigterm_mid_epoch_saves_the_step_and_resumes_exactly(tmp_path, whole) -> None:
    stopped = tmp_path / "stopped"
    process = subprocess.Popen(
        _command(f"hydra.run.dir={stopped}", "+hub_token=abc123xyz"), cwd=tmp_path,
        env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_for_a_checkpoint(process, stopped)
    # Not at the step the period saved (5): a signal there saves that same step. Step 6's row
    # reaches metrics.csv during step 7.
    deadline = time.monotonic() + 120
    while 6 not in _train_rows_if_any(stopped):
        assert process.poll() is None and time.monotonic() < deadline, "no row of step 6"
        time.sleep(0.01)
    saved_before = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    checkpoint = stopped / "checkpoints" / "last.ckpt"
    step = torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
    assert step > saved_before["global_step"], "saved at the step it was stopped, not the period"
    assert step % STEPS_PER_EPOCH > 0, "stopped in the middle of an epoch"
    assert f"training stopped by SIGTERM at step {step}, saved to {checkpoint}" in stderr
    [command] = [line.strip() for line in stderr.splitlines() if "resume=" in line]
    assert command.endswith(f"resume={checkpoint}") and "hub_token=***" in command
    assert "abc123xyz" not in stderr
    assert not list((stopped / "checkpoints").glob(".*.partial"))

    # resume=auto finds it: the only checkpoint of this run's config under the task's folder.
    _run(tmp_path, "resume=auto", f"hydra.run.dir={tmp_path}/resumed")
    _assert_resumed_equals(whole, stopped, step)


def test_ctrl_c_saves_after_the_step_and_exits_130(tmp_path) -> None:
    stopped = tmp_path / "stopped"
    process = subprocess.Popen(
        _command(f"hydra.run.dir={stopped}"), cwd=tmp_path, env=_env(tmp_path),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    _wait_for_a_checkpoint(process, stopped)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    checkpoint = stopped / "checkpoints" / "last.ckpt"
    step = torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
    assert f"training stopped by SIGINT at step {step}, saved to {checkpoint}" in stderr
    assert "press Ctrl-C again to stop at once without saving" in stdout + stderr
    assert "Traceback" not in stderr
