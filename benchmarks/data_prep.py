"""Data-preparation benchmark: N unpaired rows of ~100 tokens through KTODataModule.setup.

Rows are synthetic (seeded words from the benchmark fixture's lexicon, no download), about 50
words of prompt and 50 of completion, written once to a JSON-lines file per N. Each configuration
runs in its own process, so that its peak RSS is its own: `cold` on an empty datasets cache
folder, `warm` a second process on the same folder. The time is that of `setup()` plus the first
training batch, exactly as training prepares its data (the source file is read, normalised,
tokenized, filtered and paired).

    python benchmarks/data_prep.py                      # 50k, 200k and 1M rows (~20 min)
    python benchmarks/data_prep.py --rows 200000 --skip-trl --num-proc 2

TRL 1.16's KTOTrainer preparing the same rows is timed beside ours, up to --trl-max-rows. The
`worker RSS` column is the largest peak RSS of datasets.map's worker processes (num_proc > 1,
forked from the main process, whose pages they share and count too). The `target` column
checks the targets of 2-core machines: 200k rows <= 30 s cold and <= 5 s warm,
1M rows <= 3 min cold with a peak RSS <= 2 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from runners import run_measured  # noqa: E402


def write_rows(path: Path, n: int, seed: int = 0) -> None:
    """`n` rows of ~50 + ~50 words (about 100 tokens with the fixture's tokenizer)."""
    from fixture import _ADJECTIVES, _NOUNS, _VERBS

    words = [*_NOUNS, *_VERBS, *_ADJECTIVES]
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for _ in range(n):
            prompt = " ".join(rng.choices(words, k=rng.randint(40, 60)))
            completion = " " + " ".join(rng.choices(words, k=rng.randint(40, 60)))
            row = {"prompt": prompt, "completion": completion, "label": rng.random() < 0.5}
            f.write(json.dumps(row) + "\n")
    tmp.rename(path)


def child_main(spec: dict) -> None:
    """Prepare the data as training does and print the seconds it took (one JSON line)."""
    from transformers import AutoTokenizer

    from kto_lightning.data.datamodule import KTODataModule

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    start = time.perf_counter()
    data = KTODataModule(
        tokenizer,
        source={"path": spec["path"], "cache_dir": spec["cache_dir"], "num_proc": spec["num_proc"]},
        batching={"batch_size": 8},
    )
    data.setup("fit")
    next(iter(data.train_dataloader()))
    seconds = time.perf_counter() - start
    summary = data.summaries["train"]
    # The largest RSS of datasets.map's worker processes (num_proc > 1), all ended by now; none
    # where the map ran in this process (another child, such as a tool a library runs, is not
    # one of them).
    rows = sum(s.rows_read for s in data.summaries.values())
    pooled = (data.source.processes_for(rows) or 1) > 1
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if pooled else 0.0
    print(json.dumps({"seconds": seconds, "train_rows": summary.kept, "worker_rss": workers}))


def trl_child_main(spec: dict) -> None:
    """TRL 1.16's KTOTrainer preparing the same rows: the file read with datasets (as its docs
    do), then the trainer's own `_prepare_dataset` (prompt and prompt+completion tokenized row by
    row, KL completions rotated within each batch), and its first training batch."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer"])
    policy = AutoModelForCausalLM.from_pretrained(spec["tokenizer"], dtype=torch.float32)
    args = KTOConfig(
        output_dir=str(Path(spec["cache_dir"]) / "trl"),
        per_device_train_batch_size=8,
        max_length=256,
        dataset_num_proc=spec["num_proc"],
        use_cpu=True,
        bf16=False,
        report_to="none",
        disable_tqdm=True,
    )
    start = time.perf_counter()
    rows = datasets.load_dataset(
        "json", data_files=spec["path"], split="train", cache_dir=spec["cache_dir"]
    )
    trainer = KTOTrainer(model=policy, args=args, train_dataset=rows, processing_class=tokenizer)
    next(iter(trainer.get_train_dataloader()))
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "train_rows": len(trainer.train_dataset)}))


def run_child(spec: dict) -> tuple[float, float, float]:
    """(seconds, peak RSS, largest map worker's peak RSS; MiB) of one configuration, in a fresh
    process."""
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    # The peak RSS is the process itself, not datasets.map's worker processes (num_proc > 1).
    out, peak = run_measured(cmd, env)
    result = json.loads(out.strip().splitlines()[-1])
    return result["seconds"], peak, result.get("worker_rss", 0.0)


def header() -> str:
    names = ("torch", "transformers", "datasets", "pyarrow", "numpy", "kto_lightning")
    versions = ", ".join(f"{n} {metadata.version(n)}" for n in names)
    mem_kib = 0
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"  python {platform.python_version()}, {versions}\n"
        f"  machine: nproc {os.cpu_count()}, {mem_kib / 1024**2:.1f} GiB RAM; "
        f"load average at start {load}"
    )


# The targets on 2 cores: rows -> (cold s, warm s, peak RSS MiB); None: no target.
TARGETS = {200_000: (30.0, 5.0, None), 1_000_000: (180.0, None, 2048.0)}


def verdict(n: int, cold: float, warm: float, rss: float) -> str:
    """'met' / 'MISSED (...)' against TARGETS, or '' where `n` rows have none."""
    if n not in TARGETS:
        return ""
    cold_max, warm_max, rss_max = TARGETS[n]
    missed = [
        f"{what} {value:.1f} > {limit:g}"
        for what, value, limit in (("cold", cold, cold_max), ("warm", warm, warm_max),
                                   ("RSS", rss, rss_max))
        if limit is not None and value > limit
    ]  # fmt: skip
    return "MISSED (" + "; ".join(missed) + ")" if missed else "met"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[50_000, 200_000, 1_000_000])
    parser.add_argument("--num-proc", type=int, default=None, help="data.source.num_proc")
    parser.add_argument("--skip-trl", action="store_true", help="time kto_lightning alone")
    parser.add_argument(
        "--trl-max-rows", type=int, default=1_000_000,
        help="time TRL's preprocessing up to this many rows (it takes ~4x ours per row)",
    )  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=HERE / ".data_prep")
    parser.add_argument("--fixture-dir", type=Path, default=HERE / ".fixture")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        (trl_child_main if spec["runner"] == "trl" else child_main)(spec)
        return 0

    from fixture import build_fixture

    tokenizer = build_fixture(args.fixture_dir / "full")
    args.workdir.mkdir(parents=True, exist_ok=True)
    print("data preparation: from a JSON-lines file to the first training batch")
    print(header())
    print(f"  num_proc {args.num_proc}; the benchmark fixture's BPE tokenizer; ~100 tokens a row")
    print("  ours: KTODataModule.setup; TRL: load_dataset + KTOTrainer's _prepare_dataset")
    print(
        f"{'rows':>9}  {'runner':>6}  {'cold s':>7}  {'warm s':>7}  {'RSS cold':>9}  "
        f"{'RSS warm':>9}  {'worker RSS':>9}  target"
    )
    for n in args.rows:
        path = args.workdir / f"rows_{n}.jsonl"
        if not path.exists():
            write_rows(path, n)
        runners = ["ours"]
        if not args.skip_trl and n <= args.trl_max_rows:
            runners.append("trl")
        for runner in runners:
            cache_dir = tempfile.mkdtemp(prefix="cache-", dir=args.workdir)
            try:
                spec = {
                    "runner": runner,
                    "path": str(path),
                    "cache_dir": cache_dir,
                    "num_proc": args.num_proc,
                    "tokenizer": str(tokenizer),
                }
                cold, cold_rss, cold_workers = run_child(spec)
                warm, warm_rss, _ = run_child(spec)
            finally:
                shutil.rmtree(cache_dir, ignore_errors=True)
            target = verdict(n, cold, warm, max(cold_rss, warm_rss)) if runner == "ours" else ""
            workers = f"{cold_workers:>5.0f} MiB" if cold_workers else f"{'-':>9}"
            print(
                f"{n:>9}  {runner:>6}  {cold:>7.1f}  {warm:>7.1f}  {cold_rss:>5.0f} MiB  "
                f"{warm_rss:>5.0f} MiB  {workers}  {target}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
