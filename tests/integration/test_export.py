"""Export to a Hugging Face folder: what `from_pretrained` loads computes what the policy did."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli import command_in_process
from kto_lightning.cli.hf_export import export_checkpoint
from kto_lightning.cli.run_build import build
from kto_lightning.cli.run_fit import train
from kto_lightning.core.logprobs import sequence_logprobs
from kto_lightning.errors import ConfigError

LORA = ["reference=adapter", "+model.lora={r: 4, lora_alpha: 8, target_modules: all-linear}"]
TEXTS = ["Hello, world!", "ünïcödé ✓ and <|eos|> inside", ""]


def _logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return sequence_logprobs(
            model.float(), batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )


def _trained(make_config, tmp_path: Path, *overrides: str):
    """Train a tiny run; returns (run, tokenizer, validation batch, policy logps, checkpoint)."""
    run = build(make_config(*overrides))
    train(make_config(*overrides), run=run)
    batch = next(iter(run.datamodule.val_dataloader()))
    expected = _logps(run.module.policy, batch)
    tokenizer = instantiate(make_config(*overrides).model).load_tokenizer()
    return run, tokenizer, batch, expected, tmp_path / "checkpoints" / "last.ckpt"


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m kto_lightning.export ARGS`, offline, run in this process."""
    return command_in_process("export", *map(str, args), cwd=cwd)


def _assert_hf_folder(out: Path, tokenizer) -> None:
    assert (out / "model.safetensors").is_file()
    assert not list(out.glob("*.bin")), "weights must be safetensors only"
    generation = (out / "generation_config.json").read_text()
    assert f'"eos_token_id": {tokenizer.eos_token_id}' in generation
    reloaded = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert reloaded.apply_chat_template(messages) == tokenizer.apply_chat_template(messages)


def test_full_fine_tune_exports_a_folder_that_reproduces_the_policy(make_config, tmp_path) -> None:
    _, tokenizer, batch, expected, ckpt = _trained(make_config, tmp_path)

    for out in (tmp_path / "api", tmp_path / "cli"):
        if out.name == "api":
            assert export_checkpoint(ckpt, out) == out
        else:
            result = _cli(f"ckpt_path={ckpt}", f"out={out}", cwd=tmp_path)
            assert result.returncode == 0, result.stderr[-3000:]
        _assert_hf_folder(out, tokenizer)
        model = AutoModelForCausalLM.from_pretrained(out)
        torch.testing.assert_close(_logps(model, batch), expected, rtol=0, atol=1e-5)


def test_lora_exports_merged_and_as_adapter(make_config, tmp_path) -> None:
    from peft import PeftModel

    run, tokenizer, batch, expected, ckpt = _trained(make_config, tmp_path, *LORA)
    lora_keys = [k for k in run.module.policy.state_dict() if "lora_" in k]
    before = {k: v.clone() for k, v in run.module.policy.state_dict().items()}

    merged = export_checkpoint(ckpt, tmp_path / "merged")
    _assert_hf_folder(merged, tokenizer)
    assert not (merged / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora_" in k for k in model.state_dict())
    torch.testing.assert_close(_logps(model, batch), expected, rtol=0, atol=1e-4)

    result = _cli(
        f"ckpt_path={ckpt}", f"out={tmp_path / 'adapter'}", "keep_adapter=true", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = tmp_path / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "model.safetensors").exists(), "the base weights are not duplicated"
    # The base the adapter applies to: the untrained model, rebuilt from the config and seed.
    cfg = make_config(*LORA)
    torch.manual_seed(cfg.seed)
    base = instantiate(OmegaConf.merge(cfg.model, {"lora": None})).load_policy()
    with_adapter = PeftModel.from_pretrained(base, adapter)
    torch.testing.assert_close(_logps(with_adapter, batch), expected, rtol=0, atol=1e-4)

    # Both checkpoint layouts export the same model: every policy key, or trainable keys only.
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    trained = run.module.policy.state_dict()
    layouts = {
        "full": {f"policy.{k}": v for k, v in trained.items()},
        "adapters_only": {f"policy.{k}": trained[k] for k in lora_keys},
    }
    for name, state in layouts.items():
        torch.save({**checkpoint, "state_dict": state}, tmp_path / f"{name}.ckpt")
        out = export_checkpoint(tmp_path / f"{name}.ckpt", tmp_path / name)
        model = AutoModelForCausalLM.from_pretrained(out)
        torch.testing.assert_close(_logps(model, batch), expected, rtol=0, atol=1e-4)

    # Exporting never touched the training policy: adapters still there, weights unchanged.
    after = run.module.policy.state_dict()
    assert isinstance(run.module.policy, PeftModel)
    assert all(torch.equal(before[k], after[k]) for k in before)


def _fabricated_checkpoint(make_config, path: Path, drop: str | None = None, extra: bool = False):
    """A checkpoint of an untrained policy, written without training (for the error paths)."""
    cfg = make_config(*LORA)
    state = instantiate(cfg.model).load_policy().state_dict()
    state = {f"policy.{k}": v for k, v in state.items() if drop is None or drop not in k}
    if extra:
        state["policy.not.a.weight"] = torch.zeros(1)
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.save({"state_dict": state, "kto_lightning_config": config, "global_step": 0}, path)
    return path


def test_checkpoints_that_cannot_be_exported_say_why(make_config, tmp_path) -> None:
    no_config = tmp_path / "no_config.ckpt"
    torch.save({"state_dict": {"policy.w": torch.zeros(1)}}, no_config)
    with pytest.raises(ConfigError, match=re.escape(str(no_config))):
        export_checkpoint(no_config, tmp_path / "out")

    unexpected = _fabricated_checkpoint(make_config, tmp_path / "extra.ckpt", extra=True)
    with pytest.raises(ConfigError, match=r"extra.ckpt.*not\.a\.weight"):
        export_checkpoint(unexpected, tmp_path / "out")

    # Base weights present, but trainable adapter weights missing: neither full nor trainable-only.
    partial = _fabricated_checkpoint(make_config, tmp_path / "partial.ckpt", drop="lora_B")
    with pytest.raises(ConfigError, match=r"lacks \d+ trainable weight"):
        export_checkpoint(partial, tmp_path / "out")
    assert not (tmp_path / "out").exists(), "nothing is written when the checkpoint is rejected"


def test_command_line_errors_are_one_line(tmp_path) -> None:
    result = _cli(f"ckpt_path={tmp_path / 'missing.ckpt'}", f"out={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: no checkpoint file at {str(tmp_path / 'missing.ckpt')!r}"
    ]

    help_text = _cli("--help", cwd=tmp_path).stdout
    assert "keep_adapter=bool" in help_text and "checkpoint" in help_text
    for key in ("push_to_hub=str | null", "private=bool", "revision=str | null"):
        assert key in help_text, help_text
