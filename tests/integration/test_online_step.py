"""Online KTO's step loop (training/online.py): each training batch of prompts is sampled from
the policy, scored, labelled and trained on; a resumed run draws again what it drew."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from kto_lightning.core.losses import KTOLossConfig
from kto_lightning.data.config import Source
from kto_lightning.data.toy import consistency_rows
from kto_lightning.errors import ConfigError
from kto_lightning.models import make_reference
from kto_lightning.models.reference import CachedReference, CopyReference
from kto_lightning.models.tiny import TinyLlama
from kto_lightning.online.labelling import Labelling
from kto_lightning.online.prompt_data import PromptDataModule
from kto_lightning.online.sampler import HFSampler
from kto_lightning.training.online import OnlineKTOModule

MAX_LENGTH = 160


@dataclass(frozen=True)
class Row:
    prompt_ids: list[int]
    prompt: str
    index: int
    fields: dict[str, Any] = field(default_factory=dict)


def even_length(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """A reward anyone can compute by hand: 1 for a completion of an even number of characters."""
    return [float(len(c) % 2 == 0) for c in completions]


def prompt_rows(tokenizer, n: int, split: str = "train") -> list[Row]:
    rows = consistency_rows(n, split=split, seed=0)
    encode = functools.partial(tokenizer, add_special_tokens=False)
    return [
        Row([tokenizer.bos_token_id, *encode(r["prompt"])["input_ids"]], r["prompt"], i)
        for i, r in enumerate(rows)
    ]


def make_module(labelling: Labelling | None = None, k: int = 2, **loss: Any) -> OnlineKTOModule:
    model = TinyLlama(weights=None, hidden_size=32, num_layers=1)
    torch.manual_seed(0)
    policy = model.load_policy()
    tokenizer = model.load_tokenizer()
    sampler = HFSampler.from_tokenizer(tokenizer, k=k, temperature=1.0, max_new_tokens=12)
    greedy = HFSampler.from_tokenizer(tokenizer, k=1, temperature=0.0, max_new_tokens=12)
    return OnlineKTOModule(
        policy=policy,
        reference=CopyReference(make_reference(policy)),
        loss_config=KTOLossConfig(**{"desirable_weight": "auto", **loss}),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        tokenizer=tokenizer,
        sampler=sampler,
        greedy_sampler=greedy,
        reward=even_length,
        labelling=labelling or Labelling(),
        max_length=MAX_LENGTH,
        seed=7,
    )


def loader(rows: list[Row], batch_size: int = 2) -> DataLoader:
    return DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=list)


def trainer(tmp_path: Path, max_steps: int, **kwargs: Any) -> L.Trainer:
    kwargs = {"limit_val_batches": 1, **kwargs}
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=True,
        log_every_n_steps=1, num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("rule", ["threshold", "group"])
def test_a_draw_labels_its_completions_and_trains_the_kept_ones(rule: str) -> None:
    module = make_module(Labelling(rule=rule, threshold=0.5), k=4)
    rows = prompt_rows(module.tokenizer, 3)
    drawn = module.draw(rows, module.sampler, "train/0", pairs_seed=1)
    rewards = [float(len(t) % 2 == 0) for t in drawn.texts]
    assert drawn.rewards.tolist() == rewards
    if rule == "threshold":
        desirable, keep = [r >= 0.5 for r in rewards], [True] * len(rewards)
    else:  # above the mean of its prompt's 4: desirable; at it (all equal): dropped
        means = [sum(rewards[i - i % 4 : i - i % 4 + 4]) / 4 for i in range(len(rewards))]
        desirable = [r > m for r, m in zip(rewards, means, strict=True)]
        keep = [r != m for r, m in zip(rewards, means, strict=True)]
    assert drawn.labels.desirable[drawn.labels.keep].tolist() == [
        d for d, k in zip(desirable, keep, strict=True) if k
    ]
    assert drawn.labels.keep.tolist() == keep
    if drawn.batch is None:
        assert not any(keep)
        return
    kept = [i for i, k in enumerate(keep) if k]
    assert drawn.batch["labels"].tolist() == [desirable[i] for i in kept]
    for row, i in enumerate(kept):  # each kept row is its prompt and its sampled completion
        prompt = rows[i // 4].prompt_ids
        ids = drawn.batch["input_ids"][row][drawn.batch["attention_mask"][row].bool()].tolist()
        assert ids == prompt + drawn.samples.completion_ids[i]
    assert "kl_input_ids" in drawn.batch


def test_the_same_seed_draws_the_same_completions_and_another_seed_others() -> None:
    module = make_module()
    rows = prompt_rows(module.tokenizer, 4)
    first, again = (module.draw(rows, module.sampler, "train/3").texts for _ in range(2))
    assert first == again
    assert module.draw(rows, module.sampler, "train/4").texts != first


def test_training_moves_the_policy_on_its_own_samples_and_logs_the_draws(tmp_path: Path) -> None:
    module = make_module()
    start = copy.deepcopy(module.policy.state_dict())
    reference = copy.deepcopy(module.reference.state_dict())
    rows = prompt_rows(module.tokenizer, 8)
    fit = trainer(tmp_path, max_steps=3, val_check_interval=1)
    fit.fit(module, loader(rows), loader(prompt_rows(module.tokenizer, 4, "validation")))
    moved = [n for n, t in module.policy.state_dict().items() if not torch.equal(t, start[n])]
    assert moved
    assert all(torch.equal(t, reference[n]) for n, t in module.reference.state_dict().items())
    metrics = module.step_metrics()
    for name in ("reward_mean", "desirable_share", "kept_share", "completion_tokens",
                 "sample_seconds", "sample_share"):  # fmt: skip
        assert f"train/online/{name}" in metrics, sorted(metrics)
    assert 0 < metrics["train/online/sample_share"] <= 1
    assert len(module.last_draw) == 2 * 2  # 2 prompts a batch, k = 2
    # "auto": lambda_D * n_D = lambda_U * n_U over the last draw's kept rows (eq. 8).
    n_d = sum(r["label"] for r in module.last_draw if r["kept"])
    n_u = sum(not r["label"] for r in module.last_draw if r["kept"])
    if n_d and n_u:
        assert module.loss.desirable_weight * n_d == pytest.approx(
            module.loss.undesirable_weight * n_u
        )
    logged = fit.callback_metrics
    assert {"val/online/reward_greedy", "val/online/reward_sampled"} <= set(logged)


def prompt_data(module: OnlineKTOModule) -> PromptDataModule:
    source = Source(path="toy_consistency", val_split="validation", toy_rows=8)
    return PromptDataModule(module.tokenizer, source, prompts_per_step=2, seed=3)


def test_a_run_resumed_mid_epoch_draws_again_and_ends_with_the_uninterrupted_weights(
    tmp_path: Path,
) -> None:
    # 8 prompts, 2 a step: 4 steps an epoch. The run checkpoints at step 3, mid-epoch, as a
    # run's last checkpoint does; a run resumed from it trains steps 4 to 6 again.
    whole = make_module()
    every_3 = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer(tmp_path / "whole", max_steps=6, limit_val_batches=0, callbacks=[every_3]).fit(
        whole, prompt_data(whole)
    )
    resumed = make_module()
    trainer(tmp_path / "resumed", max_steps=6, limit_val_batches=0).fit(
        resumed, prompt_data(resumed), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    )
    assert resumed.last_draw == whole.last_draw
    expected = whole.policy.state_dict()
    for name, tensor in resumed.policy.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0)


def test_a_cached_reference_is_refused() -> None:
    module = make_module()
    table = CachedReference.__new__(CachedReference)  # its type is what is refused
    with pytest.raises(ConfigError, match="reference=cache"):
        OnlineKTOModule(
            module.policy, table, KTOLossConfig(), functools.partial(torch.optim.SGD, lr=0.1),
            module.tokenizer, module.sampler, even_length, Labelling(), MAX_LENGTH, seed=0,
        )  # fmt: skip
