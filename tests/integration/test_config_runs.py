"""Every trainer and strategy config runs a few steps on CPU, overriding only what names a GPU.

A config that crashes at its first step (bf16-mixed with a fused optimizer and clipping did) must
never land: each file below trains, validates and writes a checkpoint here. The DeepSpeed files
cannot run on a CPU (Lightning's DeepSpeedStrategy needs CUDA); they must stop at once with one
clear message instead.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from cli import train_cli, train_in_process
from kto_lightning.cli.config_files import config_dir
from kto_lightning.cli.hf_export import export_checkpoint
from kto_lightning.cli.run_build import build
from kto_lightning.cli.run_fit import train

TRAINERS = sorted(p.stem for p in (config_dir() / "trainer").glob("*.yaml"))
STRATEGIES = sorted(p.stem for p in (config_dir() / "strategy").glob("*.yaml"))
# Strategies that run as 2 CPU processes here; `auto` (the default) runs in every trainer case.
MULTI_PROCESS_STRATEGIES = ("ddp", "fsdp")
GPU_ONLY_STRATEGIES = {"deepspeed_stage2", "deepspeed_stage3"}
LORA_HEAD = "{r: 4, target_modules: [q_proj, lm_head]}"


def test_every_strategy_file_is_covered_here() -> None:
    assert set(STRATEGIES) == {"auto", *MULTI_PROCESS_STRATEGIES} | GPU_ONLY_STRATEGIES
    assert {"cpu", "default", "gpu"} <= set(TRAINERS)


@pytest.mark.parametrize("name", TRAINERS)
def test_trainer_config_trains_on_cpu(make_config, name: str) -> None:
    overrides = [f"trainer={name}", "trainer.accelerator=cpu", "trainer.devices=1"]
    cfg = make_config(*overrides)
    assert cfg.strategy._args_ == ["auto"]
    run = build(cfg)
    weights = {n: p.detach().clone() for n, p in run.module.policy.named_parameters()}
    objective = train(cfg, run=run)
    assert run.trainer.global_step > 0
    assert objective is not None and math.isfinite(objective)
    moved = [n for n, p in run.module.policy.named_parameters() if not torch.equal(p, weights[n])]
    assert moved, "no weight changed"
    # What the file asks for is what ran: gpu.yaml's bf16 autocast with fused AdamW and clipping.
    assert run.trainer.precision == cfg.trainer.precision
    assert run.trainer.gradient_clip_val == cfg.trainer.gradient_clip_val > 0
    assert run.trainer.optimizers[0].param_groups[0]["fused"]


def test_scratch_model_trains_at_the_sizes_of_edifice(make_config) -> None:
    # model=scratch: Edifice.Meta.KTO build/1's defaults, two training steps on CPU.
    # ~58M parameters: short rows, and no validation, callbacks, checkpoint or export, to keep
    # it to seconds (`python -m kto_lightning.train model=scratch debug=fast` takes minutes).
    cfg = make_config(
        "model=scratch", "data.batching.batch_size=2", "data.lengths.max_length=64",
        "data.lengths.max_prompt_length=32", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=0", "validate_before_training=false", "objective=null",
        "callbacks=none", "+trainer.enable_checkpointing=false", "export.enabled=false",
    )  # fmt: skip
    run = build(cfg)
    config = run.module.policy.config
    sizes = (
        config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
        config.vocab_size, config.max_position_embeddings, config.intermediate_size,
    )  # fmt: skip
    assert sizes == (512, 6, 8, 32000, 2048, 2048)
    # The file's dropout of 0.1 is zeroed by model.disable_dropout (true), as TRL does.
    assert cfg.model.dropout == 0.1 and config.attention_dropout == 0.0
    weights = {n: p.detach().clone() for n, p in run.module.policy.named_parameters()}
    train(cfg, run=run)
    assert run.trainer.global_step == 2
    moved = [n for n, p in run.module.policy.named_parameters() if not torch.equal(p, weights[n])]
    assert moved, "no weight changed"


def test_scratch_model_keeps_its_dropout_when_asked(make_config) -> None:
    cfg = make_config("model=scratch", "model.disable_dropout=false", fast=False)
    assert instantiate(cfg.model).load_policy().config.attention_dropout == 0.1


def _final_validation(run_dir: Path) -> dict[str, str]:
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    return [row for row in rows if row.get("val/loss")][-1]


def _check_one_fill_of_the_cache(make_config, run: list[str], folder: Path) -> None:
    """The 2-process run's cache in `folder`: one file, what one process fills for its config."""
    (merged,) = folder.glob("*")  # one file, no partial one left behind
    one_process = [o for o in run if not o.startswith(("strategy=", "trainer.devices="))]
    single = build(
        make_config(
            *one_process, f"reference.cache_dir={folder}_single",
            f"paths.output_dir={folder}_single_run", fast=False,
        )
    )  # fmt: skip
    single.module.setup("fit")  # fills the cache, as `trainer.fit` does
    (filled,) = Path(f"{folder}_single").glob("*")
    assert merged.name == filled.name, "the same content hash on every rank and in one process"
    merged_table, table = load_file(merged), load_file(filled)
    assert merged_table.keys() == table.keys()
    for name, values in table.items():
        torch.testing.assert_close(merged_table[name], values, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", MULTI_PROCESS_STRATEGIES)
def test_strategy_config_trains_on_two_cpu_processes(
    make_config, tmp_path: Path, name: str
) -> None:
    run = [
        f"strategy={name}", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer=gpu",  # bf16-mixed with fused AdamW and clipping, under each strategy
        "debug=fast", "data.source.toy_rows=160", "trainer.max_epochs=2",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "callbacks.model_checkpoint.save_top_k=-1",  # keep the end of epoch 1 for the resume
    ]  # fmt: skip
    if name == "ddp":  # the two ranks fill a reference cache first, each scoring its shard
        run += ["reference=cache", f"reference.cache_dir={tmp_path / 'cache'}"]
    result = train_cli(*run, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "KTO training finished" in output and "4 optimizer steps" in output
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "last.ckpt").exists()
    assert (tmp_path / "run" / "objective.json").is_file()
    if name == "ddp":
        for rank in (1, 2):
            assert f"scores train shard {rank}/2" in output
        _check_one_fill_of_the_cache(make_config, run, tmp_path / "cache")
        return
    # FSDP2 writes sharded checkpoints (a folder per checkpoint, without the frozen reference);
    # resuming from the one at the end of epoch 1 must finish exactly as the run did.
    assert (checkpoints / "best-step2.ckpt" / ".metadata").is_file()
    expected = _final_validation(tmp_path / "run")
    resumed = train_cli(
        *run, f"resume={checkpoints / 'best-step2.ckpt'}", f"hydra.run.dir={tmp_path}/resumed",
        cwd=tmp_path,
    )  # fmt: skip
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    # It goes on in its run directory: metrics.csv keeps steps 1-2 and gets 3-4 again.
    assert not (tmp_path / "resumed" / "checkpoints").exists()
    got = _final_validation(tmp_path / "run")
    assert got["step"] == expected["step"] == "4"
    for key in ("val/loss", "val/rewards/margins", "val/kl", "val/rewards/auroc"):
        assert float(got[key]) == pytest.approx(float(expected[key]), abs=1e-6), key


def test_fsdp_with_a_lora_head_and_adapter_reference_trains_and_exports(tmp_path: Path) -> None:
    # FSDP2 x LoRA (an adapter on the LM head) x reference=adapter x a full checkpoint x export.
    run_dir = tmp_path / "run"
    result = train_cli(
        "strategy=fsdp", "strategy.save_distributed_checkpoint=false", "trainer.accelerator=cpu",
        "trainer.devices=2", "reference=adapter", f"+model.lora={LORA_HEAD}", "debug=fast",
        "data.source.toy_rows=160", f"hydra.run.dir={run_dir}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file(), "a full checkpoint is one file"
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert not any(key.startswith("reference.") for key in state)
    head_b = state["policy.base_model.model.lm_head.lora_B.default.weight"]
    assert head_b.abs().sum() > 0, "the head's adapter starts at zero and must have trained"
    export_checkpoint(checkpoint, tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert "lm_head.weight" in weights and not any("lora" in key for key in weights)


@pytest.mark.parametrize("name", sorted(GPU_ONLY_STRATEGIES))
def test_deepspeed_config_on_cpu_stops_with_one_message(tmp_path: Path, name: str) -> None:
    result = train_in_process(
        f"strategy={name}", "trainer.accelerator=cpu", f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "CUDA GPUs only" in errors[0] and "strategy=fsdp" in errors[0]
    assert "Traceback" not in result.stderr
