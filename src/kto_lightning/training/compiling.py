"""`compile.enabled`: torch.compile each decoder layer in place, not the whole decoder.

Compiled as one region, a decoder is unrolled into a single graph: compile time grows with depth
(benchmarks/RESULTS.md, "Options"), and each recompile (a new sequence length under dynamic
padding) pays it again. Compiled one layer at a time, every layer
runs the same code with its weights as graph inputs (torch inlines built-in nn.Modules), so one
compiled graph per way of calling a layer serves every layer of the policy and of a `copy`
reference: compile time no longer depends on depth. PyTorch's "regional compilation" recipe
does the same.

`layer.compile()` is the module's own compile: unlike `torch.compile(layer)` it wraps nothing, so
state-dict keys, and checkpoints, stay as they were.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from torch import nn

from kto_lightning.errors import ConfigError
from kto_lightning.training.strategies import decoder_layer_classes

log = logging.getLogger("kto_lightning")

# How many compiled entries the layers may hold before torch stops compiling new ways of calling
# them and runs those eagerly, after one warning. Every layer of the policy and of the reference
# shares one list of entries, one per way the layers are called: the policy with grad and without
# (its KL rows), in eval mode under inference_mode (validation), the frozen reference under
# no_grad and under inference_mode; each with static sizes at first, then again with the sizes
# that changed made symbolic. A KTO run on the tiny model makes 9 entries, 17 with gradient
# checkpointing: over torch's default limit of 8, which left the training step eager once
# validation had taken the first entries (the whole-decoder compile hit it too). With
# compile.dynamic=false every new sequence length adds entries; past this limit, new lengths run
# eagerly instead of compiling again and again.
RECOMPILE_LIMIT = 64


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of `model` (a Hugging Face causal LM, peft-wrapped or not).

    The modules whose classes the model names in `_no_split_modules` (the units FSDP shards,
    found by `strategies.decoder_layer_classes`), else the decoder's `layers` list. Only the
    outermost matches: a block inside another one is compiled as part of it.
    """
    try:
        classes = tuple(decoder_layer_classes(model))
    except ConfigError:  # no `_no_split_modules`: look for the usual attribute instead
        classes = ()
    layers: list[nn.Module] = []
    inside: set[int] = set()  # every module below a layer already taken
    for module in model.modules():  # parents before their children
        if isinstance(module, classes) and id(module) not in inside:
            layers.append(module)
            inside.update(id(child) for child in module.modules())
    if layers:
        return layers
    get_decoder = getattr(model, "get_decoder", None)
    stack = getattr(get_decoder() if callable(get_decoder) else None, "layers", None)
    if isinstance(stack, nn.ModuleList) and len(stack) > 0:
        return list(stack)
    raise ConfigError(
        f"compile.enabled=true: found no decoder layers in {type(model).__name__} (no class named "
        "by its _no_split_modules, no decoder with a `layers` list); set compile.enabled=false"
    )


def compile_decoder_layers(
    model: nn.Module,
    backend: str = "inductor",
    mode: str | None = None,
    dynamic: bool | None = None,
) -> list[nn.Module]:
    """torch.compile every decoder layer of `model` in place; returns the layers compiled.

    Args:
        model: a Hugging Face causal LM, or a peft model wrapping one. Gradient checkpointing may
            be on: the checkpointed layer runs inside the compiled call.
        backend: torch.compile's backend ("inductor", "aot_eager", "eager", ...).
        mode: torch.compile's mode (None, "reduce-overhead", "max-autotune", ...).
        dynamic: None lets torch decide: it compiles for the first sizes it sees and, once a size
            changes, once more with that dimension symbolic. True compiles symbolic sizes from the
            start; False compiles once per set of sizes (per sequence length under dynamic
            padding), up to `RECOMPILE_LIMIT` graphs.

    The embeddings, the final norm and the chunked LM head stay eager: the head is a custom
    autograd function that runs its own loop, and the rest of a step is small. Generation (a KV
    cache) must run under `eager()`: see there.
    """
    layers = decoder_layers(model)
    options: dict[str, Any] = {"backend": backend, "mode": mode, "dynamic": dynamic}
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        options["recompile_limit"] = RECOMPILE_LIMIT  # for these layers only
    else:  # older torch: one limit for the whole process, raised here but never lowered
        config = torch._dynamo.config
        config.cache_size_limit = max(config.cache_size_limit, RECOMPILE_LIMIT)
    for layer in layers:
        layer.compile(**options)
    log.info(
        "compile: %d decoder layers of %s, each way of calling them compiled once for all "
        "(backend=%s, mode=%s, dynamic=%s)",
        len(layers), type(model).__name__, backend, mode, dynamic,
    )  # fmt: skip
    return layers
