"""Sharded training with FSDP2 (`torch.distributed.fsdp.fully_shard`) through Lightning.

`strategy=fsdp` builds `FSDP2Strategy`, Lightning's `ModelParallelStrategy` with every device in
one data-parallel dimension. FSDP2 is what PyTorch and Lightning recommend over the wrapper-based
FSDP1, and unlike FSDP1 it also runs on CPU processes over gloo, so the sharded path users run is
the one the tests run.

Sharding (`shard_models`): every decoder layer of the policy, and of a `copy` reference, is its
own unit; the rest of each model (embeddings, final norm, LM head) is the model's root unit. The
log-probs are computed by calling the backbone and reading the LM head directly rather than
through `model.forward` (which would build full logits), so `sequence_logprobs` is registered as a
forward method of each root: FSDP then gathers the head's weight before the chunked head reads it,
and reduce-scatters its gradient after backward.
"""

from __future__ import annotations

import types
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from kto_lightning.common.extras import require
from kto_lightning.core.logprobs import SHARDED_ENTRY, unsharded_sequence_logprobs
from kto_lightning.errors import ConfigError


class HoldsModels(Protocol):
    """What sharding needs of a LightningModule (`module.PolicyModule` is one).

    A protocol rather than an import of `module`: `module` imports this file (for
    `FSDP2Strategy`), and strategies sit below the modules they shard.
    """

    @property
    def policy(self) -> nn.Module: ...


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


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh,
    layer_class: str | None = None,
    reshard_after_forward: bool = True,
) -> None:
    """fully_shard every decoder layer of `model`, then `model` itself as the root unit."""
    classes = decoder_layer_classes(model, layer_class)
    for layer in [m for m in model.modules() if type(m) in classes]:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    setattr(model, SHARDED_ENTRY, types.MethodType(unsharded_sequence_logprobs, model))
    register_fsdp_forward_method(model, SHARDED_ENTRY)
    # peft's generate calls the wrapped model's generate, not its own forward: the root's weights
    # (the embeddings) would stay sharded in the generations callback.
    register_fsdp_forward_method(model, "generate")


def shard_models(
    module: HoldsModels,
    mesh: DeviceMesh,
    layer_class: str | None = None,
    reshard_after_forward: bool = True,
) -> None:
    """Shard the policy and, for a `copy` reference, the reference model. Idempotent."""
    if isinstance(module.policy, FSDPModule):  # configure_model runs again for each stage
        return
    models = [module.policy]
    # CopyReference only (an SFT module has no reference at all).
    reference_model = getattr(getattr(module, "reference", None), "model", None)
    if isinstance(reference_model, nn.Module):
        models.append(reference_model)
    for model in models:
        shard_model(model, mesh, layer_class, reshard_after_forward)


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 data parallelism over every device of every node.

    Args:
        layer_class: the decoder block's class name, when `_no_split_modules` does not say.
        reshard_after_forward: free each layer's gathered weights after its forward and gather
            them again in backward (ZeRO-3-like, least memory); false keeps them (ZeRO-2-like).
        save_distributed_checkpoint: true writes one shard per rank (a checkpoint folder);
            false gathers full weights into one file on rank 0.
        process_group_backend: null picks nccl on GPUs and gloo on CPUs.
        timeout: collective timeout in seconds.
    """

    def __init__(
        self,
        layer_class: str | None = None,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: float = 1800.0,
    ) -> None:
        super().__init__(
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timedelta(seconds=timeout),
        )
        self.layer_class = layer_class
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" data-parallel size is the number of nodes (tensor
        # parallelism within a node); here every device holds a data-parallel shard.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict:
        """Lightning's loader, except that a sharded checkpoint may lack the frozen weights.

        Checkpoints hold the trainable weights only (PolicyModule.on_save_checkpoint): the frozen
        ones (the reference, LoRA's base) are rebuilt from the config. Lightning asks the
        distributed checkpoint for every key of the module, so it is asked for the trainable
        ones here.
        """
        path = Path(self.broadcast(checkpoint_path))
        if not (path / ".metadata").is_file():  # a full checkpoint, one file: nothing is sharded
            return super().load_checkpoint(path, weights_only)
        module = self.lightning_module
        assert module is not None, "the strategy loads a checkpoint once the module is attached"
        trainable = StateDictOptions(ignore_frozen_params=True)
        state = {"state_dict": get_model_state_dict(module, options=trainable)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(module, state["state_dict"], options=StateDictOptions(strict=False))
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optimizer_state = {key: get_optimizer_state_dict(module, optimizer)}
            dcp.load(optimizer_state, checkpoint_id=path)
            set_optimizer_state_dict(module, optimizer, optim_state_dict=optimizer_state[key])
        # Everything else (loops, callbacks, RNG states, the run config) is on rank 0's file.
        return torch.load(path / "meta.pt", weights_only=weights_only is not False)

    def shard(self, module: HoldsModels) -> None:
        """Called by `PolicyModule.configure_model` once the process group and mesh exist."""
        shard_models(
            module, self.device_mesh["data_parallel"], self.layer_class, self.reshard_after_forward
        )


def check_deepspeed(accelerator: str) -> None:
    """Stop at once, in one sentence, where a DeepSpeed strategy cannot run.

    Lightning's DeepSpeedStrategy runs on CUDA GPUs only, and DeepSpeed is an extra.
    """
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        raise ConfigError(
            "the DeepSpeed strategies run on CUDA GPUs only (Lightning's DeepSpeedStrategy), "
            f"but trainer.accelerator={accelerator!r} has none here; on CPUs use strategy=ddp or "
            "strategy=fsdp"
        )
    require("deepspeed", "strategy=deepspeed_*")


def keep_state_on_device(strategy: Strategy) -> None:
    """Make `strategy.teardown` leave the module and the optimizer states where they are.

    Lightning's `Strategy.teardown`, run at the end of every `fit` and `validate`, copies each
    optimizer state and the whole LightningModule to host memory, to free the device for what
    the process does next. At the end of a run that is a copy of every weight, of the reference
    and of AdamW's two moments, thrown away at exit: tens of seconds after the last step of a
    1.1B model, and as much host memory as the model and its optimizer states
    (benchmarks/RESULTS.md, "GPU"). After `validate` ahead of training
    it is a round trip, device -> host -> device, before the first step. The device memory is
    freed instead when the run is let go (`train.main` collects it before a sweep's next job).
    Everything else teardown does (precision, accelerator, checkpoint IO, the cluster
    environment, DDP's unwrapping) still runs, and the strategy's class is unchanged: this works
    for "auto", DDP, FSDP2 and DeepSpeed alike.
    """
    teardown = strategy.teardown

    def teardown_in_place() -> None:
        optimizers, module = strategy.optimizers, strategy.lightning_module
        strategy.optimizers = []  # nothing for Strategy.teardown to copy to the host
        if module is not None:
            # Strategy.teardown calls `lightning_module.cpu()`; for this call only, a no-op.
            object.__setattr__(module, "cpu", lambda: module)
        try:
            teardown()
        finally:
            if module is not None:
                object.__delattr__(module, "cpu")
            strategy.optimizers = optimizers

    strategy.teardown = teardown_in_place  # type: ignore[method-assign]
