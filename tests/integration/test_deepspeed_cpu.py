"""DeepSpeed ZeRO-3 partitions the LM head's weight; the chunked head must still score and train.

Lightning's DeepSpeedStrategy refuses a CPU accelerator, but DeepSpeed itself runs on CPU
processes over gloo. So this test drives a ZeRO-3 engine directly: 2 processes, each with half
the batch, against 1 process without DeepSpeed. Reading `lm_head.weight` under ZeRO-3 finds an
empty placeholder; the head must be called as a module so that DeepSpeed's hooks gather it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from kto_lightning.core.logprobs import sequence_logprobs
from kto_lightning.models import TinyLlama

pytest.importorskip("deepspeed")

CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "zero_optimization": {"stage": 3},
    "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
    "zero_allow_untested_optimizer": True,
}
COEF = torch.tensor([0.7, -1.3, 0.4, 1.1])


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (4, 12), generator=generator)
    am = torch.ones_like(ids)
    cm = torch.zeros_like(ids)
    cm[:, 5:] = 1
    return ids, am, cm


def _policy() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyLlama(hidden_size=32, num_layers=2).load_policy()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world), DS_ACCELERATOR="cpu",
    )  # fmt: skip
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed(dist_backend="gloo")
    model = _policy()
    engine, *_ = deepspeed.initialize(
        model=model, config=CONFIG, model_parameters=model.parameters()
    )
    head = model.get_output_embeddings().weight
    assert head.numel() == 0, "ZeRO-3 must have partitioned the head"
    rows = slice(2 * rank, 2 * rank + 2)
    ids, am, cm = (t[rows] for t in _batch())
    logps = sequence_logprobs(engine.module, ids, am, cm, chunk_size=3)
    # DeepSpeed averages gradients over ranks: scale so that they equal one process's sum.
    engine.backward((logps * COEF[rows]).sum() * world)
    grads = {n: safe_get_full_grad(p) for n, p in model.named_parameters()}
    gathered = [torch.zeros_like(logps) for _ in range(world)]
    torch.distributed.all_gather(gathered, logps.detach())
    if rank == 0:
        torch.save({"logps": torch.cat(gathered), **grads}, Path(out_dir) / "zero3.pt")


def test_zero3_partitioned_head_scores_and_trains_like_one_process(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    zero3 = torch.load(tmp_path / "zero3.pt", weights_only=True)
    model = _policy()
    logps = sequence_logprobs(model, *_batch(), chunk_size=3)
    (logps * COEF).sum().backward()
    torch.testing.assert_close(zero3["logps"], logps.detach(), rtol=0, atol=1e-5)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(zero3[name], parameter.grad, rtol=1e-5, atol=1e-6, msg=name)
    assert zero3["lm_head.weight"].abs().sum() > 0
