"""SFT, then KTO: `loss=sft` learns the desirable completions with no reference model, and a KTO
run starts from what it exported (`model=from_run`, `model=local`)."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from conftest import FAST
from kto_lightning.cli.config_files import config_dir
from kto_lightning.cli.lifecycle import RunSummary
from kto_lightning.cli.run_build import Run, build
from kto_lightning.cli.run_fit import train
from kto_lightning.errors import ConfigError, user_error
from kto_lightning.models.byte_tokenizer import byte_level_tokenizer
from kto_lightning.training.sft import SFTModule

# 3 epochs of 6 batches: 18 steps, at a learning rate that moves a random tiny model fast;
# validation on 2 batches of 8 rows.
SFT = [
    "loss=sft",
    "trainer.max_epochs=3",
    "optimizer.lr=1e-3",
    "data.batching.eval_batch_size=8",
    "callbacks.generations.num_prompts=1",
]


def _compose(output_dir: Path, *overrides: str) -> DictConfig:
    """conftest's make_config, for a fixture that outlives one test."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides=[*FAST, f"paths.output_dir={output_dir}", *overrides])


def _column(run_dir: Path, name: str) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [float(row[name]) for row in csv.DictReader(handle) if row.get(name)]


@dataclass
class SFTRun:
    run_dir: Path
    run: Run
    objective: float | None
    policy: dict[str, torch.Tensor]  # the trained weights, as exported
    log: str


class _Lines(logging.Handler):
    """The messages logged through it (caplog is per test; the fixture below is per module)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def sft(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SFTRun]:
    """One SFT run on the toy task, shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("sft_run")
    handler = _Lines()
    logger = logging.getLogger("kto_lightning")
    level = logger.level
    with pytest.MonkeyPatch.context() as patch:  # what conftest's autouse fixtures do per test
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HOME", str(run_dir.parent / "hf_home"))
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(run_dir.parent / "datasets"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            cfg = _compose(run_dir, *SFT)
            run = build(cfg)
            objective = train(cfg, run=run)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
    policy = {k: v.detach().clone() for k, v in run.module.policy.state_dict().items()}
    yield SFTRun(run_dir, run, objective, policy, "\n".join(handler.lines))


def test_sft_learns_the_desirable_completions_without_a_reference(sft: SFTRun) -> None:
    module, datamodule = sft.run.module, sft.run.datamodule
    # No reference model, no KL rows, no undesirable rows.
    assert isinstance(module, SFTModule)
    assert [name for name, _ in module.named_children()] == ["policy"]
    batch = next(iter(datamodule.train_dataloader()))
    assert not [key for key in batch if key.startswith("kl_")] and bool(batch["labels"].all())
    train_rows = datamodule.summaries["train"]
    assert train_rows.undesirable == 0 and train_rows.dropped["undesirable (loss=sft)"] > 0
    assert "dropped: undesirable (loss=sft)" in sft.log
    assert "no reference model: loss=sft needs none (reference=auto is not used)" in sft.log

    # The mean token NLL falls, and is what the objective and the best checkpoint follow.
    losses = _column(sft.run_dir, "train/loss")
    assert len(losses) == 18 and losses[-1] < losses[0] - 0.5, losses
    val_loss = _column(sft.run_dir, "val/loss")
    val_perplexity = _column(sft.run_dir, "val/perplexity")
    assert val_loss[-1] < val_loss[0]
    assert val_perplexity[-1] == pytest.approx(math.exp(val_loss[-1]), rel=1e-4)
    assert sft.objective == pytest.approx(val_loss[-1], rel=1e-6)
    assert json.loads((sft.run_dir / "objective.json").read_text())["objective"] == "val/loss"
    best = sft.run.trainer.checkpoint_callback
    assert (best.monitor, best.mode) == ("val/loss", "min")
    header = (sft.run_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "rewards" not in header and "train/kl" not in header

    # The summary, the curves, the checkpoints (the policy alone) and the export.
    assert "SFT training finished" in sft.log and "validation perplexity" in sft.log
    assert (sft.run_dir / "training_curves.png").is_file()
    checkpoints = sorted(p.name for p in (sft.run_dir / "checkpoints").iterdir())
    assert checkpoints == ["best-step18.ckpt", "last.ckpt"]
    state = torch.load(sft.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert set(state) == {f"policy.{k}" for k in sft.policy}
    assert (sft.run_dir / "hf_model" / "model.safetensors").is_file()

    # A resume of the finished run trains nothing and returns the objective it recorded.
    last = sft.run_dir / "checkpoints" / "last.ckpt"
    assert train(_compose(sft.run_dir, *SFT, f"resume={last}")) == sft.objective


# A KTO run from the SFT run: one step, validation on 2 batches of 8 rows, no export.
KTO = [
    "trainer.max_steps=1",
    "optimizer.lr=3e-4",
    "data.batching.eval_batch_size=8",
    "callbacks.generations.num_prompts=0",
    "export.enabled=false",
]
ZERO_AT_START = ("val/rewards/chosen", "val/rewards/rejected", "val/rewards/margins", "val/kl")


def _starts_from_the_sft_policy(run: Run, sft: SFTRun) -> None:
    """The run's policy is the SFT run's, weight for weight, with its byte-level tokenizer."""
    policy = run.module.policy.state_dict()
    assert policy.keys() == sft.policy.keys()
    assert all(torch.equal(policy[k], sft.policy[k]) for k in policy)
    tokenizer, original = run.datamodule.tokenizer, byte_level_tokenizer()
    text = "Can you tell me about owls? Sure! \u00e9"
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        original.bos_token_id, original.eos_token_id, original.pad_token_id,
    )  # fmt: skip


def test_kto_from_the_sft_run_dir_starts_at_zero_reward_and_kl(sft: SFTRun, make_config) -> None:
    cfg = make_config("model=from_run", f"model.run_dir={sft.run_dir}", *KTO)
    run = build(cfg)
    _starts_from_the_sft_policy(run, sft)
    train(cfg, run=run)
    # The validation before training: the reference is that same policy, so every implied
    # reward, their margin and the KL reference point are 0.
    [summary] = [c for c in run.trainer.callbacks if isinstance(c, RunSummary)]
    assert {key: summary.before[key] for key in ZERO_AT_START} == dict.fromkeys(ZERO_AT_START, 0.0)
    assert run.trainer.global_step == 1


def test_kto_from_the_sft_export_folder_starts_at_zero_reward_and_kl(
    sft: SFTRun, make_config
) -> None:
    cfg = make_config("model=local", f"model.name_or_path={sft.run_dir / 'hf_model'}", *KTO)
    run = build(cfg)
    _starts_from_the_sft_policy(run, sft)
    run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)
    metrics = {key: float(run.trainer.callback_metrics[key]) for key in ZERO_AT_START}
    assert metrics == dict.fromkeys(ZERO_AT_START, 0.0)


def test_from_run_without_an_export_stops_with_one_line(make_config, tmp_path) -> None:
    empty_run = tmp_path / "not_a_run"
    empty_run.mkdir()
    with pytest.raises(Exception) as caught:
        build(make_config("model=from_run", f"model.run_dir={empty_run}"))
    problem = user_error(caught.value)  # what the entry point prints, alone
    assert isinstance(problem, ConfigError)
    message = str(problem)
    assert message.startswith(f"model.run_dir={str(empty_run)!r} holds no exported model (")
    assert "hf_model/config.json" in message and "\n" not in message
