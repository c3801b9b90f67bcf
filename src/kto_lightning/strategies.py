"""Multi-device strategies that need to know the model: FSDP wraps each decoder layer."""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

from kto_lightning.errors import ConfigError


def decoder_layer_classes(model: nn.Module, layer_class: str | None = None) -> set[type[nn.Module]]:
    """The model's decoder-layer class(es), from `_no_split_modules` or the name given.

    Hugging Face models list the blocks that must not be split across devices in
    `_no_split_modules` (e.g. ["LlamaDecoderLayer"]); those are the units FSDP should shard.
    """
    names = {layer_class} if layer_class else set()
    if not names:
        for module in model.modules():
            names.update(getattr(module, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ConfigError(
            f"strategy=fsdp: no decoder-layer class found in {type(model).__name__} "
            f"(looked for {sorted(names) or 'its _no_split_modules'}); set strategy.layer_class "
            "to the class name of one transformer block"
        )
    return classes


def fsdp(
    model: nn.Module,
    layer_class: str | None = None,
    sharding_strategy: str = "FULL_SHARD",
    activation_checkpointing: bool = True,
    state_dict_type: str = "sharded",
    cpu_offload: bool = False,
) -> FSDPStrategy:
    """Lightning's FSDPStrategy, wrapping every decoder layer of policy and reference.

    The reference model is a submodule of the KTOModule, so its layers are wrapped and sharded
    the same way. Mixed precision follows `trainer.precision` (e.g. bf16-mixed).

    Args:
        model: the policy; its decoder-layer class decides the wrapping.
        layer_class: the block class name, when `_no_split_modules` does not say.
        sharding_strategy: FULL_SHARD, SHARD_GRAD_OP, HYBRID_SHARD or NO_SHARD.
        activation_checkpointing: recompute each decoder layer in backward.
        state_dict_type: "sharded" (one file per rank, fast) or "full" checkpoints.
        cpu_offload: keep parameters on the CPU between uses.
    """
    classes = decoder_layer_classes(model, layer_class)
    return FSDPStrategy(
        auto_wrap_policy=classes,
        activation_checkpointing_policy=classes if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        state_dict_type=state_dict_type,
        cpu_offload=cpu_offload,
        # Frozen reference weights and trainable policy weights share the root unit.
        use_orig_params=True,
        limit_all_gathers=True,
    )
