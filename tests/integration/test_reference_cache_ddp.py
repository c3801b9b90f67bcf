"""Two CPU processes (gloo) fill the reference cache together: each rank scores its own shard.

Every rank builds the same tiny policy and data, as DDP ranks do, and fills the cache as
`CachedReference.prepare` does; the rows each rank scores are recorded by wrapping the scoring
function. One process filling the same cache in this test's process is the oracle. (A 2-process
CLI run with `reference=cache` is in test_config_runs.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from kto_lightning.data import KTODataModule
from kto_lightning.models import TinyLlama, reference_cache
from kto_lightning.models.byte_tokenizer import byte_level_tokenizer
from kto_lightning.models.reference import ReferenceSpec

SPLITS = ("train", "validation")
NAMES = {f"{split}/{rows}" for split in SPLITS for rows in ("main", "kl")}


def _fill(cache_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """This process's table, the file's, and the rows it scored in each split."""
    torch.manual_seed(0)
    policy = TinyLlama(hidden_size=32, num_layers=1).load_policy()
    tokenizer = byte_level_tokenizer()
    datamodule = KTODataModule(
        tokenizer,
        source={"path": "toy", "toy_rows": 60, "val_fraction": 0.1},
        batching={"batch_size": 4},
    )
    datamodule.setup()
    scored: dict[str, torch.Tensor] = {}
    score = reference_cache._score

    def recording(*args):
        index, main, kl = score(*args)
        scored[args[-1]] = index  # the last argument names the split
        return index, main, kl

    reference_cache._score = recording
    try:
        spec = ReferenceSpec(kind="cache", cache_dir=str(cache_dir), batch_size=4)
        plan = reference_cache.cache_plan(spec, policy, tokenizer, datamodule, 64, True, "32-true")
        table = plan.table(policy)
    finally:
        reference_cache._score = score
    (path,) = cache_dir.glob("*")  # one file, no partial one left behind
    return {"table": table, "file": load_file(path), "scored": scored}


def _worker(rank: int, world: int, folder: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world
    )
    try:
        torch.save(_fill(Path(folder) / "cache"), Path(folder) / f"rank{rank}.pt")
        dist.barrier()  # both done with every collective before either tears gloo down
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("cache_ddp")
    mp.spawn(_worker, args=(2, str(folder)), nprocs=2, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_two_ranks_fill_the_table_one_process_fills(two_ranks, tmp_path) -> None:
    single = _fill(tmp_path / "cache")["table"]
    assert single.keys() == NAMES
    # Every rank holds the merged table, and it is the one file both ranks see.
    for merged in (rank[held] for rank in two_ranks for held in ("table", "file")):
        assert merged.keys() == NAMES
        for name, values in single.items():
            assert not values.isnan().any(), name
            torch.testing.assert_close(merged[name], values, rtol=0, atol=1e-6, msg=name)


def test_every_row_is_scored_once_by_one_rank(two_ranks) -> None:
    first, second = (rank["scored"] for rank in two_ranks)
    for split in SPLITS:
        rows = len(two_ranks[0]["table"][f"{split}/main"])
        assert len(first[split]) and len(second[split]), "each rank must score a shard"
        both = torch.cat([first[split], second[split]])
        assert torch.equal(both.sort().values, torch.arange(rows)), split


def test_a_row_scored_twice_or_never_stops_the_merge() -> None:
    with pytest.raises(RuntimeError, match=r"rows \[1, 2\] were scored \[2, 0\] times"):
        reference_cache._merge("train", 4, torch.tensor([0, 1, 1, 3]), torch.zeros(4))
