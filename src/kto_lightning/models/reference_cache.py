"""The on-disk reference cache (`reference=cache`).

Every main row's and KL row's reference log-prob, scored once by the untrained policy and stored
under a content hash of (initial weights, tokenizer, tokenized data with its KL pairing, length
settings, trainer precision), so that no change to any of them reuses a stale table. The table
is scored the way the trainer will run the policy (`trainer.precision`), so that at step 0 the
policy's log-probs equal it exactly. Under DDP each rank scores a shard of the rows and the ranks
gather the shards into the one file, which rank 0 writes.

A file carries a checksum of its tensors (`cache_file.py`, in the safetensors header), checked
on every read: a file edited, truncated or written by another version is reported, in one log
line naming it, and filled again; a table that is not the one scored is never trained against.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from kto_lightning.common import distributed
from kto_lightning.common.compile_stance import eager
from kto_lightning.core.logprobs import batch_logprobs, eval_mode
from kto_lightning.models.cache_file import read_table, write_table
from kto_lightning.models.cache_key import (
    AUTOCAST_DTYPES,
    CAST_DTYPES,
    Rows,
    cache_key,
    trainer_precision,
)


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

# Names other modules import from here (the key and the file format have their own modules).
__all__ = [
    "CachePlan",
    "CacheSettings",
    "cache_plan",
    "fill_cache",
    "load_or_fill_cache",
]


@contextlib.contextmanager
def _as_trained(policy: nn.Module, precision: str, device: torch.device) -> Iterator[None]:
    """Run `policy` on `device` the way the trainer's precision plugin will run it in training.

    `*-mixed`: autocast, as Lightning's MixedPrecision does (16-mixed is bf16 on a CPU there too).
    `*-true`: the policy cast to the dtype, with it as the default dtype; the policy comes back in
    its own dtype, but 16-bit values stay rounded, as the trainer will round them anyway.
    """
    if precision in AUTOCAST_DTYPES:
        dtype = torch.bfloat16 if device.type == "cpu" else AUTOCAST_DTYPES[precision]
        with torch.autocast(device.type, dtype=dtype, cache_enabled=False):
            yield
        return
    if precision not in CAST_DTYPES:  # 32-true: the policy as it is
        yield
        return
    home_dtype, default_dtype = next(policy.parameters()).dtype, torch.get_default_dtype()
    policy.to(dtype=CAST_DTYPES[precision])
    torch.set_default_dtype(CAST_DTYPES[precision])
    try:
        yield
    finally:
        torch.set_default_dtype(default_dtype)
        policy.to(dtype=home_dtype)


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
