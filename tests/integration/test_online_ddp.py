"""Online KTO under DDP: two CPU processes of 2 prompts (or rows) a step each sample, label and
train on exactly what one process of 4 does, in the `step` and the `round` loop.

Each prompt's completions are seeded by its row (not by the rank or the batch), the KL pairs are
drawn over all ranks' completions, and the loss is normalised by the counts of all ranks: so the
two runs draw the same samples and end with the same weights. Validation, whose batches differ
in number across ranks, reports the same held-out rewards.

The runs compare what they drew from the same weights: the step loop's first step, and the round
loop's first round (4 steps on the round's rows). Once the weights have been updated, the two
differ by float rounding (a sum over ranks is added in another order), and a later draw may take
another token where two were within that rounding of each other.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_online_cli import ONLINE, sums

LOOPS = {
    # 4 prompts a step, k = 2: one step.
    "step": ["online=step", "trainer.max_steps=1"],
    # 8 prompts a round, k = 2, 4 rows a step: 4 steps on the round's rows.
    "round": ["online=round", "online.round.prompts=8", "trainer.max_epochs=1"],
}
STEPS = {"step": 1, "round": 4}
SINGLE = ["trainer.devices=1", "data.batching.batch_size=4"]
TWO_RANKS = ["strategy=ddp", "trainer.devices=2", "data.batching.batch_size=2"]


def _launch(folder: Path, prompts: Path, overrides: list[str]) -> subprocess.Popen:
    here = Path(__file__).parent  # the reward function's module, and the helpers it imports
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(folder / "hf"),
        "PYTHONPATH": os.pathsep.join([str(here), str(here.parent)]),
    }  # fmt: skip
    args = [
        *ONLINE, "trainer.limit_train_batches=1.0", "trainer.accelerator=cpu", "data=local",
        f"data.source.path={prompts}", "data.source.val_fraction=0.1",
        "reward=function", "reward.path=test_online_cli:vowel_share",
        "callbacks.online_samples.every_n_steps=1", "callbacks.generations.num_prompts=0",
        "validate_before_training=false", f"hydra.run.dir={folder}", *overrides,
    ]  # fmt: skip
    folder.mkdir(parents=True)
    return subprocess.Popen(
        [sys.executable, "-m", "kto_lightning.train", *args], cwd=folder, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Both loops, one process and two, run at once (most of each run is start-up)."""
    folder = tmp_path_factory.mktemp("online_ddp")
    sums(folder)
    processes = {
        (loop, name): _launch(folder / loop / name, folder / "sums.jsonl", [*extra, *layout])
        for loop, extra in LOOPS.items()
        for name, layout in (("single", SINGLE), ("two_ranks", TWO_RANKS))
    }
    for (loop, name), process in processes.items():
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, f"{loop}/{name}:\n{output[-3000:]}"
    return folder


def _samples(run: Path) -> dict[int, list[dict]]:
    """Rank 0's draw at each step (the samples table), by step."""
    return {
        int(path.stem.removeprefix("step_")): [json.loads(line) for line in path.open()]
        for path in (run / "samples").glob("step_*.jsonl")
    }


def _last_validation(run: Path) -> dict[str, float]:
    with (run / "csv" / "metrics.csv").open() as file:
        rows = [r for r in csv.DictReader(file) if r.get("val/online/reward_greedy")]
    return {k: float(v) for k, v in rows[-1].items() if k.startswith("val/online/") and v}


@pytest.mark.parametrize("loop", list(LOOPS))
def test_two_processes_sample_and_train_what_one_process_does(runs: Path, loop: str) -> None:
    single, two = runs / loop / "single", runs / loop / "two_ranks"
    alone, rank_0 = _samples(single), _samples(two)
    assert sorted(alone) == sorted(rank_0) == list(range(1, STEPS[loop] + 1))
    for step, rows in rank_0.items():
        # Rank 0 drew half of the step's completions, each as the one process drew it.
        drawn = {json.dumps(r, sort_keys=True) for r in alone[step]}
        assert rows and len(rows) < len(alone[step]), step
        assert all(json.dumps(r, sort_keys=True) in drawn for r in rows), step
    expected = load_file(single / "hf_model" / "model.safetensors")
    got = load_file(two / "hf_model" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-5, msg=name)
    assert _last_validation(two) == pytest.approx(_last_validation(single), abs=1e-6)
