"""Reference log-probs: one interface, three providers.

- `auto` (default) is not a provider of its own: `adapter` when the policy has LoRA adapters (as
  TRL does), else `copy`; `resolved_kind` picks, from the policy, at every build (training,
  evaluate), so a run config that says `auto` rebuilds the reference it trained with.
- `copy`: a separate frozen copy of the initial policy, run under no_grad.
- `adapter`: the policy itself with its LoRA adapters disabled; no second copy of the weights.
- `cache`: log-probs of every main row and KL row, computed once before training and stored on
  disk under a content hash of (initial weights, tokenizer, tokenized data with its KL pairing,
  length settings, trainer precision). Training then holds no reference model at all, and every
  run of a sweep over beta, weights or learning rate reuses the file (`reference_cache.py`).
  Under DDP the ranks fill it together, each scoring its shard of the rows, in `KTOModule.setup`.

The reference is the policy as it was before training, so the cache is scored by the policy
itself before its first step, under the precision the trainer will train in: no reference model
is ever loaded for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from kto_lightning.core.logprobs import CausalLM, batch_logprobs, eval_mode
from kto_lightning.core.packing import Packing
from kto_lightning.errors import ConfigError
from kto_lightning.models import make_reference
from kto_lightning.models.cache_key import trainer_precision
from kto_lightning.models.quantizing import is_quantized
from kto_lightning.models.reference_cache import CachePlan, cache_plan

KINDS = ("auto", "copy", "adapter", "cache")
# The dtype each mixed precision computes matrix products in.
_AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
# A cached table is kept as raw bits in an integer buffer (see CachedReference).
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}


@dataclass(frozen=True)
class ReferenceSpec:
    """The `reference` config group.

    Args:
        kind: "auto" (`adapter` with LoRA, else `copy`), "copy", "adapter" or "cache".
        cache_dir: where `cache` files live.
        batch_size: rows per forward pass while the cache is being filled.
    """

    kind: str = "auto"
    cache_dir: str = "outputs/reference_cache"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"reference.kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.batch_size < 1:
            raise ConfigError(f"reference.batch_size must be >= 1, got {self.batch_size}")


class ReferenceProvider(nn.Module):
    """Gives the reference log-probs of a batch's main rows and (optionally) its KL rows."""

    def logps(
        self,
        policy: nn.Module,
        batch: dict[str, Tensor],
        split: str,
        chunk_size: int,
        needs_kl_rows: bool,
        packing: Packing | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """(main, KL or None) reference log-probs; `packing` runs a live model packed."""
        raise NotImplementedError

    def prepare(self, policy: nn.Module) -> None:
        """Get ready before the first step: on every rank, once the trainer has started them all.

        `KTOModule.setup` calls it with the policy as it is before training.
        """


class CopyReference(ReferenceProvider):
    """A separate frozen model (an exact copy of the initial policy)."""

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.model: CausalLM = model.eval().requires_grad_(False)

    @torch.no_grad()
    def logps(self, policy, batch, split, chunk_size, needs_kl_rows, packing=None):
        return batch_logprobs(self.model, batch, chunk_size, needs_kl_rows, packing)


class AdapterReference(ReferenceProvider):
    """The policy with its LoRA adapters switched off: the base weights, which never train."""

    @torch.no_grad()
    def logps(self, policy, batch, split, chunk_size, needs_kl_rows, packing=None):
        with eval_mode(policy), policy.disable_adapter():
            return batch_logprobs(policy, batch, chunk_size, needs_kl_rows, packing)


class CachedReference(ReferenceProvider):
    """Log-probs looked up by example index; no model.

    Built from its table, or from a `CachePlan` whose table `prepare` reads or fills: Lightning
    starts the DDP processes only in `fit`, so this is where every rank can score its shard.
    """

    def __init__(self, source: dict[str, Tensor] | CachePlan) -> None:
        super().__init__()
        self.dtypes: dict[str, torch.dtype] = {}
        self.plan: CachePlan | None = None
        if isinstance(source, CachePlan):
            self.plan = source
        else:
            self._hold(source)

    def prepare(self, policy: nn.Module) -> None:
        if self.plan is not None:
            self._hold(self.plan.table(policy))
            self.plan = None  # and with it the loaders

    def _hold(self, table: dict[str, Tensor]) -> None:
        for name, values in table.items():
            # Buffers follow the module across devices (Lightning moves it after `setup`); not
            # persistent: never in a checkpoint.
            # Raw bits in an integer buffer, because a trainer that casts the whole module
            # (precision=bf16-true, DeepSpeed) casts float buffers too, and bf16 would round a
            # log-prob of -200 to a multiple of 1.
            self.dtypes[name] = values.dtype
            bits = values.view(_BITS[values.dtype])
            self.register_buffer(name.replace("/", "__"), bits, persistent=False)

    def _lookup(self, name: str, index: Tensor) -> Tensor:
        return getattr(self, name.replace("/", "__"))[index].view(self.dtypes[name])

    def logps(self, policy, batch, split, chunk_size, needs_kl_rows, packing=None):
        if self.plan is not None:
            raise RuntimeError(
                "the cached reference has no table yet: KTOModule.setup reads or fills it when "
                "the trainer starts (or call CachedReference.prepare with the untrained policy)"
            )
        # The table holds per-row log-probs (scored padded, before training): nothing to pack.
        index = batch["index"]
        main = self._lookup(f"{split}/main", index)
        kl = self._lookup(f"{split}/kl", index) if needs_kl_rows else None
        return main, kl


def build_provider(
    spec: ReferenceSpec,
    policy: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    datamodule,
    chunk_size: int,
    needs_kl_rows: bool,
    precision: str | int | None = "32-true",
    deferred: bool = False,
    sharded: bool = False,
) -> ReferenceProvider:
    """The provider `spec` asks for; for `cache`, the table is read or filled here, before training.

    `datamodule` must be set up: the cache covers its train and validation sets. `precision` is
    `trainer.precision`; the cache is scored under it and keyed by it. `deferred`: only the
    cache's key is computed here (from the policy as it is now); its table is read or filled
    later by `prepare`, which `KTOModule.setup` calls on every rank once DDP has started them.
    `sharded`: a strategy shards the models (FSDP, DeepSpeed): a `copy` then keeps the policy's
    dtypes, which the sharding expects uniform; otherwise, under mixed precision, its linear
    weights are held in the autocast dtype (`models.hold_linear_weights_in`).
    """
    kind = resolved_kind(spec.kind, policy)
    if kind == "copy":
        if is_quantized(policy):
            raise ConfigError(
                "reference=copy with model.quantization: a frozen copy of the quantized weights "
                "costs a second model's memory for the log-probs that reference=adapter gives "
                "from the policy itself (its adapters start at zero): use reference=adapter (the "
                "default with model.lora), or reference=cache"
            )
        mixed = _AUTOCAST_DTYPES.get(str(precision))
        reference = make_reference(policy, None if sharded else mixed)
        return CopyReference(reference)
    if kind == "adapter":
        if not has_adapters(policy):
            raise ConfigError(
                "reference=adapter uses the policy with its LoRA adapters disabled, but the policy "
                "has none: set model.lora (e.g. +model.lora.r=16 "
                "+model.lora.target_modules=all-linear) or use reference=copy"
            )
        return AdapterReference()
    plan = cache_plan(
        spec, policy, tokenizer, datamodule, chunk_size, needs_kl_rows, trainer_precision(precision)
    )
    reference = CachedReference(plan)
    if not deferred:
        reference.prepare(policy)
    return reference


def has_adapters(policy: nn.Module) -> bool:
    """Whether `policy` is wrapped with (peft) adapters that can be switched off."""
    return hasattr(policy, "disable_adapter")


def resolved_kind(kind: str, policy: nn.Module) -> str:
    """The provider `kind` names: `auto` is `adapter` for a policy with LoRA adapters (no second
    copy of the weights, the same log-probs: the adapters start at zero), else `copy`."""
    return configured_kind(kind, has_adapters(policy))


def configured_kind(kind: str, lora: object) -> str:
    """`resolved_kind` from a run config's values (`reference.kind`, `model.lora`), for code that
    compares configs without building a policy (a config that says `auto` and one that says what
    `auto` became are the same run)."""
    if kind != "auto":
        return kind
    return "adapter" if lora else "copy"


def footprint(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) that `model`'s weights hold."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def reference_note(kind: str, provider: ReferenceProvider, policy: nn.Module) -> str:
    """One log line: which reference the run uses (and why, for `auto`), and what a frozen copy
    costs in memory."""
    picked = resolved_kind(kind, policy)
    why = ""
    if kind == "auto":
        has = "has" if picked == "adapter" else "has no"
        why = f" (reference=auto: the policy {has} LoRA adapters)"
    if isinstance(provider, CopyReference):
        count, size = footprint(provider.model)
        line = (
            f"reference: copy{why}, a frozen copy of the initial policy: {count:,} parameters, "
            f"{size / 2**20:,.1f} MiB"
        )
        if has_adapters(policy):
            line += (
                " beside the policy; reference=adapter (the default with model.lora) gives the "
                "same log-probs from the policy with its adapters disabled, at no extra memory"
            )
        return line
    if isinstance(provider, AdapterReference):
        return f"reference: adapter{why}, the policy with its LoRA adapters disabled (no copy)"
    return f"reference: {picked}{why}, log-probs read from a table, no reference model"
