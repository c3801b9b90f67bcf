"""What is done to a policy once it is loaded: LoRA adapters, dropout set to 0, and the frozen
reference copy (with its linear weights held in the autocast dtype).

Every model source (`loading.py`, `tiny.py`) ends its `load_policy` here; the reference
providers (`reference.py`) make their frozen copy with `make_reference`.
"""

from __future__ import annotations

import copy

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from kto_lightning.core.logprobs import CausalLM
from kto_lightning.errors import ConfigError


def apply_lora(model: PreTrainedModel, lora: dict | None) -> CausalLM:
    """Wrap `model` with LoRA adapters (peft) when `lora` is set; only the adapters then train.

    `lora` holds peft.LoraConfig arguments, e.g. {r: 16, lora_alpha: 32, lora_dropout: 0.0,
    target_modules: all-linear}. The adapters start at zero, so the wrapped model computes exactly
    what the base model does until it trains.
    """
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    settings = OmegaConf.to_container(lora) if isinstance(lora, DictConfig) else dict(lora)
    settings.setdefault("task_type", "CAUSAL_LM")
    try:
        config = LoraConfig(**settings)
    except TypeError as error:
        raise ConfigError(f"model.lora: {error}") from None
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # e.g. target modules that the model does not have
        raise ConfigError(f"model.lora: {error}") from None


_DROPOUT_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def disable_dropout(model: CausalLM) -> CausalLM:
    """Set every dropout probability in `model` to 0, in place (TRL's `disable_dropout=True`).

    The policy trains in train mode and the reference runs in eval mode; with dropout the two
    differ at step 0 although their weights are equal, so rewards and the KL estimate start as
    noise. Zeroed here: every torch dropout module (peft's `lora_dropout` included) and every
    number named like a dropout on a module or a config. Hugging Face attention reads such a float
    in forward instead of owning a module, e.g. Llama's `dropout=0.0 if not self.training else
    self.attention_dropout`, copied from `config.attention_dropout`.
    """
    configs: dict[int, PretrainedConfig] = {}
    for module in model.modules():
        if isinstance(module, _DROPOUT_MODULES):
            module.p = 0.0
        _zero_dropout_attributes(module)
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            configs[id(config)] = config
    while configs:  # the model's config(s) and their sub-configs (e.g. a text_config)
        config = configs.popitem()[1]
        _zero_dropout_attributes(config)
        for value in vars(config).values():
            if isinstance(value, PretrainedConfig):
                configs[id(value)] = value
    return model


def _zero_dropout_attributes(owner: object) -> None:
    """Set the numbers named `*dropout*` or `*pdrop` (GPT-2's `attn_pdrop`) of `owner` to 0."""
    for name, value in list(vars(owner).items()):
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if is_number and ("dropout" in name or name.endswith("pdrop")):
            setattr(owner, name, 0.0)


def make_reference(policy: CausalLM, autocast_dtype: torch.dtype | None = None) -> CausalLM:
    """The frozen reference: an exact copy of the policy as it is before training.

    `autocast_dtype`: the dtype mixed precision computes in (bf16-mixed: bfloat16), if any. The
    copy's linear layers then hold their weights in it (`hold_linear_weights_in`): at about half
    the memory, and computing exactly what the policy's fp32 weights compute under autocast.
    """
    reference = copy.deepcopy(policy)
    reference.eval()
    reference.requires_grad_(False)
    if autocast_dtype is not None:
        hold_linear_weights_in(reference, autocast_dtype)
    return reference


def hold_linear_weights_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast the weights and biases of `model`'s linear layers to `dtype`, in place; returns the
    bytes saved.

    Under autocast to `dtype`, a linear layer casts its float32 weight to `dtype` at every call
    (one copy of the weights per forward) and multiplies in `dtype`; holding the weight in `dtype`
    already skips that cast, and the product is bit for bit the same, since the cast rounds the
    same way once or every time. Embeddings, norms and anything tied to an embedding keep their
    dtype, so the residual stream stays float32 as autocast runs it: a frozen model so held
    scores exactly what its float32 original scores under autocast.
    """
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    saved = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or id(module.weight) in tied:
            continue
        for name in ("weight", "bias"):
            tensor = getattr(module, name)
            if tensor is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                saved += tensor.numel() * (tensor.element_size() - dtype.itemsize)
                tensor.data = tensor.data.to(dtype)
    return saved
