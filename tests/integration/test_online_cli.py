"""Online KTO through the command line (`online=step reward=...`): on a prompts file of the
user's with a reference answer column, with a reward function of the user's by import path,
each one-line refusal, and SIGTERM then resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from cli import command_in_process, train_in_process
from conftest import FAST
from kto_lightning.online.rewards import ExactMatch, RegexMatch

ONLINE = [
    *(o for o in FAST if not o.startswith("data.")),
    "online=step",
    "online.sampling.k=2",
    "online.sampling.max_new_tokens=8",
    "data.batching.batch_size=4",
    "data.lengths.max_length=64",
    "data.lengths.max_prompt_length=32",
    "trainer.limit_train_batches=3",
]


def vowel_share(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """A reward of the user's, read by import path: the share of a completion's letters that
    are vowels (a random model's samples differ in it, so the group rule labels them)."""
    letters = [[ch for ch in c.lower() if ch.isalpha()] for c in completions]
    return [sum(ch in "aeiou" for ch in ls) / max(len(ls), 1) for ls in letters]


def sums(tmp_path: Path) -> list[dict]:
    """Arithmetic prompts with their answer: data that is not a bundled task."""
    rows = [{"prompt": f"{a} + {b} =", "answer": str(a + b)} for a in range(8) for b in range(5)]
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def logged(run: Path) -> set[str]:
    with (run / "csv" / "metrics.csv").open() as file:
        return set(next(csv.reader(file)))


def test_an_online_run_trains_on_its_own_samples_of_the_users_prompts(tmp_path: Path) -> None:
    sums(tmp_path)
    result = train_in_process(
        *ONLINE, "data=local", f"data.source.path={tmp_path}/sums.jsonl",
        "reward=function", "reward.path=test_online_cli:vowel_share",
        "callbacks.online_samples.every_n_steps=2", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    # The samples table at step 2: its 4 prompts' k=2 completions, each with its own reward.
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_2.jsonl"]
    table = [json.loads(line) for line in (run / "samples" / "step_2.jsonl").open()]
    assert len(table) == 4 * 2
    assert {"step", "prompt", "completion", "reward", "label", "kept"} == set(table[0])
    prompts = {row["prompt"] for row in sums(tmp_path)}
    assert all(r["prompt"] in prompts for r in table)
    rewards = vowel_share([], [r["completion"] for r in table], [])
    assert [r["reward"] for r in table] == pytest.approx(rewards)
    columns = logged(run)
    assert {"train/online/reward_mean", "train/online/sample_share"} <= columns, columns
    assert {"val/online/reward_greedy", "val/online/reward_sampled"} <= columns, columns
    assert "validation greedy reward" in result.stdout + result.stderr
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "hf_model" / "model.safetensors").is_file()
    # Each step's "auto" weights balance that step's draw: so do the run's (eq. 8, ratio 1).
    balance = class_balance(run)
    assert balance["status"] == "ok" and balance["value"].startswith("1 ("), balance
    assert f"path: {tmp_path}/sums.jsonl" in (run / ".hydra" / "config.yaml").read_text()
    # evaluate scores labelled rows; the run's prompts have none, and it says so in one line.
    evaluated = command_in_process("evaluate", f"ckpt_path={run}", cwd=tmp_path)
    assert evaluated.returncode != 0
    assert "this is an online KTO run (online=step): its data are prompts" in evaluated.stderr
    assert "Traceback" not in evaluated.stderr


def class_balance(run: Path) -> dict:
    """The health report's eq. 8 check of the run."""
    report = json.loads((run / "health.json").read_text())
    return next(c for c in report["checks"] if c["name"].startswith("class balance"))


def test_the_exact_and_regex_rewards_build_from_their_files(make_config, tmp_path: Path) -> None:
    rows = sums(tmp_path)
    exact = instantiate(make_config("online=step", "reward=exact_match").reward)
    assert isinstance(exact, ExactMatch)
    answers = [rows[0]["answer"], "9"]
    assert exact([rows[0]["prompt"]] * 2, answers, [rows[0], rows[0]]) == [1.0, 0.0]
    regex = instantiate(
        make_config("online=step", "reward=regex_match", "reward.pattern='^[0-9]+$'").reward
    )
    assert isinstance(regex, RegexMatch)
    assert regex(["p", "p"], ["12", "twelve"], [{}, {}]) == [1.0, 0.0]


def test_online_without_a_reward_function_stops_in_one_line(tmp_path: Path) -> None:
    result = train_in_process(*ONLINE, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode != 0
    assert "online=step needs a reward function: reward=consistency" in result.stderr
    assert "Traceback" not in result.stderr


def test_online_with_a_cached_reference_stops_in_one_line(tmp_path: Path) -> None:
    result = train_in_process(
        *ONLINE, "reward=consistency", "data=toy_consistency", "data.source.toy_rows=32",
        "reference=cache", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    assert "reference=cache holds log-probs of rows known before training" in result.stderr


def test_the_documented_reward_function_trains_an_online_run(tmp_path: Path, monkeypatch) -> None:
    # docs/online.md's Python block, as a user's module, named by its import path.
    page = (Path(__file__).parents[2] / "docs" / "online.md").read_text()
    code = page.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "my_rewards.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = train_in_process(
        *ONLINE, "reward=function", "reward.path=my_rewards:brevity", "data=toy_consistency",
        "data.source.toy_rows=32", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "val/online/reward_greedy" in logged(tmp_path / "run")


def same_for_all(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    return [1.0] * len(completions)


def test_draws_that_keep_nothing_are_skipped_and_said_so(tmp_path: Path) -> None:
    # One reward for every completion: each prompt's group is all-equal, dropped by default.
    result = train_in_process(
        *ONLINE, "reward=function", "reward.path=test_online_cli:same_for_all",
        "data=toy_consistency", "data.source.toy_rows=32", f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 of 3 training draws kept nothing to train on and were skipped" in (
        result.stdout + result.stderr
    )


def test_sigterm_then_resume_ends_with_the_uninterrupted_runs_weights(tmp_path: Path) -> None:
    args = [
        *ONLINE, "trainer.limit_train_batches=1.0", "trainer.max_steps=40",
        "trainer.limit_val_batches=0", "validate_before_training=false",
        "callbacks.last_checkpoint.every_n_train_steps=2", "data=toy_consistency",
        "data.source.toy_rows=256", "reward=function", "reward.path=test_online_cli:vowel_share",
    ]  # fmt: skip
    whole = train_in_process(*args, f"hydra.run.dir={tmp_path}/whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped = tmp_path / "stopped"
    here = Path(__file__).parent  # the reward function's module, and the helpers it imports
    path = os.pathsep.join([str(here), str(here.parent)])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": path}
    process = subprocess.Popen(
        [sys.executable, "-m", "kto_lightning.train", *args, f"hydra.run.dir={stopped}"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while not (stopped / "checkpoints" / "last.ckpt").exists():
        assert process.poll() is None, "the run ended before it could be stopped"
        assert time.monotonic() < deadline, "no checkpoint at step 2"
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    checkpoint = stopped / "checkpoints" / "last.ckpt"
    step = torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
    assert 2 <= step < 40
    resumed = train_in_process(
        *args, f"resume={checkpoint}", f"hydra.run.dir={stopped}", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = load_file(tmp_path / "whole" / "hf_model" / "model.safetensors")
    got = load_file(stopped / "hf_model" / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)
