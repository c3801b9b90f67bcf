"""Experiment tooling: sweeps, W&B offline, TensorBoard, plots, gradient accumulation."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from cli import train_cli
from kto_lightning.plot import FILENAME
from kto_lightning.plot import main as plot_main
from kto_lightning.train import build, train


def _cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    wandb = {"WANDB_MODE": "offline", "WANDB_DIR": str(cwd)}
    return train_cli(*args, cwd=cwd, timeout=timeout, env=wandb)


FAST = ["debug=fast", "data.source.toy_rows=160", "trainer.limit_val_batches=1"]


def test_multirun_gives_each_run_its_directory_and_objective(tmp_path) -> None:
    result = _cli(
        "-m", "loss.beta=0.05,0.1,0.3", *FAST, f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [p.name.split("_", 1)[0] for p in runs] == ["0", "1", "2"]
    for run, beta in zip(runs, ("0.05", "0.1", "0.3"), strict=True):
        assert f"loss.beta={beta}" in run.name
    for run in runs:
        record = json.loads((run / "objective.json").read_text())
        assert record["objective"] == "val/rewards/auroc"
        assert 0.0 <= record["value"] <= 1.0
        assert (run / "checkpoints" / "last.ckpt").is_file()


def test_optuna_search_runs_trials_and_reports_the_best(tmp_path) -> None:
    result = _cli(
        "hparams_search=optuna", "hydra.sweeper.n_trials=2", *FAST,
        f"hydra.sweep.dir={tmp_path}/search", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    best = (tmp_path / "search" / "optimization_results.yaml").read_text()
    assert "best_value" in best and "loss.beta" in best
    assert len(list((tmp_path / "search").glob("*/objective.json"))) == 2


def test_wandb_offline_run_holds_metrics_config_and_generations(tmp_path) -> None:
    result = _cli(
        "logger=wandb", "logger.wandb.offline=true", *FAST, f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, "one offline run directory"
    record = next(offline[0].glob("*.wandb")).read_bytes()
    for name in ("train/loss", "train/rewards/margins", "train/kl", "val/rewards/auroc",
                 "val/loss/desirable", "val/count/undesirable", "val/generations"):  # fmt: skip
        assert name.encode() in record, f"{name} missing from the offline run"
    assert b"desirable_weight" in record, "the resolved config is uploaded"
    # The table is on disk too, for every other logger.
    tables = list((tmp_path / "run" / "generations").glob("step_*.jsonl"))
    assert tables
    rows = [json.loads(line) for line in tables[0].read_text().splitlines()]
    assert len(rows) == 4 and all({"prompt", "generation", "step"} <= set(r) for r in rows)
    # the CSV beside it feeds the plot
    assert (tmp_path / "run" / FILENAME).is_file()


def test_tensorboard_logger_writes_events(make_config, tmp_path) -> None:
    train(make_config("logger=tensorboard"))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "csv" / "metrics.csv").is_file()


def test_plot_shows_the_training_curves(make_config, tmp_path) -> None:
    train(make_config())
    png = tmp_path / FILENAME
    assert png.is_file() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The command redraws it from the saved metrics.
    out = tmp_path / "again.png"
    assert plot_main([str(tmp_path), "--out", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 10_000
    assert plot_main([str(tmp_path / "missing")]) == 1


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
