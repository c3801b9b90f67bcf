"""QLoRA (`model.quantization`): the settings and the BitsAndBytesConfig they build, the one-line
stops (no LoRA, no bitsandbytes, a frozen copy of quantized weights), and, where bitsandbytes
quantizes on the CPU, a few steps of QLoRA training end to end."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from cli import train_in_process
from conftest import FAST
from kto_lightning.common import extras
from kto_lightning.errors import ConfigError
from kto_lightning.models import Pretrained, apply_lora
from kto_lightning.models.byte_tokenizer import BYTE_VOCAB_SIZE, byte_level_tokenizer
from kto_lightning.models.quantizing import Quantization, parse_quantization
from kto_lightning.models.reference import AdapterReference, ReferenceSpec, build_provider

LORA = "+model.lora={r: 4, lora_alpha: 8, target_modules: all-linear}"
# FAST's settings of model=tiny's keys do not apply to model=local.
FAST_LOCAL = [o for o in FAST if not o.startswith("model.")]


def _bitsandbytes_quantizes_on_cpu() -> bool:
    if not extras.installed("bitsandbytes"):
        return False
    import bitsandbytes

    return "cpu" in getattr(bitsandbytes, "supported_torch_devices", ())


ON_CPU = pytest.mark.skipif(
    not _bitsandbytes_quantizes_on_cpu() or torch.cuda.is_available(),
    reason="needs bitsandbytes with its CPU backend (pip install bitsandbytes), and no GPU",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama saved as a Hugging Face folder, with the byte-level tokenizer beside it."""
    folder = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        tie_word_embeddings=False, bos_token_id=256, eos_token_id=257, pad_token_id=258,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder


def _local(model_dir: Path, *more: str) -> list[str]:
    return [*FAST_LOCAL, "model=local", f"model.name_or_path={model_dir}", *more]


# ---------------------------------------------------------------------------- settings


FOUR_BIT = {"load_in_4bit": True, "bnb_4bit_use_double_quant": True}
EIGHT_BIT = {"load_in_8bit": True, "load_in_4bit": False}


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        (
            "nf4",
            FOUR_BIT | {"bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16},
        ),
        ("fp4", FOUR_BIT | {"bnb_4bit_quant_type": "fp4"}),
        ("int8", EIGHT_BIT),
        (
            {"quant_type": "fp4", "double_quant": False, "compute_dtype": "float16"},
            FOUR_BIT
            | {"bnb_4bit_use_double_quant": False, "bnb_4bit_compute_dtype": torch.float16},
        ),
        ({"bits": 8}, EIGHT_BIT),
    ],
)
def test_each_setting_builds_its_bitsandbytes_config(written, expected) -> None:
    quantization = parse_quantization(written)
    assert quantization is not None
    config = quantization.bnb_config()
    assert isinstance(config, BitsAndBytesConfig)
    assert {key: getattr(config, key) for key in expected} == expected
    assert parse_quantization(None) is None


@pytest.mark.parametrize(
    ("written", "named"),
    [
        ("nf5", "model.quantization='nf5' is not a preset"),
        ({"bitz": 4}, "model.quantization.bitz is not a quantization setting"),
        ({"bits": 3}, "model.quantization.bits must be 4 or 8, got 3"),
        ({"quant_type": "int4"}, "model.quantization.quant_type must be one of"),
        ({"compute_dtype": "fp8"}, "model.quantization.compute_dtype must be one of"),
        (4, "model.quantization must be null, a preset"),
    ],
)
def test_a_bad_setting_names_its_key(written, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_quantization(written)
    assert named in str(info.value)


def test_the_composed_config_takes_a_preset_and_a_mapping(make_config, model_dir) -> None:
    preset = make_config(*_local(model_dir, "model.quantization=nf4"))
    assert preset.model.quantization == "nf4"
    mapping = make_config(*_local(model_dir, "model.quantization={bits: 8}"))
    assert parse_quantization(mapping.model.quantization) == Quantization(bits=8)


# ------------------------------------------------------------------------------- one-line stops


def _one_line_error(result) -> str:
    assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return errors[0]


def test_a_missing_bitsandbytes_stops_with_the_pip_command(monkeypatch, model_dir, tmp_path):
    real = extras.installed
    monkeypatch.setattr(
        extras, "installed", lambda module: module != "bitsandbytes" and real(module)
    )
    result = train_in_process(*_local(model_dir, "model.quantization=nf4", LORA), cwd=tmp_path)
    line = _one_line_error(result)
    assert "model.quantization=nf4 needs the bitsandbytes package" in line
    assert 'pip install -e ".[bitsandbytes]"' in line


def test_quantization_without_lora_is_refused_naming_the_keys(monkeypatch, model_dir, tmp_path):
    monkeypatch.setattr(extras, "installed", lambda module: True)  # with or without the package
    result = train_in_process(*_local(model_dir, "model.quantization={bits: 8}"), cwd=tmp_path)
    line = _one_line_error(result)
    assert "model.quantization={bits: 8} freezes the model's weights in 8 bits" in line
    assert "set model.lora too" in line and "model.quantization=null" in line


def test_a_frozen_copy_of_quantized_weights_is_refused_and_auto_picks_the_adapters() -> None:
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    model = LlamaForCausalLM(LlamaConfig(**sizes, num_attention_heads=2, vocab_size=300))
    policy = apply_lora(model, {"r": 4, "target_modules": "all-linear"})
    # What transformers records on a model it loaded quantized.
    policy.config.quantization_config = Quantization().bnb_config()
    tokenizer = byte_level_tokenizer()
    with pytest.raises(ConfigError) as info:
        build_provider(ReferenceSpec(kind="copy"), policy, tokenizer, None, 64, True)
    assert "reference=copy with model.quantization" in str(info.value)
    assert "use reference=adapter" in str(info.value)
    auto = build_provider(ReferenceSpec(kind="auto"), policy, tokenizer, None, 64, True)
    assert isinstance(auto, AdapterReference)


# ------------------------------------------------------------------------ QLoRA on the CPU


def _train_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [float(r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss")]


# Lean: the CPU's 4-bit kernels are ~10x slower than float32 ones at these sizes.
LEAN = [
    "validate_before_training=false", "callbacks=none", "data.batching.batch_size=4",
    "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "optimizer.lr=1e-2",
]  # fmt: skip


@ON_CPU
def test_qlora_trains_the_adapters_on_frozen_4bit_weights(
    make_config, model_dir, tmp_path, caplog
) -> None:
    import bitsandbytes as bnb

    from kto_lightning.cli.run_build import build
    from kto_lightning.cli.run_fit import train

    overrides = _local(model_dir, "model.quantization=nf4", LORA, *LEAN)
    with caplog.at_level(logging.INFO, logger="kto_lightning"):
        run = build(make_config(*overrides))
    policy = run.module.policy
    quantized = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 2 * 7, "every linear layer of both decoder layers in 4 bits"
    assert isinstance(run.module.reference, AdapterReference)
    assert "reference: adapter (reference=auto" in caplog.text
    assert not policy.is_gradient_checkpointing, "on only when gradient_checkpointing=true"
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    adapters = {k: v.clone() for k, v in policy.state_dict().items() if "lora_B" in k}

    run.module.train()
    batch = next(iter(run.datamodule.train_dataloader()))
    with torch.no_grad():
        start = run.module.forward_logps(batch, "train")
    # The adapters start at zero: at step 0 the policy is exactly its reference.
    torch.testing.assert_close(start.reference, start.policy, rtol=0, atol=0)

    train(make_config(*overrides), run=run)
    losses = _train_losses(tmp_path)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    after = policy.state_dict()
    assert any(not torch.equal(after[k], adapters[k]) for k in adapters), "the adapters trained"
    with torch.no_grad():
        end = run.module.forward_logps(batch, "train")
    # The quantized base never trains, nor drifts (bitsandbytes' CPU repacking is off): the
    # reference computes what it computed before training, checkpoints taken between.
    torch.testing.assert_close(end.reference, start.reference, rtol=0, atol=0)
    assert not torch.allclose(end.policy, end.reference)
    # A quantized base is exported as its adapter (merge_lora is on by default): merged, the
    # adapters would be rounded into 4-bit weights.
    exported = tmp_path / "hf_model"
    assert (exported / "adapter_config.json").is_file(), "the run's export saved the adapter"
    assert not (exported / "model.safetensors").exists()


@pytest.mark.skipif(
    _bitsandbytes_quantizes_on_cpu()
    or torch.cuda.is_available()
    or not extras.installed("bitsandbytes"),
    reason="for a bitsandbytes without a CPU backend, on a machine without a GPU",
)
def test_a_device_bitsandbytes_cannot_quantize_on_says_so(model_dir) -> None:
    source = Pretrained(str(model_dir), quantization="nf4", lora={"r": 4})
    with pytest.raises(Exception) as info:
        source.load_policy()
    assert "cannot quantize the model on this machine's CPU" in str(info.value)
