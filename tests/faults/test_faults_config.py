"""Issue faults in the config: secrets in every printed and written form, keys no schema knows,
values Lightning would refuse late, a misspelt objective, an unwritable output folder, a sweep
in which every trial fails. Each is refused in one line naming the key, before any data or
model is loaded, or (secrets) appears nowhere."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException

from cli import train_in_process
from kto_lightning.cli import config_values
from kto_lightning.cli.config_files import config_dir
from kto_lightning.cli.guards import explain_unknown_key
from kto_lightning.cli.run_build import build
from kto_lightning.cli.run_fit import train
from kto_lightning.cli.schemas import check
from kto_lightning.common.security import is_secret_key, redact_text
from kto_lightning.errors import ConfigError, StorageError, user_error

# One value under each kind of secret-looking name the issue lists: *_key, *key, *token*,
# *secret*, *pass*, *credential*, *auth*.
SECRETS = {
    "openai_key": "sk-DoNotWriteMe0123",
    "access_key": "AKIAXXDONOTWRITE",
    "apikey": "apikey-value-4455",
    "hub_token": "hf_DoNotWriteMe0123456789",
    "client_secret": "shh-secret-7788",
    "my_password": "12345678",
    "db_passphrase": "correct-horse-battery",
    "aws_credentials": "cred-value-9911",
    "auth_header": "Bearer-abcdef998877",
}
OVERRIDES = [f"+{key}={value}" for key, value in SECRETS.items()]


def test_secret_names_cover_every_pattern_but_not_counts_or_the_tokenizer() -> None:
    assert all(is_secret_key(key) for key in SECRETS)
    for harmless in ("max_new_tokens", "tokenizer_name_or_path", "pad_token", "exclude_keys",
                     "author", "seed", "max_tokens_per_pack"):  # fmt: skip
        assert not is_secret_key(harmless), harmless


def test_cfg_job_prints_no_secret_value(tmp_path: Path) -> None:
    result = train_in_process("--cfg", "job", *OVERRIDES, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "my_password: '***'" in result.stdout or "my_password: ***" in result.stdout
    for value in SECRETS.values():
        assert value not in result.stdout + result.stderr, value


def test_redact_text_hides_yaml_values_lists_overrides_and_their_copies() -> None:
    text = (
        "openai_key: sk-1\napi_keys:\n- k-one\n- k-two\nmodel:\n  token: null\n"
        "copied: sk-1\nmax_steps: 12345\n  task:\n  - +my_password=999\n"
    )
    assert redact_text(text) == (
        "openai_key: ***\napi_keys:\n- ***\n- ***\nmodel:\n  token: null\n"
        "copied: ***\nmax_steps: 12345\n  task:\n  - +my_password=***\n"
    )


def test_no_file_of_a_run_holds_a_secret_value(tmp_path: Path) -> None:
    """train.log, .hydra/, hparams.yaml, metrics, both checkpoints, the export's model card."""
    result = train_in_process(
        "debug=fast", "data.source.toy_rows=160", *OVERRIDES, f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.yaml", "train.log", "hparams.yaml", "README.md"} <= names
    assert sum(p.suffix == ".ckpt" for p in files) >= 2
    for value in SECRETS.values():
        leaked = [str(p) for p in files if value.encode() in p.read_bytes()]
        assert not leaked, f"{value} was written to {leaked}"
        assert value not in result.stdout + result.stderr


def test_an_added_top_level_key_is_refused_with_the_nearest_name(make_config) -> None:
    with pytest.raises(ConfigCompositionException) as caught:
        check(make_config("+seeed=1"), root=config_dir() / "train.yaml")
    message = explain_unknown_key(caught.value)
    assert message is not None and message.startswith("seeed is not a setting")
    assert "did you mean seed?" in message


def test_an_added_key_that_is_read_by_an_interpolation_or_a_credential_is_kept(
    make_config,
) -> None:
    cfg = make_config("+lr_base=0.001", "optimizer.lr=${lr_base}", "+hf_token=abc")
    check(cfg, root=config_dir() / "train.yaml")
    assert cfg.optimizer.lr == 0.001


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.precision=bf17", "trainer.precision='bf17' is not a precision; use one of"),
        ("logprob_chunk_size=0", "logprob_chunk_size must be auto or an integer >= 1"),
        ("optimizer.lr=nan", "optimizer.lr must be a finite number, got nan"),
        ("optimizer.lr=inf", "optimizer.lr must be a finite number, got inf"),
        ("optimizer.lr=0", "optimizer.lr must be above 0, got 0"),
        ("objective=val/reward/auroc", "did you mean val/rewards/auroc?"),
    ],
)
def test_a_bad_value_is_refused_before_data_or_model_load(
    make_config, monkeypatch: pytest.MonkeyPatch, override: str, message: str
) -> None:
    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the data was prepared before the config was checked")

    monkeypatch.setattr("kto_lightning.data.KTODataModule.setup", no_loading)
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace("(", r"\(")):
        build(make_config(override))


def test_a_gpu_trainer_on_a_machine_without_one_is_one_line(
    make_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"trainer.accelerator=gpu \(trainer=gpu\), but torch"):
        config_values.check_values(make_config("trainer=gpu"))


def test_an_objective_a_callback_may_log_is_only_warned_about(caplog) -> None:
    config_values.check_objective("lr-AdamW", sft_stage=False)
    assert "objective=lr-AdamW is not one of the metrics" in caplog.text
    config_values.check_objective("val/perplexity", sft_stage=True)
    with pytest.raises(ConfigError, match="not a metric loss=sft logs"):
        config_values.check_objective("val/rewards/auroc", sft_stage=True)
    # The run health counts are KTO training metrics: no warning, and not for loss=sft.
    caplog.clear()
    config_values.check_objective("train/health/run/kl_clamped_longest", sft_stage=False)
    config_values.check_objective("train/health/saturated/desirable", sft_stage=False)
    assert not caplog.text
    with pytest.raises(ConfigError, match="not a metric loss=sft logs"):
        config_values.check_objective("train/health/kl_clamped", sft_stage=True)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_a_full_or_forbidden_file_system_is_a_user_error(code: int) -> None:
    error = RuntimeError("while saving")
    error.__cause__ = OSError(code, os.strerror(code), "/runs/x/checkpoints/last.ckpt")
    problem = user_error(error)
    assert isinstance(problem, StorageError)
    assert str(problem).startswith("cannot write or read /runs/x/checkpoints/last.ckpt: ")
    assert errno.errorcode[code] in str(problem) and "hydra.run.dir=" in str(problem)


def _unwritable() -> Path | None:
    """A folder this user (root included) cannot create: sysfs is read-only in containers."""
    try:
        os.mkdir("/sys/kto_lightning_probe")
    except OSError as error:
        return Path("/sys/kto_lightning_run") if error.errno in (errno.EPERM, errno.EROFS) else None
    os.rmdir("/sys/kto_lightning_probe")
    return None


@pytest.mark.skipif(_unwritable() is None, reason="no folder here that cannot be created")
def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    result = train_in_process(f"hydra.run.dir={_unwritable()}", cwd=tmp_path)
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: cannot write or read /sys/kto_lightning_run: ")
    )
    assert "Traceback" not in result.stderr


def test_a_sweep_whose_every_trial_fails_ends_in_one_line(tmp_path: Path) -> None:
    result = train_in_process(
        "hparams_search=optuna", "hydra.sweeper.n_trials=2", "data=local",
        f"data.source.path={tmp_path}/missing.jsonl", f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "error: no trial of the sweep returned an objective (2 failed): each trial's status and "
        f"error are in {tmp_path}/sweep/sweep_results.csv"
    )
    assert "Traceback" not in result.stderr


def test_a_bad_data_file_is_the_first_thing_said_not_a_line_after_the_config(
    make_config, tmp_path: Path, caplog
) -> None:
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"prompt": "p", "completion": "c", "label": true}\n{"prompt": "p"}\n')
    with caplog.at_level("INFO", logger="kto_lightning"), pytest.raises(Exception) as caught:
        train(make_config("data=local", f"data.source.path={bad}"))
    assert str(bad) in str(caught.value)
    assert "config:" not in caplog.text, "the config was printed before the data's error"
