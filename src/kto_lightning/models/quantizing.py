"""QLoRA: a model's weights loaded in 4 or 8 bits through bitsandbytes (`model.quantization`),
frozen, with LoRA adapters trained on top of them.

`model.quantization` is null, a preset name (`nf4`, `fp4`, `int8`), or a mapping of the keys of
`Quantization`. The quantized weights never train, so a quantized policy needs `model.lora`; its
natural reference is the policy with its adapters disabled (`reference=adapter`), which is the
quantized base model itself at no extra memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar, cast

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kto_lightning.common.extras import require
from kto_lightning.errors import ConfigError, ModelLoadError

# The dtypes the matrix products of a 4-bit layer may compute in (its weights are dequantized
# to it, block by block).
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANT_TYPES = ("nf4", "fp4")
# `model.quantization=<name>`: QLoRA's recipe (nf4, double quantization, bf16 compute), its fp4
# variant, and LLM.int8().
PRESETS: dict[str, dict[str, Any]] = {
    "nf4": {"bits": 4, "quant_type": "nf4"},
    "fp4": {"bits": 4, "quant_type": "fp4"},
    "int8": {"bits": 8},
}
Model = TypeVar("Model", bound=nn.Module)


@dataclass(frozen=True)
class Quantization:
    """How the frozen weights are stored (bitsandbytes through transformers' BitsAndBytesConfig).

    Args:
        bits: 4 (QLoRA) or 8 (LLM.int8()).
        quant_type: the 4-bit data type, "nf4" (normal float, QLoRA's) or "fp4".
        double_quant: quantize the 4-bit blocks' scales too (about 0.4 bits per weight saved).
        compute_dtype: the dtype 4-bit layers compute in: "bfloat16", "float16" or "float32".
    """

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"model.quantization.bits must be 4 or 8, got {self.bits!r}")
        if self.quant_type not in QUANT_TYPES:
            raise ConfigError(
                f"model.quantization.quant_type must be one of {list(QUANT_TYPES)}, got "
                f"{self.quant_type!r}"
            )
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(
                f"model.quantization.compute_dtype must be one of {list(COMPUTE_DTYPES)}, got "
                f"{self.compute_dtype!r}"
            )

    def describe(self) -> str:
        """One phrase for the log: "4-bit nf4, double quantization, bfloat16 compute"."""
        if self.bits == 8:
            return "8-bit (LLM.int8())"
        double = ", double quantization" if self.double_quant else ""
        return f"4-bit {self.quant_type}{double}, {self.compute_dtype} compute"

    def bnb_config(self) -> Any:
        """transformers' BitsAndBytesConfig for these settings (it reads bitsandbytes' version,
        so `require` it first)."""
        from transformers import BitsAndBytesConfig

        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=COMPUTE_DTYPES[self.compute_dtype],
        )


def parse_quantization(value: Any) -> Quantization | None:
    """`model.quantization` as written (null, a preset name or a mapping), checked."""
    if value is None:
        return None
    if isinstance(value, str):
        if value not in PRESETS:
            raise ConfigError(
                f"model.quantization={value!r} is not a preset: use one of {list(PRESETS)}, a "
                f"mapping of {[f.name for f in fields(Quantization)]}, or null"
            )
        return Quantization(**PRESETS[value])
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value)
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"model.quantization must be null, a preset ({', '.join(PRESETS)}) or a mapping, "
            f"got {value!r}"
        )
    known = [f.name for f in fields(Quantization)]
    unknown = [str(key) for key in value if key not in known]
    if unknown:
        raise ConfigError(
            f"model.quantization.{unknown[0]} is not a quantization setting; the settings are "
            f"{known}"
        )
    return Quantization(**{str(key): inner for key, inner in value.items()})


def written(value: Any) -> str:
    """`model.quantization` as a user writes it on the command line, for messages."""
    if isinstance(value, str):
        return f"model.quantization={value}"
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value)
    if isinstance(value, Quantization):
        value = asdict(value)
    inner = ", ".join(f"{key}: {item}" for key, item in dict(value).items())
    return f"model.quantization={{{inner}}}"


def require_bitsandbytes(value: Any) -> None:
    """Stop at once, with the pip command, when bitsandbytes is missing."""
    require("bitsandbytes", written(value))


def check_trainable(quantization: Any, lora: Any) -> None:
    """ConfigError unless a quantized model trains LoRA adapters: its own weights cannot train."""
    settings = parse_quantization(quantization)
    if settings is not None and not lora:
        raise ConfigError(
            f"{written(quantization)} freezes the model's weights in {settings.bits} bits, "
            "which cannot train: set model.lora too (e.g. +model.lora.r=16 "
            "+model.lora.target_modules=all-linear), or model.quantization=null"
        )


def load_device() -> str | int:
    """Where bitsandbytes places the quantized weights: this process's GPU (LOCAL_RANK, which
    Lightning's DDP launcher sets for each rank), else the CPU."""
    if torch.cuda.is_available():
        return int(os.environ.get("LOCAL_RANK", "0"))
    return "cpu"


def loading_kwargs(quantization: Quantization) -> dict[str, Any]:
    """The `from_pretrained` arguments that load the weights quantized, on `load_device()`."""
    return {"quantization_config": quantization.bnb_config(), "device_map": {"": load_device()}}


def cannot_quantize(quantization: Quantization, error: Exception) -> ModelLoadError:
    """The one message for a bitsandbytes that cannot quantize on this machine."""
    import importlib.metadata

    version = importlib.metadata.version("bitsandbytes")
    device = "a CUDA GPU" if torch.cuda.is_available() else "this machine's CPU (no CUDA GPU)"
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return ModelLoadError(
        f"model.quantization ({quantization.describe()}): bitsandbytes {version} cannot "
        f"quantize the model on {device}: {reason}. "
        "QLoRA needs a device bitsandbytes supports (a CUDA GPU); set model.quantization=null "
        "to train LoRA on unquantized weights"
    )


def prepare_for_training(model: Model) -> Model:
    """peft's k-bit training preparation: every weight frozen, the unquantized ones (norms,
    embeddings, head) cast to float32 for stable training, before LoRA is added.

    Activation checkpointing is left to the run's `gradient_checkpointing` key (peft would
    turn it on by itself): the run enables it later, non-reentrant, so the inputs need no grad.
    """
    from peft import prepare_model_for_kbit_training

    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)  # in place
    # bitsandbytes' CPU backend repacks a 4-bit layer for its inference kernel at its first
    # eval-mode forward (the adapter reference runs in eval mode), rounding the block scales to
    # bf16, and unpacks it, rounding again, whenever a state dict is taken (every checkpoint): the
    # frozen base would drift through the run. One format throughout: the repacking off.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            cast(Any, module).support_avx512bf16_for_cpu = False  # bnb.nn.Linear4bit's flag
    return model


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` (a peft wrapper or not) was loaded with quantized weights."""
    config = getattr(model, "config", None)
    return getattr(config, "quantization_config", None) is not None
