"""The on-disk reference cache (`reference=cache`).

Every main row's and KL row's reference log-prob, scored once by the untrained policy and stored
under a content hash of (initial weights, tokenizer, tokenized data with its KL pairing, length
settings, trainer precision), so that no change to any of them reuses a stale table. The table
is scored the way the trainer will run the policy (`trainer.precision`), so that at step 0 the
policy's log-probs equal it exactly. Under DDP each rank scores a shard of the rows and the ranks
gather the shards into the one file, which rank 0 writes.

A file carries a checksum of its tensors (`table_checksum`, in the safetensors header), checked
on every read: a file edited, truncated or written by another version is reported, in one log
line naming it, and filled again; a table that is not the one scored is never trained against.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from kto_lightning.common import distributed
from kto_lightning.common.compile_stance import eager
from kto_lightning.core.logprobs import batch_logprobs, eval_mode
from kto_lightning.data.tokenize import Example, tokenizer_fingerprint
from kto_lightning.errors import ConfigError


class CacheSettings(Protocol):
    """What a cache plan reads of the `reference` group (`reference.ReferenceSpec` is one).

    A protocol rather than an import of `reference`, which imports this file: the cache sits
    below the providers that use it.
    """

    @property
    def cache_dir(self) -> str: ...

    @property
    def batch_size(self) -> int: ...


log = logging.getLogger(__name__)

# Bump when what a cache file holds, or how it is computed, changes.
CACHE_VERSION = 2
# The safetensors header entry that holds a file's `table_checksum`.
CHECKSUM = "kto_lightning.blake2b"

# How Lightning runs a step under each `trainer.precision` (single device and DDP): autocast for
# `*-mixed` (MixedPrecision); the whole module cast to a dtype for `*-true` (HalfPrecision,
# DoublePrecision), which also makes that dtype the default one inside forward.
_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
_CAST = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}
# Lightning's older spellings of the same settings.
_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}


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


def _shard(loader: DataLoader, split: str) -> DataLoader:
    """This rank's batches of `loader`: batches r, r + N, r + 2N, ... for rank r of N.

    Whole batches of the one-process fill, not rows: each row is padded and scored exactly as one
    process scores it, so the merged table is the one-process table to the bit, in any precision.
    """
    rank, world = distributed.rank(), distributed.world_size()
    if world == 1:
        return loader
    batches = list(cast(Iterable[list[int]], loader.batch_sampler))
    mine = batches[rank::world]
    log.info(
        "reference log-probs: rank %d scores %s shard %d/%d: %d of %d batches (%d of %d rows)",
        rank, split, rank + 1, world, len(mine), len(batches), sum(map(len, mine)),
        len(cast(Rows, loader.dataset)),
    )  # fmt: skip
    return DataLoader(loader.dataset, batch_sampler=mine, collate_fn=loader.collate_fn)


def _score(
    policy: nn.Module,
    loader: DataLoader,
    device: torch.device,
    chunk_size: int,
    needs_kl_rows: bool,
    dtype: torch.dtype,
    split: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(row index, main log-prob, KL log-prob) of every row `loader` gives, on the CPU.

    The KL log-probs are NaN where the loss needs no KL rows.
    """
    none = torch.empty(0, dtype=dtype)  # a rank may have no batch at all
    index, main, kl = [none.long()], [none], [none]
    # A bar on a terminal; elsewhere (a log file, SLURM) a plain line at every tenth of the way.
    shown, interactive = distributed.rank() == 0, sys.stderr.isatty()
    progress = tqdm(
        loader, desc=f"Reference log-probs ({split})", leave=False,
        disable=not (shown and interactive),
    )  # fmt: skip
    every = max(1, len(loader) // 10)
    for done, batch in enumerate(progress, start=1):
        batch = {k: v.to(device) for k, v in batch.items()}
        scored, scored_kl = batch_logprobs(policy, batch, chunk_size, needs_kl_rows)
        index.append(batch["index"].cpu())
        main.append(scored.to(dtype).cpu())
        if scored_kl is None:
            kl.append(torch.full_like(main[-1], torch.nan))
        else:
            kl.append(scored_kl.to(dtype).cpu())
        if shown and not interactive and (done % every == 0 or done == len(loader)):
            log.info("reference log-probs (%s): %d/%d batches", split, done, len(loader))
    return torch.cat(index), torch.cat(main), torch.cat(kl)


def _merge(split: str, rows: int, index: Tensor, *columns: Tensor) -> list[Tensor]:
    """The `rows`-long tables of `columns`, from every rank's (row index, value) pairs.

    Gathered, never summed, so each value keeps the bits its rank scored. Raises unless every row
    was scored exactly once: a row scored twice or never is a sharding bug, not a number to train
    against.
    """
    device = distributed.collective_device()
    index = distributed.gather_cat(index.to(device)).cpu()
    times = torch.bincount(index, minlength=rows)
    if len(times) != rows or not bool((times == 1).all()):
        wrong = (times != 1).nonzero().flatten()[:5].tolist()
        raise RuntimeError(
            f"reference log-probs of {split}: {len(index)} scores for {rows} rows; rows {wrong} "
            f"were scored {times[wrong].tolist()} times, not once each"
        )
    tables = []
    for values in columns:
        table = torch.full((rows,), torch.nan, dtype=values.dtype)
        table[index] = distributed.gather_cat(values.to(device)).cpu()
        tables.append(table)
    return tables


@torch.no_grad()
def fill_cache(
    policy: nn.Module,
    loaders: dict[str, DataLoader],
    chunk_size: int,
    needs_kl_rows: bool,
    precision: str = "32-true",
) -> dict[str, Tensor]:
    """Score every row of every split with the (untrained) policy, in eval mode.

    Under DDP every rank calls it: each scores its shard of the batches (`_shard`), and the ranks
    gather each other's rows, so every rank gets the whole table in about 1/N of the time.
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
    with eval_mode(policy), _as_trained(policy, precision, device), eager():
        for split, loader in loaders.items():
            index, main, kl = _score(
                policy, _shard(loader, split), device, chunk_size, needs_kl_rows, dtype, split
            )
            rows = len(cast(Rows, loader.dataset))
            table[f"{split}/main"], table[f"{split}/kl"] = _merge(split, rows, index, main, kl)
    policy.to(home)
    return table


def table_checksum(table: dict[str, Tensor]) -> str:
    """A hash of a table's tensors: names, dtypes, shapes and bytes (any edit changes it).

    The table is two floats a row (16 MB for a million rows): hashing it costs milliseconds.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, values in sorted(table.items()):
        digest.update(f"{name}:{values.dtype}:{tuple(values.shape)}".encode())
        digest.update(values.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_table(path: Path) -> tuple[dict[str, Tensor] | None, str | None]:
    """The table in the cache file `path`, checked against its checksum: (table, None); (None,
    None) when there is no file; (None, what is wrong) when it cannot be trusted."""
    if not path.is_file():
        return None, None
    try:
        with safe_open(str(path), framework="pt") as handle:
            recorded = (handle.metadata() or {}).get(CHECKSUM)
            names = handle.keys()  # a safe_open handle is not iterable
            # Copies, not views of the mapped file: the values checked are the values used,
            # whatever later happens to the file.
            table = {name: handle.get_tensor(name).clone() for name in names}
    except (SafetensorError, OSError) as error:
        return None, f"it cannot be read ({error})"
    if recorded is None:
        return None, "it holds no checksum (written by an older kto_lightning)"
    if table_checksum(table) != recorded:
        return None, "its contents do not match their checksum (the file was changed)"
    return table, None


def write_table(table: dict[str, Tensor], path: Path) -> None:
    """Write `table` to `path` with its checksum, atomically: a crash or a concurrent run never
    leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    save_file(table, str(partial), metadata={CHECKSUM: table_checksum(table)})
    os.replace(partial, path)


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

    A file that fails its check (`read_table`) is a miss: logged, filled again and replaced.
    `precision` (the trainer's) must be the one `key` was computed with. Under DDP every rank
    calls it: a miss on any rank has them all fill the table together, and rank 0 writes it.
    """
    path = Path(cache_dir) / f"{key}.safetensors"
    rank, world = distributed.rank(), distributed.world_size()
    table, problem = read_table(path)
    # The ranks must agree on the key (shards of other tables make no table) and on filling or
    # not (a rank that reads while the others fill leaves them waiting in the merge for ever):
    # every rank checks the file it sees, and one whose check fails has them all fill it.
    keys, found, problems = zip(
        *distributed.gather_objects((key, table is not None, problem)), strict=True
    )
    if len(set(keys)) > 1:
        raise RuntimeError(
            f"the ranks computed different reference cache keys {list(keys)}: their initial "
            "weights or data differ, and a table merged from them would be wrong"
        )
    if all(found):
        if rank == 0:
            log.info("reference log-probs: read from the cache %s", path)
        return cast(dict[str, Tensor], table), True
    reported = next((p for p in problems if p is not None), None)
    if rank == 0 and reported is not None:
        log.warning("reference cache %s is not used: %s; scoring it again", path, reported)
    elif rank == 0:
        shards = f" ({world} ranks, each scoring a shard)" if world > 1 else ""
        log.info(
            "reference log-probs: not cached yet; scoring every row once%s -> %s", shards, path
        )
    table = fill_cache(policy, loaders, chunk_size, needs_kl_rows, precision)
    if rank == 0:
        write_table(table, path)
    distributed.barrier()  # on return the file is there, on every rank
    return table, False


@dataclass(frozen=True)
class CachePlan:
    """A cache file's key and how to fill it: what `load_or_fill_cache` needs but the policy."""

    cache_dir: str
    key: str
    loaders: dict[str, DataLoader]
    chunk_size: int
    needs_kl_rows: bool
    precision: str

    def table(self, policy: nn.Module) -> dict[str, Tensor]:
        """The table, read or filled (and written); under DDP, every rank calls it."""
        table, _ = load_or_fill_cache(
            self.cache_dir,
            self.key,
            policy,
            self.loaders,
            self.chunk_size,
            self.needs_kl_rows,
            self.precision,
        )
        return table


def cache_plan(
    spec: CacheSettings,
    policy: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    datamodule,
    chunk_size: int,
    needs_kl_rows: bool,
    precision: str,
) -> CachePlan:
    """The plan of the table of the set-up `datamodule`'s train and validation rows.

    The key is computed here, from the policy's weights as they are now: before training.
    """
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
    return CachePlan(spec.cache_dir, key, loaders, chunk_size, needs_kl_rows, precision)
