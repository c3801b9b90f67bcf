"""Packed vs padded training steps on CPU: seconds per step, real tokens and model slots per step.

    python benchmarks/packing.py                    # the default tiny model and toy data
    python benchmarks/packing.py --hidden 256 --layers 4 --steps 10

Builds the defaults of conf/train.yaml by hand (data=toy: 1200 rows, max_length 192, max prompt
64, batch 16 with KL rows; model=tiny; reference=copy; AdamW) and times whole KTO steps (policy
main + KL, reference main + KL, loss, backward, optimizer step) on the same batches, padded
(`data.batching.packing=false`) and packed (`true`, packs up to the batch's longest row).
"Slots" are the positions the backbone computes: B x L padded, P x T packed (main + KL rows).
Steps alternate between the two paths batch by batch; prints the median over --steps steps
after one warm-up step, and each path's peak RSS, measured in a fresh process of its own taking
the same steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial

import torch
from runners import run_measured

from kto_lightning.core.losses import KTOLoss
from kto_lightning.core.packing import Packing, pack_rows
from kto_lightning.data import KTODataModule
from kto_lightning.models import TinyLlama, make_reference
from kto_lightning.models.reference import CopyReference
from kto_lightning.training.module import KTOModule


def slots(batch: dict[str, torch.Tensor], packing: Packing | None) -> tuple[int, int]:
    """(real tokens, backbone positions) of one step's main + KL rows."""
    keys = ("input_ids", "attention_mask", "completion_mask")
    ids, attention, completion = (torch.cat([batch[k], batch[f"kl_{k}"]]) for k in keys)
    real = int(attention.sum())
    if packing is None:
        return real, ids.numel()
    return real, pack_rows(ids, attention, completion, packing.max_tokens).input_ids.numel()


def build(args, packing: Packing | None) -> tuple[KTOModule, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyLlama(hidden_size=args.hidden, num_layers=args.layers, max_seq_len=256)
    policy = model.load_policy()
    policy.set_attn_implementation(args.attn)
    reference = CopyReference(make_reference(policy))
    loss = KTOLoss(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
    module = KTOModule(policy, reference, loss, partial(torch.optim.AdamW), packing=packing)
    return module.train(), torch.optim.AdamW(policy.parameters(), lr=5e-5)


def step(module: KTOModule, optimizer: torch.optim.Optimizer, batch) -> float:
    start = time.perf_counter()
    module._step(batch, "train").loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - start


def peak_rss_of(path: str, args: argparse.Namespace) -> float:
    """Peak RSS (MiB) of a fresh process that takes the same steps on one path alone."""
    cmd = [sys.executable, __file__, "--only", path, "--steps", str(args.steps)]
    cmd += ["--hidden", str(args.hidden), "--layers", str(args.layers)]
    cmd += ["--batch-size", str(args.batch_size), "--attn", args.attn]
    return run_measured(cmd)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 1 warm-up)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--attn", default="sdpa", choices=("sdpa", "eager"))
    parser.add_argument("--only", choices=("padded", "packed"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    tokenizer = TinyLlama().load_tokenizer()
    with tempfile.TemporaryDirectory() as cache:
        data = KTODataModule(
            tokenizer,
            source={"path": "toy", "toy_rows": 1200, "val_fraction": 0.1, "cache_dir": cache},
            lengths={"max_length": 192, "max_prompt_length": 64},
            batching={"batch_size": args.batch_size},
            seed=0,
        )
        data.setup("fit")
        loader = iter(data.train_dataloader())
        batches = [next(loader) for _ in range(args.steps + 1)]
    paths = {"padded": None, "packed": Packing()}
    if args.only:  # a child measuring its own peak RSS: the steps, one path, nothing printed
        module, optimizer = build(args, paths[args.only])
        for batch in batches:
            step(module, optimizer, batch)
        return
    print(
        f"model hidden {args.hidden}, {args.layers} layers, attn {args.attn}; batch "
        f"{args.batch_size} (+ KL rows); torch threads {torch.get_num_threads()}; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    runs = {name: build(args, packing) for name, packing in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    # Interleaved, padded then packed on each batch, so that a change in the machine's load
    # hits both alike; the first batch warms up.
    for i, batch in enumerate(batches):
        for name, (module, optimizer) in runs.items():
            seconds = step(module, optimizer, batch)
            if i > 0:
                times[name].append(seconds)
    print(
        f"{'path':8} {'s/step':>8} {'tokens/step':>12} {'slots/step':>11} {'padded/step':>12} "
        f"{'padding':>8} {'peak RSS':>9}"
    )
    for name, packing in paths.items():
        counts = [slots(b, packing) for b in batches[1:]]
        real = statistics.mean(c[0] for c in counts)
        positions = statistics.mean(c[1] for c in counts)
        print(
            f"{name:8} {statistics.median(times[name]):8.3f} {real:12.0f} {positions:11.0f} "
            f"{positions - real:12.0f} {1 - real / positions:8.1%} "
            f"{peak_rss_of(name, args):5.0f} MiB"
        )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
