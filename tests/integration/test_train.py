"""The entry point end to end on a tiny model, on CPU."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from cli import train_in_process
from kto_lightning.cli.run_build import build
from kto_lightning.cli.run_fit import train
from kto_lightning.errors import ConfigError
from kto_lightning.models import TinyLlama
from kto_lightning.models.byte_tokenizer import byte_level_tokenizer

METRICS = [
    "loss",
    "loss/desirable",
    "loss/undesirable",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "kl",
    "logps/chosen",
    "logps/rejected",
    "count/desirable",
    "count/undesirable",
]


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _logged_columns(run_dir: Path) -> set[str]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    # A column counts as logged when at least one row has a value for it.
    return {k for row in rows for k, v in row.items() if v not in ("", None)}


def test_training_moves_the_policy_only_logs_every_metric_and_its_checkpoint_resumes(
    make_config, tmp_path
) -> None:
    run = build(make_config())
    policy_before = _snapshot(run.module.policy)
    reference_before = _snapshot(run.module.reference)

    objective = train(make_config(), run=run)

    policy_after = run.module.policy.state_dict()
    changed = [k for k in policy_before if not torch.equal(policy_before[k], policy_after[k])]
    assert len(changed) == len(policy_before), "every policy tensor should have moved"
    for key, value in run.module.reference.state_dict().items():
        torch.testing.assert_close(value, reference_before[key], rtol=0, atol=0)
    assert all(not p.requires_grad for p in run.module.reference.parameters())
    assert not run.module.reference.training

    optimizer = run.trainer.optimizers[0]
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in run.module.policy.parameters()}
    assert not optimized & {id(p) for p in run.module.reference.parameters()}

    checkpoint = torch.load(
        tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    keys = checkpoint["state_dict"].keys()
    assert not [k for k in keys if k.startswith("reference.")]
    assert {f"policy.{k}" for k in policy_after} == set(keys)

    columns = _logged_columns(tmp_path)
    for stage in ("train", "val"):
        missing = [m for m in METRICS if f"{stage}/{m}" not in columns]
        assert not missing, f"{stage} metrics not logged: {missing}"
    assert {"val/rewards/auroc", "val/rewards/accuracy"} <= columns
    assert objective is not None and 0.0 <= objective <= 1.0

    # The checkpoint restores the policy and keeps the reference (one training run for both).
    trained = _snapshot(run.module.policy)

    fresh = build(make_config("trainer.max_epochs=2"))
    reference = _snapshot(fresh.module.reference)
    fresh.trainer.fit(
        fresh.module,
        datamodule=fresh.datamodule,
        ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"),
    )
    # Resumed from the end of epoch 1, trained one more epoch: the policy moved on from `trained`,
    # while the reference is the rebuilt one, untouched by loading.
    for key, value in fresh.module.reference.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)
    moved = fresh.module.policy.state_dict()
    assert any(not torch.equal(trained[k], moved[k]) for k in trained)
    assert fresh.trainer.global_step == 2 * run.trainer.global_step


def test_last_checkpoint_is_the_final_state_and_names_say_which_is_which(
    make_config, tmp_path, caplog
) -> None:
    # 3 epochs of 6 steps, last.ckpt every 4 steps: neither the best (AUROC saturates early) nor
    # the periodic save is at the final step.
    cfg = make_config("trainer.max_epochs=3", "callbacks.last_checkpoint.every_n_train_steps=4")
    run = build(cfg)
    with caplog.at_level("INFO", logger="kto_lightning"):
        train(cfg, run=run)
    checkpoints = tmp_path / "checkpoints"
    names = sorted(p.name for p in checkpoints.iterdir())
    [best] = [n for n in names if n.startswith("best-step")]
    assert names == sorted([best, "last.ckpt"]), "no -v1 copies, no temporary files"

    def step(name: str) -> int:
        return torch.load(checkpoints / name, weights_only=True, map_location="cpu")["global_step"]

    assert step("last.ckpt") == run.trainer.global_step == 18
    assert step(best) == int(best.removeprefix("best-step").removesuffix(".ckpt"))
    score = run.trainer.checkpoint_callback.best_model_score
    assert f"best checkpoint: {checkpoints / best} (val/rewards/auroc {float(score):.4f})" in (
        caplog.text
    )
    assert f"last checkpoint: {checkpoints / 'last.ckpt'}" in caplog.text


def test_a_run_stopped_mid_epoch_by_max_steps_validates_at_its_end(make_config, tmp_path) -> None:
    # FAST trains 6 batches an epoch; max_steps=3 stops in the middle of the first.
    cfg = make_config("trainer.max_steps=3", "validate_before_training=false")
    run = build(cfg)
    value = train(cfg, run=run)
    assert run.trainer.global_step == 3
    assert value == run.trainer.callback_metrics["val/rewards/auroc"].item()
    assert (tmp_path / "objective.json").is_file()


def test_a_run_without_validation_batches_warns_and_returns_no_objective(
    make_config, caplog
) -> None:
    with caplog.at_level("WARNING", logger="kto_lightning"):
        value = train(make_config("trainer.limit_val_batches=0", "validate_before_training=false"))
    assert value is None
    assert "no validation batch ran (trainer.limit_val_batches=0)" in caplog.text


def test_apo_zero_and_batch_estimator_train(make_config) -> None:
    for overrides in (["loss=apo_zero_unpaired"], ["loss.estimator=batch"]):
        run = build(make_config(*overrides, "callbacks=none"))
        run.datamodule.setup("fit")
        batch = next(iter(run.datamodule.train_dataloader()))
        assert "kl_input_ids" not in batch, "no KL rows are built when no estimator needs them"
        before = _snapshot(run.module.policy)
        assert train(make_config(*overrides), run=run) is not None
        after = run.module.policy.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)


def test_local_pretrained_model_trains(make_config, tmp_path) -> None:
    model_dir = tmp_path / "saved_model"
    torch.manual_seed(0)
    TinyLlama(hidden_size=32, num_layers=1).load_policy().save_pretrained(model_dir)
    byte_level_tokenizer().save_pretrained(model_dir)

    run = build(make_config("model=local", f"model.name_or_path={model_dir}"))
    assert run.module.policy.config.hidden_size == 32
    before = _snapshot(run.module.policy)
    train(make_config("model=local", f"model.name_or_path={model_dir}"), run=run)
    after = run.module.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_command_line_runs_and_prints_the_summary(tmp_path) -> None:
    result = train_in_process(
        "debug=fast", "data.source.toy_rows=160", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "KTO training finished" in output
    assert "validation reward AUROC" in output
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "run" / ".hydra" / "config.yaml").is_file()


def test_unreachable_hub_model_stops_with_one_clear_message(tmp_path) -> None:
    result = train_in_process(
        "model=llama1b", "loss.beta=0.1", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "model.name_or_path='TinyLlama/TinyLlama-1.1B-Chat-v1.0'" in result.stderr
    assert "HF_HUB_OFFLINE" in result.stderr


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("loss.beta=-1", "loss.beta"),
        ("data.lengths.max_prompt_length=200", "data.lengths.max_prompt_length"),
    ],
)
def test_invalid_values_stop_with_the_key_named(tmp_path, override: str, key: str) -> None:
    result = train_in_process(override, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert key in result.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=abc", "seed must be an integer >= 0, got 'abc'"),
        ("seed=1.5", "seed must be an integer >= 0, got 1.5"),
        (
            "trainer.accumulate_grad_batches=0",
            "trainer.accumulate_grad_batches must be an integer >= 1, got 0",
        ),
    ],
)
def test_settings_that_cannot_run_stop_with_one_message(
    make_config, override: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        build(make_config(override))
    assert str(caught.value) == message
