"""Online KTO against offline KTO on the bundled consistency task, from its SFT model.

    python benchmarks/online_demo.py        # SFT, then 3 seeds of each (~15 min, 2 CPUs)
    python benchmarks/online_demo.py --seeds 1 --sft outputs/sft/runs/<time>

The SFT stage (`loss=sft data=toy_consistency`) trains the tiny model from a random init; both
KTO runs then start from it, one epoch each, per seed:
- online, step loop: `online=step reward=consistency`, every step samples k=4 completions of 16
  prompts and labels them with the task's verifier (the reply names the object the prompt
  stated);
- online, round loop: `online=round`, 16 rounds of 125 prompts: each round samples and labels
  its 500 completions with the policy as it is at the round's start, then trains on them in 8
  steps of 64 rows (the reference stays the SFT model);
- offline: the task's own labelled rows, as many as the online run labels (125 steps x 64).

Each model (the SFT one and every KTO run's export) is then scored on the validation prompts,
whose objects no training prompt has: the share of greedy replies, and of k=4 sampled replies at
temperature 1 (seeded), that name the stated object. Prints a table (mean and spread over the
seeds) with each run's wall time, and the online runs' sampling share of a step and sampled
tokens/s (`make bench-online`).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from kto_lightning.data.config import Source
from kto_lightning.models import FromRun
from kto_lightning.online.prompt_data import PromptDataModule
from kto_lightning.online.rewards import ConsistencyVerifier, score
from kto_lightning.online.sampler import HFSampler
from kto_lightning.training.online_draws import draw_seed

TASK = ["data=toy_consistency", "trainer.enable_progress_bar=false", "progress.every_n_steps=0"]
PROMPTS_PER_STEP, K, STEPS = 16, 4, 125  # the online run: data.source.toy_rows=2000, one epoch
ROUNDS = 16  # the round loop's, over as many prompts: 8 steps a round


def train(run_dir: Path, *args: str) -> float:
    """One training command; its wall seconds."""
    start = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "kto_lightning.train",
        *TASK,
        *args,
        f"hydra.run.dir={run_dir}",
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def held_out_rewards(run_dir: Path, seed: int = 0) -> tuple[float, float]:
    """(greedy, sampled) mean verifier reward of the run's model on the validation prompts."""
    source = FromRun(run_dir=str(run_dir))
    tokenizer, policy = source.load_tokenizer(), source.load_policy()
    data = PromptDataModule(
        tokenizer, Source(path="toy_consistency", val_split="validation", toy_rows=2000)
    )
    data.setup()
    rows = data.val_set
    verifier = ConsistencyVerifier()
    means = []
    for sampler in (
        HFSampler.from_tokenizer(tokenizer, k=1, temperature=0.0, max_new_tokens=64),
        HFSampler.from_tokenizer(tokenizer, k=K, temperature=1.0, max_new_tokens=64),
    ):
        seeds = [draw_seed(seed, "held_out", r.index) for r in rows]
        samples = sampler.sample(policy, [r.prompt_ids for r in rows], seeds)
        owners = [rows[i] for i in samples.prompt_index.tolist()]
        prompts = [str(r.prompt) for r in owners]
        rewards = score(verifier, prompts, samples.texts(tokenizer), [r.fields for r in owners])
        means.append(float(rewards.mean()))
    return means[0], means[1]


def sampling_figures(run_dir: Path) -> tuple[float, float]:
    """The online run's mean share of a logged step spent sampling, and its sampled tokens/s."""
    with (run_dir / "csv" / "metrics.csv").open() as file:
        rows = [r for r in csv.DictReader(file) if r.get("train/online/sample_share")]
    if not rows:
        return float("nan"), float("nan")
    share = statistics.mean(float(r["train/online/sample_share"]) for r in rows)
    tokens = sum(float(r["train/online/completion_tokens"]) * PROMPTS_PER_STEP * K for r in rows)
    return share, tokens / sum(float(r["train/online/sample_seconds"]) for r in rows)


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    return f"{mean:.3f} ± {statistics.pstdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--sft", type=Path, help="an SFT run directory to start from")
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    work = Path(tempfile.mkdtemp(prefix="online_demo_"))
    sft = args.sft
    if sft is None:
        sft = work / "sft"
        seconds = train(sft, "loss=sft", "optimizer.lr=1e-3", "trainer.max_epochs=10",
                        "model.weights=null")  # fmt: skip
        print(f"SFT: {seconds:.0f} s")
    start = ["model=from_run", f"model.run_dir={sft}", f"optimizer.lr={args.lr}"]
    results: dict[str, list[tuple[float, float, float]]] = {
        "online (step loop)": [], "online (round loop, 16 rounds)": [], "offline": [],
    }  # fmt: skip
    shares: list[tuple[float, float]] = []
    for seed in args.seeds:
        online = work / f"online_{seed}"
        seconds = train(
            online, *start, "trainer.max_epochs=1", f"seed={seed}", "online=step",
            "reward=consistency",
        )  # fmt: skip
        results["online (step loop)"].append((*held_out_rewards(online), seconds))
        shares.append(sampling_figures(online))
        rounds = work / f"rounds_{seed}"
        seconds = train(
            rounds, *start, f"seed={seed}", "online=round", "reward=consistency",
            f"online.round.prompts={PROMPTS_PER_STEP * STEPS // ROUNDS}",
            f"trainer.max_epochs={ROUNDS}",
            f"data.batching.batch_size={PROMPTS_PER_STEP * K}",
        )  # fmt: skip
        results["online (round loop, 16 rounds)"].append((*held_out_rewards(rounds), seconds))
        offline = work / f"offline_{seed}"
        rows = PROMPTS_PER_STEP * K * STEPS
        seconds = train(
            offline, *start, "trainer.max_epochs=1", f"seed={seed}", f"data.source.toy_rows={rows}"
        )
        results["offline"].append((*held_out_rewards(offline), seconds))
    greedy, sampled = held_out_rewards(sft)
    print(f"\nheld-out prompts (unseen objects), seeds {args.seeds}, lr {args.lr}; {work}")
    print("| model | greedy reward | sampled reward (k=4, T=1) | wall time |")
    print("|---|---|---|---|")
    print(f"| SFT (start) | {greedy:.3f} | {sampled:.3f} | |")
    for name, runs in results.items():
        g, s, t = zip(*runs, strict=True)
        print(f"| + {name} KTO | {spread(list(g))} | {spread(list(s))} | "
              f"{statistics.mean(t):.0f} s |")  # fmt: skip
    share, speed = (statistics.mean(values) for values in zip(*shares, strict=True))
    print(f"online: sampling takes {share:.0%} of a step, at {speed:.0f} sampled tokens/s")


if __name__ == "__main__":
    main()
