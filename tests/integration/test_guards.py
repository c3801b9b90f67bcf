"""Safety guards: non-finite loss/gradient stop, zero-KL warning, unknown keys, secrets, seeds."""

from __future__ import annotations

import copy
import csv
import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from cli import train_in_process
from conftest import FAST
from kto_lightning.cli.guards import (
    NonFiniteGuard,
    explain_missing_value,
    explain_unknown_key,
)
from kto_lightning.cli.run_build import build
from kto_lightning.cli.run_fit import train
from kto_lightning.cli.schemas import check
from kto_lightning.common.security import redact_secrets, scrub_files, secret_values
from kto_lightning.errors import KTOError

POISONED_STEP = 4  # 1-based optimizer step whose batch is poisoned


def _poison_step(run, how: str) -> None:
    """Make the training loss of step POISONED_STEP non-finite.

    "loss": add a NaN constant (the loss is NaN, its gradients stay finite).
    "gradient": multiply by NaN (the gradients are NaN too).
    """
    module = run.module
    original = module._step

    def _step(batch, split):
        result = original(batch, split)
        if split == "train" and module.trainer.global_step + 1 == POISONED_STEP:
            nan = torch.tensor(float("nan"))
            loss = result.loss + nan if how == "loss" else result.loss * nan
            result = dataclasses.replace(result, loss=loss)
        return result

    module._step = _step


def _guarded(run) -> None:
    if not any(isinstance(c, NonFiniteGuard) for c in run.trainer.callbacks):
        run.trainer.callbacks.append(NonFiniteGuard())


class _Snapshot(L.Callback):
    """Policy weights at the start of every training batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.weights = {k: v.detach().clone() for k, v in pl_module.policy.state_dict().items()}


def test_guard_is_in_the_default_callbacks(make_config) -> None:
    run = build(make_config())
    assert NonFiniteGuard in {type(c) for c in run.trainer.callbacks}


def test_non_finite_loss_stops_with_step_and_last_checkpoint(make_config, tmp_path) -> None:
    # last.ckpt every 2 steps: a checkpoint exists when step 4 goes wrong.
    run = build(make_config("callbacks.last_checkpoint.every_n_train_steps=2"))
    _guarded(run)
    _poison_step(run, "loss")

    with pytest.raises(KTOError) as caught:
        run.trainer.fit(run.module, datamodule=run.datamodule)

    message = str(caught.value)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file()
    assert f"non-finite loss (nan) at step {POISONED_STEP}; training stopped." in message
    assert f"Last good checkpoint: {last} (resume with resume={last})" in message


def test_non_finite_gradient_stops_before_the_optimizer_step(make_config) -> None:
    run = build(make_config())
    _guarded(run)
    _poison_step(run, "gradient")
    snapshot = _Snapshot()
    run.trainer.callbacks.append(snapshot)

    with pytest.raises(KTOError) as caught:
        run.trainer.fit(run.module, datamodule=run.datamodule)

    message = str(caught.value)
    assert "non-finite gradient (nan) in policy." in message
    assert f"at step {POISONED_STEP}; training stopped." in message
    # No validation has run yet (one epoch of 6 batches), so no checkpoint either.
    assert "Last good checkpoint: no checkpoint written yet" in message
    # The NaN gradient never reached the weights: they are those from before the bad step.
    assert run.trainer.global_step == POISONED_STEP - 1
    after = run.module.policy.state_dict()
    for key, value in after.items():
        assert torch.isfinite(value).all(), key
        torch.testing.assert_close(value, snapshot.weights[key], rtol=0, atol=0)


def test_guard_passes_a_healthy_run(make_config) -> None:
    run = build(make_config())
    _guarded(run)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 6


# ------------------------------------------------------------------- zero KL
# ------------------------------------------------------------------- unknown keys
def test_unknown_data_key_is_explained(make_config) -> None:
    with pytest.raises(Exception) as caught:
        build(make_config("+data.bad_key=1"))
    message = explain_unknown_key(caught.value)
    assert message is not None
    assert message.startswith(
        "data.bad_key is not a setting of kto_lightning.data.datamodule.KTODataModule; "
        "check the spelling"
    )
    # The data group nests its batch settings under `batching` (issue 10, point 6).
    assert "batching" in message and "(see conf/data/)" in message


def test_misspelt_loss_key_gets_a_suggestion(make_config) -> None:
    with pytest.raises(Exception) as caught:
        build(make_config("+loss.bta=0.1"))
    message = explain_unknown_key(caught.value)
    assert message is not None
    assert message.startswith(
        "loss.bta is not a setting of kto_lightning.core.losses.KTOLossConfig"
    )
    assert "(did you mean loss.beta?)" in message


@pytest.mark.parametrize(
    ("choice", "key"), [("data=local", "data.source.path"), ("model=local", "model.name_or_path")]
)
def test_a_required_key_left_open_is_named_in_one_line(make_config, choice: str, key: str) -> None:
    with pytest.raises(Exception) as caught:
        build(make_config(choice))
    group = key.split(".")[0]
    assert explain_missing_value(caught.value) == (
        f"{key} must be set: the chosen {group} file leaves it open (???); add {key}=... to the "
        f"command line (see conf/{group}/)"
    )
    assert explain_missing_value(ValueError("x")) is None


def test_other_errors_are_not_explained() -> None:
    assert explain_unknown_key(ValueError("bad value")) is None
    # A TypeError outside Hydra's instantiation names no config node.
    assert explain_unknown_key(TypeError("f() got an unexpected keyword argument 'x'")) is None


# (override, what the group builds, the suggestion): the key is the override's left side.
SCHEMA_TYPOS = [
    ("loss.betta=0.1", "kto_lightning.core.losses.KTOLossConfig", "loss.beta"),
    ("model.hiden_size=3", "kto_lightning.models.tiny.TinyLlama", "model.hidden_size"),
    ("reference.kinds=copy", "kto_lightning.models.reference.ReferenceSpec", "reference.kind"),
    (
        "scheduler.warmup_ration=0.2",
        "kto_lightning.training.optim.warmup_schedule",
        "scheduler.warmup_ratio",
    ),
    ("data.sed=3", "kto_lightning.data.datamodule.KTODataModule", "data.seed"),
    ("data.lengths.max_lenght=64", "kto_lightning.data.config.Lengths", "data.lengths.max_length"),
    (
        "data.batching.batch_sise=4",
        "kto_lightning.data.config.Batching",
        "data.batching.batch_size",
    ),
]


def _explained(key: str, target: str, suggestion: str) -> str:
    return f"{key} is not a setting of {target}; check the spelling (did you mean {suggestion}?)"


@pytest.mark.parametrize(("override", "target", "suggestion"), SCHEMA_TYPOS)
def test_a_key_outside_the_schema_is_refused_when_composing(
    make_config, override: str, target: str, suggestion: str
) -> None:
    with pytest.raises(ConfigCompositionException) as caught:
        make_config(override, fast=False)
    key = override.split("=")[0]
    assert explain_unknown_key(caught.value).startswith(_explained(key, target, suggestion))


@pytest.mark.parametrize(("override", "target", "suggestion"), SCHEMA_TYPOS)
def test_a_key_added_with_plus_is_refused_before_anything_is_built(
    make_config, override: str, target: str, suggestion: str
) -> None:
    # Hydra adds a '+' key even to a structured config; `check` refuses it.
    cfg = make_config(f"+{override}", fast=False)
    with pytest.raises(ConfigCompositionException) as caught:
        check(cfg)
    key = override.split("=")[0]
    assert explain_unknown_key(caught.value).startswith(_explained(key, target, suggestion))


def test_a_key_of_a_group_without_schema_is_checked_against_its_target(make_config) -> None:
    with pytest.raises(ConfigCompositionException) as caught:
        check(make_config("+trainer.max_epoch=2", fast=False))
    assert explain_unknown_key(caught.value).startswith(
        _explained(
            "trainer.max_epoch", "lightning.pytorch.trainer.trainer.Trainer", "trainer.max_epochs"
        )
    )


def test_a_key_outside_the_schema_in_a_yaml_file_is_refused(make_config, tmp_path) -> None:
    (tmp_path / "extra" / "loss").mkdir(parents=True)
    (tmp_path / "extra" / "loss" / "typo.yaml").write_text(
        "defaults:\n  - /schema/loss/KTOLossConfig@_here_\n  - _self_\n"
        "_target_: kto_lightning.core.losses.KTOLossConfig\nbetta: 0.2\n"
    )
    with pytest.raises(ConfigCompositionException) as caught:
        make_config(f"hydra.searchpath=[file://{tmp_path / 'extra'}]", "loss=typo", fast=False)
    assert explain_unknown_key(caught.value).startswith(
        _explained("loss.betta", "kto_lightning.core.losses.KTOLossConfig", "loss.beta")
    )


def test_schema_checks_types_and_leaves_auto_weights_to_the_loss(make_config) -> None:
    with pytest.raises(ConfigCompositionException) as caught:
        make_config("model.hidden_size=wide", fast=False)
    assert explain_unknown_key(caught.value) is None  # a bad value, not an unknown key
    with pytest.raises(ConfigCompositionException) as caught:
        make_config("data.lengths.max_length=long", fast=False)
    assert "data.lengths.max_length" in str(caught.value.__cause__)
    cfg = make_config("loss.desirable_weight=1.0", "loss.undesirable_weight=auto", fast=False)
    assert cfg.loss.undesirable_weight == "auto"


@pytest.mark.parametrize(
    "lora",
    [
        ["+model.lora.r=4", "+model.lora.target_modules=all-linear"],
        ["+model.lora={r: 4, target_modules: all-linear}"],
    ],
)
def test_lora_arguments_stay_free_form(make_config, lora: list[str]) -> None:
    cfg = make_config(*lora, fast=False)
    check(cfg)
    assert cfg.model.lora == {"r": 4, "target_modules": "all-linear"}
    policy = instantiate(cfg.model).load_policy()
    assert any("lora_A" in name for name, _ in policy.named_parameters())


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return train_in_process(*args, f"hydra.run.dir={cwd}/run", cwd=cwd)


@pytest.mark.parametrize("override", ["loss.betta=0.1", "+loss.betta=0.1"])
def test_command_line_names_a_misspelt_key_in_one_line(tmp_path, override: str) -> None:
    result = _cli(override, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if "betta" in line]
    assert line.startswith(
        "error: " + _explained("loss.betta", "kto_lightning.core.losses.KTOLossConfig", "loss.beta")
    )


# ------------------------------------------------------------------- secrets
def test_secret_values_and_scrubbing_cover_numbers_and_lists_but_only_whole_values(
    tmp_path,
) -> None:
    config = {"my_password": 1234, "api_keys": ["k-one", "k-two"], "trainer": {"max_steps": 12345}}
    assert secret_values(config) == {"1234", "k-one", "k-two"}
    record = tmp_path / "config.yaml"
    record.write_text("my_password: 1234\napi_keys:\n- k-one\n- k-two\nmax_steps: 12345\n")
    scrub_files(tmp_path, secret_values(config))
    assert record.read_text() == "my_password: ***\napi_keys:\n- ***\n- ***\nmax_steps: 12345\n"


def test_redact_secrets_replaces_secret_values_at_any_depth() -> None:
    config = {
        "hf_token": "hf_abc",
        "model": {"name": "tiny", "HF_TOKEN": "hf_def", "tokenizer_name_or_path": "gpt2"},
        "logger": {"wandb": {"WANDB_API_KEY": "k1", "apiKey": "k2", "project": "kto"}},
        "services": [{"password": "p", "db_passwd": "q", "Client_Secret": "s", "host": "h"}],
        "generations": {"max_new_tokens": 64},
        "unset": {"token": None, "secret": ""},
        "seed": 42,
    }
    original = copy.deepcopy(config)

    redacted = redact_secrets(config)

    assert redacted["hf_token"] == "***"
    assert redacted["model"] == {
        "name": "tiny",
        "HF_TOKEN": "***",
        "tokenizer_name_or_path": "gpt2",
    }
    assert redacted["logger"]["wandb"] == {
        "WANDB_API_KEY": "***",
        "apiKey": "***",
        "project": "kto",
    }
    assert redacted["services"] == [
        {"password": "***", "db_passwd": "***", "Client_Secret": "***", "host": "h"}
    ]
    assert redacted["generations"] == {"max_new_tokens": 64}
    assert redacted["unset"] == {"token": None, "secret": ""}
    assert redacted["seed"] == 42
    assert config == original, "the input must not be mutated"
    assert redacted["model"] is not config["model"]


# ------------------------------------------------------------------- determinism
def _train_metrics(path: Path) -> list[dict[str, float]]:
    with open(path / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in rows]


def _run(make_config, output_dir: Path, seed: int = 42) -> dict[str, torch.Tensor]:
    cfg = make_config(f"paths.output_dir={output_dir}", f"seed={seed}", "objective=null")
    run = build(cfg)
    train(cfg, run=run)
    return {k: v.detach().clone() for k, v in run.module.policy.state_dict().items()}


def test_same_seed_same_run_other_seed_other_run(make_config, tmp_path) -> None:
    weights_a = _run(make_config, tmp_path / "a")
    weights_b = _run(make_config, tmp_path / "b")
    _run(make_config, tmp_path / "c", seed=7)
    a, b, c = (_train_metrics(tmp_path / name) for name in "abc")

    assert any("train/loss" in row for row in a)
    assert [row.keys() for row in a] == [row.keys() for row in b]
    for row_a, row_b in zip(a, b, strict=True):
        for key, value in row_a.items():
            assert math.isclose(value, row_b[key], rel_tol=0, abs_tol=1e-7), key
    for key, value in weights_a.items():
        torch.testing.assert_close(value, weights_b[key], rtol=0, atol=0)

    losses_a = [row["train/loss"] for row in a if "train/loss" in row]
    losses_c = [row["train/loss"] for row in c if "train/loss" in row]
    assert losses_a != losses_c


def test_data_too_small_to_hold_out_validation_names_the_keys_to_fix(make_config, tmp_path) -> None:
    path = tmp_path / "two.jsonl"
    path.write_text(
        '{"prompt": "a", "completion": "b", "label": true}\n'
        '{"prompt": "c", "completion": "d", "label": false}\n'
    )
    with pytest.raises(KTOError, match=r"2 rows are too few.*val_fraction.*val_path.*val_split"):
        build(make_config("data=local", f"data.source.path={path}"))


def test_rows_longer_than_learned_positions_are_refused_naming_max_length(
    make_config, tmp_path
) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from kto_lightning.models.byte_tokenizer import byte_level_tokenizer

    model_dir = tmp_path / "gpt2_64_positions"
    config = GPT2Config(vocab_size=259, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    byte_level_tokenizer().save_pretrained(model_dir)
    local = ("model=local", f"model.name_or_path={model_dir}")
    with pytest.raises(KTOError, match=r"data\.lengths\.max_length=192 is longer .* 64 tokens"):
        build(make_config(*local))
    # Within the window it builds; a rotary model (the tiny Llama) has no such limit.
    build(make_config(*local, "data.lengths.max_length=64", "data.lengths.max_prompt_length=32"))


# ------------------------------------------------------------------- optional packages
OPTIONAL = ("wandb", "tensorboard", "tensorboardX", "optuna", "deepspeed", "bitsandbytes")
# A fresh interpreter where the optional packages cannot be imported (as in an install without
# extras), running the train command in process.
WITHOUT_EXTRAS = """
import importlib.abc, importlib.util, sys
BLOCKED = {blocked!r}
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, NotInstalled())
# Asked without importing (transformers, extras.installed): not there.
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: (
    None if name.split(".")[0] in BLOCKED else find_spec(name, *a)
)
sys.argv = ["kto_lightning.train", *{args!r}]
from kto_lightning.train import cli
try:
    cli()
finally:
    print("imported:", sorted(set(BLOCKED) & set(sys.modules)))
"""


def test_the_default_run_trains_without_any_optional_package(tmp_path) -> None:
    args = [*FAST, "trainer.limit_train_batches=1", "trainer.limit_val_batches=1"]
    args += ["validate_before_training=false"]  # ~13 s of CPU, 8 of them importing torch
    script = WITHOUT_EXTRAS.format(blocked=OPTIONAL, args=[*args, f"hydra.run.dir={tmp_path}"])
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported: []" in result.stdout
    assert "KTO training finished" in result.stdout + result.stderr
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_logger_wandb_without_wandb_stops_in_one_line_before_anything_loads(
    tmp_path, monkeypatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    result = _cli("logger=wandb", *FAST, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        'error: logger=wandb needs the wandb package, not installed: pip install -e ".[wandb]" '
        "in the kto_lightning checkout (or: pip install wandb)"
    )
    assert not (tmp_path / "run").exists()  # stopped before Hydra made the run's folder
