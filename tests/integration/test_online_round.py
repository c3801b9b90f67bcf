"""Online KTO's `round` loop: a round samples its prompts' completions with the policy at the
round's start, then trains one pass over the kept ones; the reference stays the initial policy
or is the round-start policy; a run resumed mid-round trains what the interrupted one would."""

from __future__ import annotations

import functools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import load_file
from test_online_cli import ONLINE, class_balance, sums

from cli import train_in_process
from kto_lightning.core.losses import KTOLossConfig
from kto_lightning.data.config import Source
from kto_lightning.models import make_reference
from kto_lightning.models.reference import CopyReference
from kto_lightning.models.tiny import TinyLlama
from kto_lightning.online.labelling import Labelling
from kto_lightning.online.round_data import RoundDataModule
from kto_lightning.online.sampler import HFSampler
from kto_lightning.training.online_round import ROUND_KEY, RoundKTOModule

MAX_LENGTH = 160
K = 2


def even_length(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    return [float(len(c) % 2 == 0) for c in completions]


def make_module(reference: str = "initial") -> RoundKTOModule:
    model = TinyLlama(weights=None, hidden_size=32, num_layers=1)
    torch.manual_seed(0)
    policy = model.load_policy()
    tokenizer = model.load_tokenizer()
    return RoundKTOModule(
        policy=policy,
        reference=CopyReference(make_reference(policy)),
        round_reference=reference,
        loss_config=KTOLossConfig(desirable_weight="auto"),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        tokenizer=tokenizer,
        sampler=HFSampler.from_tokenizer(tokenizer, k=K, temperature=1.0, max_new_tokens=12),
        greedy_sampler=HFSampler.from_tokenizer(tokenizer, k=1, temperature=0.0, max_new_tokens=12),
        reward=even_length,
        labelling=Labelling(rule="threshold"),
        max_length=MAX_LENGTH,
        seed=7,
    )


def round_data(module: RoundKTOModule, prompts: int | None = None) -> RoundDataModule:
    # 12 training prompts, k = 2, 4 rows a step: 6 steps a round.
    source = Source(path="toy_consistency", val_split="validation", toy_rows=12)
    return RoundDataModule(
        prompts_per_round=prompts, k=K, rows_per_step=4, sample_batch_size=5,
        tokenizer=module.tokenizer, source=source, prompts_per_step=4, seed=3,
    )  # fmt: skip


def trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    kwargs = {"limit_val_batches": 0, "max_epochs": 2, **kwargs}
    return L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, log_every_n_steps=1,
        num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


class StepRecord(Callback):
    """Each step's rows (as the round numbers them) and mean chosen reward."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, list[str]]] = []
        self.rewards: list[list[float]] = []  # each step's mean rewards, of each class it has

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.rows.append((module.current_epoch, [r["completion"] for r in module.last_draw]))
        values = module.step_metrics()  # a step may hold one class only: the other is NaN
        rewards = [values.get(f"train/rewards/{kind}", math.nan) for kind in ("chosen", "rejected")]
        self.rewards.append([r for r in rewards if not math.isnan(r)])


@pytest.mark.parametrize("reference", ["initial", "refresh"])
def test_a_round_trains_once_on_each_kept_row_against_its_reference(
    tmp_path: Path, reference: str
) -> None:
    module = make_module(reference)
    data = round_data(module)
    record = StepRecord()
    trainer(tmp_path, callbacks=[record], enable_checkpointing=False).fit(module, data)
    assert data.steps_per_round() == 6
    assert len(record.rows) == 12  # 2 rounds of 6 steps
    drawn = module._round
    assert drawn is not None and drawn.number == 1
    # The second round's steps took its kept rows in its order, each once.
    trained = [text for epoch, texts in record.rows if epoch == 1 for text in texts]
    assert sorted(trained) == sorted(drawn.texts)
    assert len(drawn.texts) == len(drawn.labels) == len(drawn.main) > 0
    # Every kept row in one step, a prompt's completions in the same one.
    steps = [drawn.step_rows(step, 6, all_ranks=True) for step in range(6)]
    assert sorted(i for rows in steps for i in rows) == list(range(len(drawn.labels)))
    prompts = [{tuple(drawn.prompt_ids[i]) for i in rows} for rows in steps]
    assert sum(len(p) for p in prompts) == len(set().union(*prompts))
    # Eq. 8 over the round's kept rows.
    if drawn.n_desirable and drawn.n_undesirable:
        loss = module.loss
        assert loss.desirable_weight * drawn.n_desirable == pytest.approx(
            loss.undesirable_weight * drawn.n_undesirable
        )
    # The first step: the policy is the reference, so every reward is 0. The second round's
    # first step: a refreshed reference is the policy as it is then, so the rewards are 0
    # again; the initial reference is a trained round behind.
    first_of_round_1, first_of_round_2 = record.rewards[0], record.rewards[6]
    assert first_of_round_1 and first_of_round_2
    assert first_of_round_1 == pytest.approx([0.0] * len(first_of_round_1), abs=1e-6)
    if reference == "refresh":
        assert first_of_round_2 == pytest.approx([0.0] * len(first_of_round_2), abs=1e-6)
    else:
        assert max(abs(r) for r in first_of_round_2) > 1e-4


def test_rounds_draw_seeded_shares_of_the_prompts(tmp_path: Path) -> None:
    data = round_data(make_module(), prompts=5)
    data.setup("fit")
    first = [r.index for r in data.round_prompts(0)]
    assert first == [r.index for r in data.round_prompts(0)]
    assert len(first) == len(set(first)) == 5
    assert first != [r.index for r in data.round_prompts(1)]
    assert data.steps_per_round() == 3  # 5 prompts x 2 / 4 rows


def test_a_run_resumed_mid_round_ends_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    # 6 steps a round, 2 rounds; the checkpoint at step 9 is mid-way through round 2, whose
    # rows and reference log-probs (refreshed: the policy at step 6) only the checkpoint holds.
    whole = make_module("refresh")
    every_3 = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer(tmp_path / "whole", callbacks=[every_3]).fit(whole, round_data(whole))
    resumed = make_module("refresh")
    checkpoint = tmp_path / "ckpt" / "epoch=1-step=9.ckpt"
    trainer(tmp_path / "resumed").fit(resumed, round_data(resumed), ckpt_path=checkpoint)
    assert resumed.last_draw == whole.last_draw
    expected = whole.policy.state_dict()
    for name, tensor in resumed.policy.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0)


def test_sigkill_mid_round_then_resume_through_the_cli_ends_with_the_uninterrupted_weights(
    tmp_path: Path,
) -> None:
    # A user's prompts file (sums), a reward of theirs, the refreshed reference: 12 prompts a
    # round, k = 2, 4 rows a step: 6 steps a round, 2 rounds, a checkpoint every 4 steps. The
    # run is killed once its step-8 checkpoint (round 2, step 2) is written.
    sums(tmp_path)
    args = [
        *ONLINE, "online=round", "online.round.prompts=12", "online.round.reference=refresh",
        "trainer.limit_train_batches=1.0", "trainer.max_epochs=2", "trainer.limit_val_batches=0",
        "validate_before_training=false", "callbacks.last_checkpoint.every_n_train_steps=4",
        "data=local", f"data.source.path={tmp_path}/sums.jsonl", "reward=function",
        "reward.path=test_online_cli:vowel_share",
    ]  # fmt: skip
    whole = train_in_process(*args, f"hydra.run.dir={tmp_path}/whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    balance = class_balance(tmp_path / "whole")  # each round's "auto" weights: the run's too
    assert balance["status"] == "ok" and balance["value"].startswith("1 ("), balance
    killed = tmp_path / "killed"
    here = Path(__file__).parent  # the reward function's module, and the helpers it imports
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
        "PYTHONPATH": os.pathsep.join([str(here), str(here.parent)]),
    }  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "kto_lightning.train", *args, f"hydra.run.dir={killed}"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    latest = killed / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while _step(latest) < 8:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint at step 8"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    resumed_at = _step(latest)
    assert resumed_at % 6 != 0, "the checkpoint must be from the middle of a round"
    checkpoint = torch.load(latest, map_location="cpu", weights_only=True)
    assert checkpoint[ROUND_KEY]["number"] == 1
    resumed = train_in_process(*args, f"resume={latest}", f"hydra.run.dir={killed}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = load_file(tmp_path / "whole" / "hf_model" / "model.safetensors")
    got = load_file(killed / "hf_model" / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)


def _step(checkpoint: Path) -> int:
    """The checkpoint's step; -1 while there is none, or it is being written."""
    try:
        return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"])
    except (FileNotFoundError, RuntimeError, EOFError, KeyError, OSError):
        return -1
