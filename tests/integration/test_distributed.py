"""Two CPU processes (gloo) agree with one process over the same global batch, with DDP and FSDP2.

The global batch is split unevenly: 5 rows on rank 0 (3 desirable, 2 undesirable) and 3 rows on
rank 1 (all undesirable). Averages of per-rank averages would differ from the single-process
numbers here; sums and counts reduced across ranks must not.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule

from kto_lightning.common.distributed import all_reduce_sum, gather_cat
from kto_lightning.core.losses import KTOLoss
from kto_lightning.core.metrics import metrics_from_sums, reward_auroc
from kto_lightning.data import KTOCollator
from kto_lightning.data.tokenize import Example
from kto_lightning.models import TinyLlama, make_reference
from kto_lightning.models.byte_tokenizer import byte_level_tokenizer
from kto_lightning.models.reference import CopyReference
from kto_lightning.training.module import KTOModule
from kto_lightning.training.strategies import shard_models

LABELS = [True, True, True, False, False, False, False, False]
SPLIT = (slice(0, 5), slice(5, 8))  # rank 0: 3 desirable + 2 undesirable; rank 1: 3 undesirable


def _module() -> KTOModule:
    torch.manual_seed(0)
    policy = TinyLlama(hidden_size=32, num_layers=1).load_policy()
    reference = CopyReference(make_reference(policy))
    # Move the two apart so that rewards and the reference point are not 0. Noise sharpens a
    # random-init model's distributions, lowering its log-probs of unrelated text, so noise on
    # the reference (more) and on the policy (less) makes the KL log-ratio positive: z_ref > 0.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model, scale in ((reference.model, 0.2), (policy, 0.05)):
            for parameter in model.parameters():
                parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    loss = KTOLoss(beta=0.1, desirable_weight=1.3, undesirable_weight=1.0)
    optimizer = functools.partial(torch.optim.SGD, lr=0.1)
    return KTOModule(policy, reference, loss, optimizer)


def _batch(rows: slice) -> dict[str, torch.Tensor]:
    tokenizer = byte_level_tokenizer()
    examples = []
    for i, label in enumerate(LABELS):
        prompt = tokenizer(f"Question {i}: what is {i} plus {i}?")["input_ids"]
        completion = tokenizer(f"It is {2 * i}." if label else f"No idea about {i}.")["input_ids"]
        partner = tokenizer(f"Unrelated answer number {7 * i + 3}.")["input_ids"]
        examples.append(Example([256, *prompt], [*completion, 257], label, partner, i))
    return KTOCollator(pad_token_id=258)(examples[rows])


def _results(
    module: KTOModule, batch: dict[str, torch.Tensor], sharded: bool = False
) -> dict[str, torch.Tensor]:
    """What a step produces, reduced as the module reduces it: metrics, loss and gradients.

    `sharded`: the models are split by FSDP2, whose gradients are already averaged over ranks
    (each rank holds a shard of them, gathered here); DDP's average is emulated otherwise.
    """
    module.train()
    module.policy.zero_grad()
    result = module._step(batch, "train")
    loss, sums, rewards = result.loss, result.metric_sums, result.output.rewards
    loss.backward()
    out = {f"metric/{k}": v for k, v in metrics_from_sums(all_reduce_sum(sums)).items()}
    world = dist.get_world_size() if dist.is_initialized() else 1
    # DDP averages gradients over ranks; the loss a step reports is the mean over ranks too.
    out["loss"] = all_reduce_sum(loss.detach()) / world
    for name, parameter in module.policy.named_parameters():
        grad = parameter.grad
        out[f"grad/{name}"] = grad.full_tensor() if sharded else all_reduce_sum(grad) / world
    labels = gather_cat(batch["labels"].to(torch.uint8)).bool()
    out["auroc"] = reward_auroc(gather_cat(rewards), labels)
    return out


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Both layouts in one pair of processes (one start-up of each): plain DDP, then FSDP2."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for kind in KINDS:
            module = _module()
            sharded = kind == "fsdp2"
            if sharded:
                shard_models(module, init_device_mesh("cpu", (world,)))
                assert isinstance(module.policy, FSDPModule)
                assert isinstance(module.reference.model, FSDPModule)
                head = module.policy.get_output_embeddings().weight
                assert head.to_local().shape[0] < head.shape[0], "the LM head must be sharded"
            results = _results(module, _batch(SPLIT[rank]), sharded)
            torch.save(results, Path(out_dir) / f"{kind}_rank{rank}.pt")
        # Both ranks done with every collective before either tears gloo down: a rank that
        # destroys the group while its peer still waits on one can abort the peer.
        dist.barrier()
    finally:
        dist.destroy_process_group()


KINDS = ("ddp", "fsdp2")


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("two_ranks")
    mp.spawn(_worker, args=(2, str(folder / "init"), str(folder)), nprocs=2, join=True)
    return folder


@pytest.fixture(params=KINDS)
def two_ranks(request, spawned: Path) -> list[dict[str, torch.Tensor]]:
    return [torch.load(spawned / f"{request.param}_rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_every_rank_sees_the_same_numbers(two_ranks) -> None:
    first, second = two_ranks
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, equal_nan=True)


def test_two_processes_equal_one_over_the_same_global_batch(two_ranks) -> None:
    single = _results(_module(), _batch(slice(0, 8)))
    distributed = two_ranks[0]
    assert single["metric/kl"] > 0, "the reference point must be non-zero to be tested"
    assert set(single) == set(distributed)
    for key in single:
        torch.testing.assert_close(
            distributed[key], single[key], rtol=0, atol=1e-5, equal_nan=True, msg=key
        )
