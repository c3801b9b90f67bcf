"""Reference log-probs: one interface, three providers.

- `copy` (default): a separate frozen copy of the initial policy, run under no_grad.
- `adapter`: the policy itself with its LoRA adapters disabled; no second copy of the weights.
- `cache`: log-probs of every main row and KL row, computed once before training and stored on
  disk under a content hash of (initial weights, tokenizer, tokenized data with its KL pairing,
  length settings, trainer precision). Training then holds no reference model at all, and every
  run of a sweep over beta, weights or learning rate reuses the file.

The reference is the policy as it was before training, so the cache is scored by the policy
itself before its first step, under the precision the trainer will train in: no reference model
is ever loaded for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from kto_lightning.data.tokenize import Example, tokenizer_fingerprint
from kto_lightning.errors import ConfigError
from kto_lightning.logprobs import sequence_logprobs
from kto_lightning.models import CausalLM

log = logging.getLogger(__name__)

KINDS = ("copy", "adapter", "cache")
# Bump when what a cache file holds, or how it is computed, changes.
CACHE_VERSION = 2

# How Lightning runs a step under each `trainer.precision` (single device and DDP): autocast for
# `*-mixed` (MixedPrecision); the whole module cast to a dtype for `*-true` (HalfPrecision,
# DoublePrecision), which also makes that dtype the default one inside forward.
_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_CAST = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}
# Lightning's older spellings of the same settings.
_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}
# A cached table is kept as raw bits in an integer buffer (see CachedReference).
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}


@dataclass(frozen=True)
class ReferenceSpec:
    """The `reference` config group.

    Args:
        kind: "copy", "adapter" or "cache".
        cache_dir: where `cache` files live.
        batch_size: rows per forward pass while the cache is being filled.
    """

    kind: str = "copy"
    cache_dir: str = "outputs/reference_cache"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"reference.kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.batch_size < 1:
            raise ConfigError(f"reference.batch_size must be >= 1, got {self.batch_size}")


def trainer_precision(precision: str | int | None) -> str:
    """`trainer.precision` in Lightning's current spelling; ConfigError where the cache can't match.

    None is Lightning's default, "32-true".
    """
    name = "32-true" if precision is None else _ALIASES.get(str(precision), str(precision))
    supported = ["32-true", *_AUTOCAST, *_CAST]
    if name not in supported:
        raise ConfigError(
            f"reference=cache scores the table as the trainer will run the policy, which it can do "
            f"for trainer.precision in {supported}, not trainer.precision={precision!r}: choose "
            "one of those, or use reference=copy"
        )
    return name


@contextlib.contextmanager
def _as_trained(policy: nn.Module, precision: str, device: torch.device) -> Iterator[None]:
    """Run `policy` on `device` the way the trainer's precision plugin will run it in training.

    `*-mixed`: autocast, as Lightning's MixedPrecision does (16-mixed is bf16 on a CPU there too).
    `*-true`: the policy cast to the dtype, with it as the default dtype; the policy comes back in
    its own dtype, but 16-bit values stay rounded, as the trainer will round them anyway.
    """
    if precision in _AUTOCAST:
        dtype = torch.bfloat16 if device.type == "cpu" else _AUTOCAST[precision]
        with torch.autocast(device.type, dtype=dtype, cache_enabled=False):
            yield
        return
    if precision not in _CAST:  # 32-true: the policy as it is
        yield
        return
    home_dtype, default_dtype = next(policy.parameters()).dtype, torch.get_default_dtype()
    policy.to(dtype=_CAST[precision])
    torch.set_default_dtype(_CAST[precision])
    try:
        yield
    finally:
        torch.set_default_dtype(default_dtype)
        policy.to(dtype=home_dtype)


def _score(model: nn.Module, batch: dict[str, Tensor], chunk_size: int, needs_kl_rows: bool):
    """(main, KL or None) log-probs of one batch, in one forward over main and KL rows."""
    if not needs_kl_rows:
        return sequence_logprobs(
            model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], chunk_size
        ), None
    keys = ("input_ids", "attention_mask", "completion_mask")
    ids, attention, completion = (torch.cat([batch[k], batch[f"kl_{k}"]]) for k in keys)
    main, kl = sequence_logprobs(model, ids, attention, completion, chunk_size).chunk(2)
    return main, kl


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class ReferenceProvider(nn.Module):
    """Gives the reference log-probs of a batch's main rows and (optionally) its KL rows."""

    def logps(
        self,
        policy: nn.Module,
        batch: dict[str, Tensor],
        split: str,
        chunk_size: int,
        needs_kl_rows: bool,
    ) -> tuple[Tensor, Tensor | None]:
        raise NotImplementedError


class CopyReference(ReferenceProvider):
    """A separate frozen model (an exact copy of the initial policy)."""

    def __init__(self, model: CausalLM) -> None:
        super().__init__()
        self.model: CausalLM = model.eval().requires_grad_(False)

    @torch.no_grad()
    def logps(self, policy, batch, split, chunk_size, needs_kl_rows):
        return _score(self.model, batch, chunk_size, needs_kl_rows)


class AdapterReference(ReferenceProvider):
    """The policy with its LoRA adapters switched off: the base weights, which never train."""

    @torch.no_grad()
    def logps(self, policy, batch, split, chunk_size, needs_kl_rows):
        with _eval_mode(policy), policy.disable_adapter():
            return _score(policy, batch, chunk_size, needs_kl_rows)


class CachedReference(ReferenceProvider):
    """Log-probs looked up by example index; no model."""

    def __init__(self, table: dict[str, Tensor]) -> None:
        super().__init__()
        self.dtypes: dict[str, torch.dtype] = {}
        for name, values in table.items():
            # Buffers follow the module across devices; not persistent: never in a checkpoint.
            # Raw bits in an integer buffer, because a trainer that casts the whole module
            # (precision=bf16-true, DeepSpeed) casts float buffers too, and bf16 would round a
            # log-prob of -200 to a multiple of 1.
            self.dtypes[name] = values.dtype
            bits = values.view(_BITS[values.dtype])
            self.register_buffer(name.replace("/", "__"), bits, persistent=False)

    def _lookup(self, name: str, index: Tensor) -> Tensor:
        return getattr(self, name.replace("/", "__"))[index].view(self.dtypes[name])

    def logps(self, policy, batch, split, chunk_size, needs_kl_rows):
        index = batch["index"]
        main = self._lookup(f"{split}/main", index)
        kl = self._lookup(f"{split}/kl", index) if needs_kl_rows else None
        return main, kl


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter and buffer: names, dtypes, shapes and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Rows(Protocol):
    """A split's examples, by position (KTODataset is one)."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Example: ...


def data_fingerprint(datasets_by_split: dict[str, Rows]) -> str:
    """A hash of the token ids of every row and of its KL partner's completion, per split."""
    digest = hashlib.blake2b(digest_size=16)
    for split, dataset in sorted(datasets_by_split.items()):
        digest.update(f"{split}:{len(dataset)}".encode())
        for example in (dataset[i] for i in range(len(dataset))):
            for ids in (example.prompt_ids, example.completion_ids, example.kl_completion_ids):
                digest.update(len(ids).to_bytes(4, "little"))
                digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


def cache_key(
    policy: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    datasets_by_split: dict[str, Rows],
    max_length: int,
    max_prompt_length: int,
    needs_kl_rows: bool,
    precision: str = "32-true",
) -> str:
    """The content hash a cache file is stored under; any change to an input changes it.

    `precision` is the trainer's: a bf16-mixed run never reads a table scored in fp32.
    """
    parts = [
        f"v{CACHE_VERSION}",
        weights_fingerprint(policy),
        tokenizer_fingerprint(tokenizer),
        data_fingerprint(datasets_by_split),
        f"{max_length}:{max_prompt_length}:{needs_kl_rows}",
        trainer_precision(precision),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


@torch.no_grad()
def fill_cache(
    policy: nn.Module,
    loaders: dict[str, DataLoader],
    chunk_size: int,
    needs_kl_rows: bool,
    precision: str = "32-true",
) -> dict[str, Tensor]:
    """Score every row of every split with the (untrained) policy, in eval mode.

    Runs on a GPU when there is one (the trainer has not moved the policy yet), under the
    trainer's `precision` (autocast for `*-mixed`, the policy cast for `*-true`), so that at step
    0 the policy's log-probs equal the table's exactly. Hands the policy back where it was.
    """
    precision = trainer_precision(precision)
    # float64 log-probs come out of a float64 model (64-true); everything else gives float32.
    dtype = torch.float64 if precision == "64-true" else torch.float32
    table: dict[str, Tensor] = {}
    home = next(policy.parameters()).device
    device = torch.device("cuda") if torch.cuda.is_available() else home
    policy.to(device)
    with _eval_mode(policy), _as_trained(policy, precision, device):
        for split, loader in loaders.items():
            n = len(cast(Rows, loader.dataset))
            main = torch.full((n,), torch.nan, dtype=dtype)
            kl = torch.full((n,), torch.nan, dtype=dtype)
            for batch in tqdm(loader, desc=f"Reference log-probs ({split})", leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                scored, scored_kl = _score(policy, batch, chunk_size, needs_kl_rows)
                main[batch["index"].cpu()] = scored.to(dtype).cpu()
                if scored_kl is not None:
                    kl[batch["index"].cpu()] = scored_kl.to(dtype).cpu()
            table[f"{split}/main"] = main
            table[f"{split}/kl"] = kl
    policy.to(home)
    return table


def load_or_fill_cache(
    cache_dir: str | Path,
    key: str,
    policy: nn.Module,
    loaders: dict[str, DataLoader],
    chunk_size: int,
    needs_kl_rows: bool,
    precision: str = "32-true",
) -> tuple[dict[str, Tensor], bool]:
    """The cached table for `key`, computed and written first on a miss; returns (table, hit).

    `precision` (the trainer's) must be the one `key` was computed with.
    """
    path = Path(cache_dir) / f"{key}.safetensors"
    if path.is_file():
        log.info("reference log-probs: read from the cache %s", path)
        return load_file(path), True
    log.info("reference log-probs: not cached yet; scoring every row once -> %s", path)
    table = fill_cache(policy, loaders, chunk_size, needs_kl_rows, precision)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    save_file(table, str(partial))
    os.replace(partial, path)  # atomic: a crash or a concurrent run never leaves half a file
    return table, False


def build_provider(
    spec: ReferenceSpec,
    policy: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    datamodule,
    chunk_size: int,
    needs_kl_rows: bool,
    precision: str | int | None = "32-true",
) -> ReferenceProvider:
    """The provider `spec` asks for; for `cache`, the table is read or filled here, before training.

    `datamodule` must be set up: the cache covers its train and validation sets. `precision` is
    `trainer.precision`; the cache is scored under it and keyed by it.
    """
    if spec.kind == "copy":
        from kto_lightning.models import make_reference

        return CopyReference(make_reference(policy))
    if spec.kind == "adapter":
        if not hasattr(policy, "disable_adapter"):
            raise ConfigError(
                "reference=adapter uses the policy with its LoRA adapters disabled, but the policy "
                "has none: set model.lora (e.g. +model.lora.r=16 "
                "+model.lora.target_modules=all-linear) or use reference=copy"
            )
        return AdapterReference()
    precision = trainer_precision(precision)  # before any work: a bad value stops the run here
    splits = {"train": datamodule.train_set, "validation": datamodule.val_set}
    key = cache_key(
        policy,
        tokenizer,
        splits,
        datamodule.lengths.max_length,
        datamodule.lengths.max_prompt_length,
        needs_kl_rows,
        precision,
    )
    loaders = {
        name: DataLoader(
            dataset, batch_size=spec.batch_size, shuffle=False, collate_fn=datamodule.collator
        )
        for name, dataset in splits.items()
    }
    table, _ = load_or_fill_cache(
        spec.cache_dir, key, policy, loaders, chunk_size, needs_kl_rows, precision
    )
    return CachedReference(table)
