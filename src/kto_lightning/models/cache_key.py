"""The key a reference cache file is stored under: a content hash of the initial weights, the
tokenizer, the tokenized rows with their KL pairing, the length settings and the trainer
precision, so that no change to any of them reuses a stale table (`reference_cache.py`).
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kto_lightning.data.tokenize import Example, tokenizer_fingerprint
from kto_lightning.errors import ConfigError

# Bump when what a cache file holds, or how it is computed, changes.
CACHE_VERSION = 2

# How Lightning runs a step under each `trainer.precision` (single device and DDP): autocast for
# `*-mixed` (MixedPrecision); the whole module cast to a dtype for `*-true` (HalfPrecision,
# DoublePrecision), which also makes that dtype the default one inside forward.
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
CAST_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}
# Lightning's older spellings of the same settings.
PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def trainer_precision(precision: str | int | None) -> str:
    """`trainer.precision` in Lightning's current spelling; ConfigError where the cache can't match.

    None is Lightning's default, "32-true".
    """
    name = "32-true" if precision is None else PRECISION_ALIASES.get(str(precision), str(precision))
    supported = ["32-true", *AUTOCAST_DTYPES, *CAST_DTYPES]
    if name not in supported:
        raise ConfigError(
            f"reference=cache scores the table as the trainer will run the policy, which it can do "
            f"for trainer.precision in {supported}, not trainer.precision={precision!r}: choose "
            "one of those, or use reference=copy"
        )
    return name


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
