"""The plain progress lines, the choice between them and the bar, the summary and the config."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from omegaconf import OmegaConf

from kto_lightning.errors import ConfigError
from kto_lightning.reporting.progress import (
    PlainModelSummary,
    PlainProgress,
    console_callbacks,
    log_config,
)


class _Stdout:
    def __init__(self, terminal: bool) -> None:
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


@pytest.mark.parametrize("terminal", [True, False])
def test_a_terminal_keeps_the_bar_and_anything_else_gets_plain_lines(monkeypatch, terminal) -> None:
    monkeypatch.setattr(sys, "stdout", _Stdout(terminal))
    trainer = {"enable_progress_bar": True, "enable_model_summary": True}
    added, switches = console_callbacks(trainer, [], every_n_steps=10)
    plain = [c for c in added if isinstance(c, PlainProgress)]
    assert switches["enable_progress_bar"] is terminal
    assert len(plain) == (0 if terminal else 1)
    # The summary is always ours; Lightning's stays off so that it does not say it skips.
    assert any(isinstance(c, PlainModelSummary) for c in added)
    assert switches["enable_model_summary"] is False


def test_bar_turned_off_on_a_terminal_prints_plain_lines(monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdout", _Stdout(True))
    trainer = {"enable_progress_bar": False, "enable_model_summary": False}
    added, switches = console_callbacks(trainer, [], every_n_steps=5)
    assert [type(c) for c in added] == [PlainProgress]
    assert added[0].every_n_steps == 5
    assert switches == {"enable_progress_bar": False, "enable_model_summary": False}


def test_a_progress_bar_of_the_callbacks_group_is_left_alone(monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdout", _Stdout(False))
    trainer = {"enable_progress_bar": True, "enable_model_summary": False}
    added, switches = console_callbacks(trainer, [TQDMProgressBar()], every_n_steps=5)
    assert added == [] and switches["enable_progress_bar"] is True


@pytest.mark.parametrize("value", [-1, True, 2.5, "10"])
def test_every_n_steps_must_be_a_count(value) -> None:
    with pytest.raises(ConfigError, match=r"progress.every_n_steps must be an integer >= 0"):
        PlainProgress(value)


def _trainer(step: int, *, rank_zero: bool = True) -> SimpleNamespace:
    metrics = {
        "train/loss": torch.tensor(0.40125),
        "train/kl": torch.tensor(1.5),
        "train/rewards/margins": torch.tensor(-0.25),
    }
    return SimpleNamespace(
        global_step=step, estimated_stepping_batches=40, world_size=2, is_global_zero=rank_zero,
        max_epochs=2, current_epoch=0, callback_metrics=metrics,
    )  # fmt: skip


def _train(progress: PlainProgress, trainer: SimpleNamespace, steps: int, clock) -> None:
    """`steps` optimizer steps of 8 rows a rank, each taking 1 s of `clock`."""
    batch = {"labels": torch.ones(8)}
    for _ in range(steps):
        progress.on_train_batch_start(trainer)
        trainer.global_step += 1
        clock.now += 1.0
        progress.on_train_batch_end(trainer, None, None, batch, 0)


def test_a_line_every_n_steps_with_throughput_and_eta(monkeypatch, caplog) -> None:
    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr("kto_lightning.reporting.progress.time.perf_counter", lambda: clock.now)
    progress, trainer = PlainProgress(10), _trainer(0)
    progress.on_train_start(trainer, None)
    with caplog.at_level(logging.INFO, logger="kto_lightning"):
        _train(progress, trainer, 40, clock)
    lines = [r.getMessage() for r in caplog.records]
    # 16 rows a step over 2 ranks, 1 s a step: 16 examples/s; 30 steps left at step 10.
    assert lines[0] == (
        "step 10/40 | epoch 1/2 | loss 0.4013 | kl 1.5000 | margin -0.250 | 16.0 examples/s | "
        "ETA 0:00:30"
    )
    assert [line.split(" |")[0] for line in lines] == [f"step {n}/40" for n in (10, 20, 30, 40)]
    assert lines[-1].endswith("ETA 0:00:00")


def test_the_last_step_has_its_line_and_other_ranks_print_nothing(monkeypatch, caplog) -> None:
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr("kto_lightning.reporting.progress.time.perf_counter", lambda: clock.now)
    with caplog.at_level(logging.INFO, logger="kto_lightning"):
        progress, trainer = PlainProgress(0), _trainer(0)
        progress.on_train_start(trainer, None)
        _train(progress, trainer, 40, clock)
        assert [r.getMessage().split(" |")[0] for r in caplog.records] == ["step 40/40"]
        caplog.clear()
        progress, trainer = PlainProgress(1), _trainer(0, rank_zero=False)
        progress.on_train_start(trainer, None)
        _train(progress, trainer, 5, clock)
    assert caplog.records == []


def test_model_summary_drops_the_flops_column(caplog) -> None:
    data = [
        (" ", ["0", "1"]),
        ("Name", ["policy", "reference"]),
        ("Type", ["LlamaForCausalLM", "CopyReference"]),
        ("Params", ["164 K", "164 K"]),
        ("Mode", ["train", "eval"]),
        ("FLOPs", ["0", "0"]),
    ]
    with caplog.at_level(logging.INFO, logger="kto_lightning"):
        PlainModelSummary.summarize(data, 329_000, 164_500, 1.316, {"train": 33, "eval": 34}, 0)
    assert caplog.records[0].getMessage() == (
        "model summary:\n"
        "     Name       Type              Params  Mode\n"
        "  0  policy     LlamaForCausalLM  164 K   train\n"
        "  1  reference  CopyReference     164 K   eval\n"
        "  164 K trainable, 164 K frozen parameters (1.316 MB in all)"
    )


def test_config_is_logged_resolved_with_secrets_hidden(caplog) -> None:
    cfg = OmegaConf.create(
        {"seed": 3, "copy": "${seed}", "hub": {"hf_token": "hf_abc", "tokenizer": "t"}}
    )
    with caplog.at_level(logging.INFO, logger="kto_lightning"):
        log_config(cfg)
    [record] = caplog.records
    assert record.getMessage() == (
        "config:\n  seed: 3\n  copy: 3\n  hub:\n    hf_token: '***'\n    tokenizer: t"
    )
