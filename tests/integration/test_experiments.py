"""Experiment tooling: sweeps, W&B offline, TensorBoard, gradient accumulation (plots:
test_plot.py)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import torch

from cli import train_in_process
from kto_lightning.cli.run_build import build
from kto_lightning.cli.run_fit import train


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    wandb = {"WANDB_MODE": "offline", "WANDB_DIR": str(cwd)}
    return train_in_process(*args, cwd=cwd, env=wandb)


FAST = ["debug=fast", "data.source.toy_rows=160", "trainer.limit_val_batches=1"]


def test_a_sweep_records_every_job_and_survives_a_failing_and_a_diverging_one(tmp_path) -> None:
    secrets = ("+foo_token=abc123xyz", "+my_password=12345678")
    result = _cli(
        "-m", "loss.beta=0.1,-1", "optimizer.lr=3e-4,1e30", *FAST, *secrets,
        f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = tmp_path / "sweep"
    with open(sweep / "sweep_results.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    # Hydra writes the values back in its own spelling: 3e-4 as 0.0003, 1e30 as 1e+30.
    status = {tuple(row["overrides"].split()[:2]): row for row in rows}
    assert [row["job"] for row in rows] == ["0", "1", "2", "3"]
    assert status["loss.beta=0.1", "optimizer.lr=0.0003"]["status"] == "completed"
    assert status["loss.beta=0.1", "optimizer.lr=1e+30"]["status"] == "diverged"
    assert "non-finite" in status["loss.beta=0.1", "optimizer.lr=1e+30"]["message"]
    for lr in ("0.0003", "1e+30"):
        failed = status["loss.beta=-1", f"optimizer.lr={lr}"]
        assert failed["status"] == "failed" and "loss.beta must be > 0" in failed["message"]
    completed = status["loss.beta=0.1", "optimizer.lr=0.0003"]
    run = Path(completed["run_dir"])
    assert run.parent == sweep and run.name.startswith("0_") and "loss.beta=0.1" in run.name
    record = json.loads((run / "objective.json").read_text())
    assert record["objective"] == completed["objective"] == "val/rewards/auroc"
    assert 0.0 <= record["value"] <= 1.0 and float(completed["value"]) == record["value"]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert "sweep: 4 jobs (1 completed, 1 diverged, 2 failed)" in result.stdout + result.stderr
    # Secrets: not in a folder name, a row, a file under the sweep or a line of output.
    assert all("***" in row["overrides"] and "token" not in row["run_dir"] for row in rows)
    for text in (result.stdout, result.stderr):
        assert "abc123xyz" not in text and "12345678" not in text
    for path in sweep.rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert b"abc123xyz" not in content and b"12345678" not in content, path


def test_optuna_search_in_a_sqlite_study_marks_a_diverged_trial_failed(tmp_path) -> None:
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path}/study.db"
    result = _cli(
        "hparams_search=optuna", "hydra.sweeper.n_trials=3", f"hydra.sweeper.storage={storage}",
        "optimizer.lr=choice(3e-4,1e30)", *FAST,
        f"hydra.sweep.dir={tmp_path}/search", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    best = (tmp_path / "search" / "optimization_results.yaml").read_text()
    assert "best_value" in best and "loss.beta" in best
    study = optuna.load_study(study_name="kto", storage=storage)
    states = {trial.params["optimizer.lr"]: trial.state.name for trial in study.trials}
    assert len(study.trials) == 3 and states == {3e-4: "COMPLETE", 1e30: "FAIL"}, states


def test_tensorboard_logger_writes_events(make_config, tmp_path) -> None:
    train(make_config("logger=tensorboard"))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "csv" / "metrics.csv").is_file()


@pytest.mark.parametrize("estimator", ["batch", "zero"])
def test_two_accumulated_micro_batches_equal_one_batch(make_config, estimator) -> None:
    """One optimizer step with SGD: weights move by lr * gradient, so equal weights mean equal
    gradients. The first 8 rows of the shuffled order are the same for both batch sizes."""
    common = [
        f"loss.estimator={estimator}", "optimizer=sgd", "optimizer.momentum=0",
        "optimizer.lr=0.5", "~scheduler", "trainer.max_steps=1", "trainer.limit_val_batches=0",
        "validate_before_training=false", "callbacks=none", "trainer.gradient_clip_val=null",
    ]  # fmt: skip
    weights = []
    for overrides in (
        ["data.batching.batch_size=8", "trainer.accumulate_grad_batches=1"],
        ["data.batching.batch_size=4", "trainer.accumulate_grad_batches=2"],
    ):
        cfg = make_config(*common, *overrides)
        run = build(cfg)
        if estimator == "zero":
            # Away from the reference, so the rewards are not 0 and the loss is not flat.
            generator = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for p in run.module.policy.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=generator))
        before = {k: v.clone() for k, v in run.module.policy.state_dict().items()}
        run.trainer.fit(run.module, datamodule=run.datamodule)
        assert run.trainer.global_step == 1
        after = run.module.policy.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)
        weights.append(after)
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=0, atol=1e-6)
