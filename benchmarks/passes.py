"""Where one kto_lightning training step spends its time, part by part.

    python benchmarks/passes.py                # bench.py's (a): live reference, max_length 256
    python benchmarks/passes.py --batches 10 --chunk-size 256

Builds the same run as bench.py's comparison (a) (the overrides of benchmarks/runners.py), then
times each part of a step on the same batches, outside Lightning's loop:
  1. policy log-probs of the main rows, with grad (and the backbone alone, without the LM head)
  2. policy log-probs of the KL rows, no grad
  3. reference log-probs of main + KL rows in one forward, no grad (and its backbone alone)
  4. backward of a KTO-shaped loss over 1 and 3
  5. gradient clipping, the AdamW step and zero_grad
Each figure is the median over --batches batches, after one warm-up batch. The parts add up to a
little less than bench.py's step time, which also holds Lightning's bookkeeping and the metrics.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from fixture import FixtureSpec, build_fixture
from runners import BETA, LEARNING_RATE, ChildSpec, ours_overrides

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=6, help="timed batches (after 1 warm-up)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--chunk-size", type=int, help="logprob_chunk_size (default: the config's)")
    parser.add_argument("--fixture-dir", type=Path, default=HERE / ".fixture")
    args = parser.parse_args(argv)

    import torch
    from hydra import compose, initialize_config_dir

    from kto_lightning.cli.config_files import config_dir
    from kto_lightning.cli.run_build import build
    from kto_lightning.core.logprobs import sequence_logprobs

    folder = args.fixture_dir.resolve() / "full"
    model_dir = build_fixture(folder, FixtureSpec())
    spec = ChildSpec(
        impl="ours",
        reference="live",
        model_dir=str(model_dir),
        rows=str(folder / "rows.jsonl"),
        val_rows=str(folder / "val.jsonl"),
        max_length=args.max_length,
        max_prompt_length=args.max_length // 2,
        steps=1,
    )
    workdir = Path(tempfile.mkdtemp(prefix="kto_passes_"))
    overrides = ours_overrides(spec, workdir)
    if args.chunk_size:
        overrides.append(f"logprob_chunk_size={args.chunk_size}")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    run = build(cfg)
    module, chunk = run.module, cfg.logprob_chunk_size
    policy, reference = module.policy.train(), module.reference
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LEARNING_RATE)
    loader = iter(run.datamodule.train_dataloader())
    batches = [next(loader) for _ in range(args.batches + 1)]

    seconds: dict[str, list[float]] = defaultdict(list)

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        seconds[name].append(time.perf_counter() - start)
        return out

    def backbone(model: torch.nn.Module, batch: dict, prefix: str = "") -> Any:
        mask = batch[f"{prefix}attention_mask"]
        return model.get_decoder()(
            input_ids=batch[f"{prefix}input_ids"],
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=False,
        )

    def logps(model: torch.nn.Module, batch: dict, prefix: str = "") -> torch.Tensor:
        keys = ("input_ids", "attention_mask", "completion_mask")
        return sequence_logprobs(model, *(batch[prefix + k] for k in keys), chunk_size=chunk)

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    keys = ("input_ids", "attention_mask", "completion_mask")
    for b in batches:
        timed("1a policy backbone, main rows (grad)", partial(backbone, policy, b))
        pol = timed("1  policy log-probs, main rows (grad)", partial(logps, policy, b))
        with torch.no_grad():
            timed("2  policy log-probs, KL rows (no grad)", partial(logps, policy, b, "kl_"))
            ref, _ = timed(
                "3  reference log-probs, main + KL rows",
                partial(reference.logps, policy, b, "train", chunk, True),
            )
            if hasattr(reference, "model"):  # a live copy: its backbone alone
                both = {k: torch.cat([b[k], b[f"kl_{k}"]]) for k in keys}
                name = "3a reference backbone, main + KL rows"
                timed(name, partial(backbone, reference.model, both))
        loss = (1 - torch.sigmoid(BETA * (pol - ref))).mean()
        timed("4  backward", loss.backward)
        timed("5  clip + AdamW step + zero_grad", step)

    medians = {name: statistics.median(values[1:]) for name, values in sorted(seconds.items())}
    total = sum(v for name, v in medians.items() if name[1] == " ")
    print(f"\nkto_lightning step parts, max_length {args.max_length}, logprob_chunk_size {chunk},")
    print(f"torch threads {torch.get_num_threads()}; median of {args.batches} batches:")
    for name, value in medians.items():
        share = f"{value / total:5.0%}" if name[1] == " " else "     "
        print(f"  {name:<42} {value:6.3f} s  {share}")
    print(f"  {'sum of 1-5':<42} {total:6.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
