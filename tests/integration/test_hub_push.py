"""Pushing to the Hugging Face hub, at the end of a run and from the export command: which files
go to which repo, private, on which branch; the token from the environment only, in no file and
no output; a push that cannot happen stops before the work, one that fails loses nothing.

The hub client's network calls (HfApi.create_repo, create_branch, upload_folder) are replaced
in these tests only; everything before them is the client's and ours.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import huggingface_hub
import pytest
from huggingface_hub import HfApi

from cli import command_in_process
from conftest import FAST
from kto_lightning.cli.hub_push import DEFAULT_MESSAGE, check_push, check_run_push
from kto_lightning.errors import ConfigError

TOKEN = "hf_" + "kTOlightningTestToken" * 2
ONLINE = ("HF_HUB_OFFLINE",)  # unset: the hub is allowed (its network calls are fakes)
QUICK = [*FAST, "trainer.limit_train_batches=1", "trainer.limit_val_batches=1"]
QUICK += ["validate_before_training=false", "~callbacks.generations"]
EXPECTED_FILES = {"README.md", "config.json", "model.safetensors", "generation_config.json"}


def _fake_hub(monkeypatch: pytest.MonkeyPatch, fail: Exception | None = None) -> list[dict]:
    """Replace the hub client's network calls; returns the list each call is recorded in (with
    the token the client was given and the files of the uploaded folder at that moment)."""
    calls: list[dict[str, Any]] = []

    def create_repo(self, repo_id, *, private=None, repo_type=None, exist_ok=False, **_):
        calls.append(dict(call="create_repo", repo_id=repo_id, private=private,
                          repo_type=repo_type, exist_ok=exist_ok, token=self.token))  # fmt: skip
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, *, branch, repo_type=None, exist_ok=False, **_):
        calls.append(dict(call="create_branch", repo_id=repo_id, branch=branch, token=self.token))

    def upload_folder(self, *, repo_id, folder_path, revision=None, commit_message=None, **_):
        if fail is not None:
            raise fail
        folder = Path(folder_path)
        files = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
        calls.append(dict(call="upload_folder", repo_id=repo_id, folder=folder, files=files,
                          revision=revision, message=commit_message, token=self.token))  # fmt: skip
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123abc")

    for name, fake in [("create_repo", create_repo), ("create_branch", create_branch)]:
        monkeypatch.setattr(HfApi, name, fake)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def _train(tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`kto-lightning train` in this process, into tmp_path/run, the hub allowed."""
    env = {"HF_TOKEN": TOKEN} if env is None else env
    run = tmp_path / "run"
    return command_in_process(
        "train", *QUICK, f"hydra.run.dir={run}", *args, cwd=tmp_path, env=env, unset=ONLINE
    )


def _export(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return command_in_process("export", *args, cwd=tmp_path, env={"HF_TOKEN": TOKEN}, unset=ONLINE)


def _files_holding(folder: Path, text: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def test_a_run_and_the_export_command_push_the_folder_to_the_repo_asked(
    monkeypatch, tmp_path
) -> None:
    calls = _fake_hub(monkeypatch)
    result = _train(
        tmp_path, "export.push_to_hub=me/kto-tiny", "export.private=true",
        "export.revision=experiments", "export.commit_message=first run",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    create_repo, create_branch, upload = calls
    assert create_repo == dict(call="create_repo", repo_id="me/kto-tiny", private=True,
                               repo_type="model", exist_ok=True, token=TOKEN)  # fmt: skip
    assert create_branch == dict(call="create_branch", repo_id="me/kto-tiny",
                                 branch="experiments", token=TOKEN)  # fmt: skip
    assert upload["repo_id"] == "me/kto-tiny" and upload["folder"] == run / "hf_model"
    assert upload["revision"] == "experiments" and upload["message"] == "first run"
    # The whole folder, card included, as the run wrote it.
    assert upload["files"] >= EXPECTED_FILES
    assert upload["files"] == {p.name for p in (run / "hf_model").iterdir()}
    assert (
        "pushed to https://huggingface.co/me/kto-tiny/commit/0123abc"
        in (run / "train.log").read_text()
    )

    # The export command: its own folder, main, public, the default message.
    calls.clear()
    out = tmp_path / "cli"
    exported = _export(tmp_path, f"ckpt_path={run}", f"out={out}", "push_to_hub=me/kto-other")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert [c["call"] for c in calls] == ["create_repo", "upload_folder"]  # no branch for main
    assert calls[0]["private"] is False and calls[0]["token"] == TOKEN
    assert calls[1]["folder"] == out and calls[1]["files"] >= EXPECTED_FILES
    assert calls[1]["revision"] is None and calls[1]["message"] == DEFAULT_MESSAGE
    assert "pushed" in exported.stdout and "me/kto-other" in exported.stdout

    # The token came from the environment, and went nowhere else.
    assert not _files_holding(tmp_path, TOKEN)
    for output in (result, exported):
        assert TOKEN not in output.stdout + output.stderr


def test_a_failed_upload_keeps_the_run_and_says_how_to_push_it_later(monkeypatch, tmp_path) -> None:
    _fake_hub(monkeypatch, fail=ConnectionError(f"connection reset (token {TOKEN})"))
    result = _train(tmp_path, "export.push_to_hub=me/kto-tiny", "export.private=true")
    # The run finishes: its checkpoint, export, card and objective are all there.
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    assert (run / "hf_model" / "model.safetensors").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "objective.json").is_file()
    log = (run / "train.log").read_text()
    assert "pushing" in log and "'me/kto-tiny' failed: connection reset" in log
    later = (
        f"python -m kto_lightning.export ckpt_path={run} out={run / 'hf_model'} overwrite=true "
        "push_to_hub=me/kto-tiny private=true"
    )
    assert later in log, log[-2000:]
    assert "not pushed to the hub" in log  # the closing summary says so too
    assert TOKEN not in log + result.stdout + result.stderr, "an error may quote the token"

    # The export command: one line, exit 1, the folder written before the upload kept.
    out = tmp_path / "cli"
    exported = _export(tmp_path, f"ckpt_path={run}", f"out={out}", "push_to_hub=me/kto-tiny")
    assert exported.returncode == 1
    (line,) = exported.stderr.strip().splitlines()
    assert line.startswith("error: pushing") and "'me/kto-tiny' failed" in line
    assert TOKEN not in line and (out / "model.safetensors").is_file()


def test_a_push_that_cannot_happen_stops_before_the_work(monkeypatch, tmp_path) -> None:
    calls = _fake_hub(monkeypatch)
    # No token anywhere: not in the environment, no stored login.
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no_token"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    result = _train(tmp_path, "export.push_to_hub=me/kto-tiny", env={})
    assert result.returncode == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "export.push_to_hub" in error[0], result.stderr[-2000:]
    assert "HF_TOKEN" in error[0] and "hf auth login" in error[0]
    assert not list((tmp_path / "run").rglob("*.ckpt")), "stopped before the first step"
    assert not (tmp_path / "run" / "hf_model").exists()
    assert not calls

    # Offline mode: said as such, before the checkpoint is even looked for.
    offline = command_in_process(
        "export", f"ckpt_path={tmp_path / 'missing.ckpt'}", f"out={tmp_path / 'out'}",
        "push_to_hub=me/kto-tiny", cwd=tmp_path, env={"HF_TOKEN": TOKEN},
    )  # fmt: skip
    assert offline.returncode == 1
    assert "HF_HUB_OFFLINE=1 (offline mode) forbids pushing" in offline.stderr
    assert "missing.ckpt" not in offline.stderr and not calls


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"push_to_hub": TOKEN}, "export.push_to_hub"),
        ({"push_to_hub": "me/kto", "commit_message": f"with {TOKEN}"}, "export.commit_message"),
        ({"push_to_hub": "me/kto", "hub_token": "abc"}, "export.hub_token"),
    ],
)
def test_a_token_in_the_config_is_refused_without_repeating_it(values, named) -> None:
    with pytest.raises(ConfigError) as refused:
        check_push(values, "export.")
    message = str(refused.value)
    assert message.startswith(named) and "never taken from a config" in message
    assert TOKEN not in message and "abc" not in message


def test_a_repo_id_the_hub_would_refuse_is_named() -> None:
    with pytest.raises(ConfigError, match=r"export.push_to_hub='me/my model' is not a hub repo"):
        check_push({"push_to_hub": "me/my model"}, "export.")
    with pytest.raises(ConfigError, match=r"export.revision must name a branch"):
        check_push({"push_to_hub": "me/kto", "revision": " "}, "export.")
    assert check_push({"push_to_hub": None}, "export.") is None  # no push: no token needed
    # A run's push uploads its export: refused when the export is off.
    with pytest.raises(ConfigError, match=r"export.enabled=false does not write"):
        check_run_push({"enabled": False, "push_to_hub": "me/kto"})
