"""W&B as a user meets it: one run per sweep job, a missing login, a dead server, secrets.

Every run is a subprocess with its own HOME and no WANDB_* variable from the caller, so no
test reads the user's login or reaches a W&B server.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2

from cli import command_in_process, train_cli
from conftest import FAST

SECRETS = ("abc123xyz", "12345678")


def _closed_port() -> int:
    with socket.socket() as probe:  # a port nothing listens on once this socket is closed
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wandb_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, in_process: bool = False
) -> tuple[subprocess.CompletedProcess, float]:
    """train_cli (or, `in_process`, train_in_process) without the caller's WANDB_* variables
    (WANDB_MODE, a key) or its HOME; and the seconds it took."""
    home = cwd / "home"
    isolated = {
        "HOME": str(home),
        "WANDB_CONFIG_DIR": str(home / ".config" / "wandb"),
        "WANDB_BASE_URL": f"http://127.0.0.1:{_closed_port()}",
        **(env or {}),
    }
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("WANDB_")]:
            patch.delenv(name)
        start = time.monotonic()
        if in_process:
            result = command_in_process("train", *args, cwd=cwd, env=isolated, unset=["WANDB_MODE"])
        else:
            result = train_cli(*args, cwd=cwd, env=isolated, timeout=240)
    return result, time.monotonic() - start


def _records(path: Path) -> Iterator[wandb_internal_pb2.Record]:
    """The records of a .wandb file: a LevelDB-style log (32 KiB blocks; each chunk has a 7-byte
    header: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4) after a 7-byte file header."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        if (left := 32768 - position % 32768) < 7:  # a block's tail too short for a header
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _offline_run(run_dir: Path) -> dict:
    """What the one offline W&B run in `run_dir` recorded: id, group, name, config, exit code."""
    found = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(found) == 1, f"one offline W&B run in {run_dir}, found {found}"
    run: dict = {"config": {}, "exit_code": None}
    for record in _records(found[0]):
        if record.HasField("run"):
            run |= {"id": record.run.run_id, "group": record.run.run_group,
                    "name": record.run.display_name}  # fmt: skip
        elif record.HasField("config"):
            run["config"] |= {i.key: json.loads(i.value_json) for i in record.config.update}
        elif record.HasField("environment"):
            run.setdefault("args", []).extend(record.environment.args)
        elif record.HasField("exit"):
            run["exit_code"] = record.exit.exit_code
    return run


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A 2-job offline sweep, with two secrets on its command line."""
    cwd = tmp_path_factory.mktemp("wandb_sweep")
    result, _ = _wandb_cli(
        "-m", "loss.beta=0.1,0.2", "logger=wandb", "logger.wandb.offline=true",
        "+foo_token=abc123xyz", "+my_password=12345678", *FAST, "trainer.limit_train_batches=2",
        "validate_before_training=false", "export.enabled=false",
        f"hydra.sweep.dir={cwd}/sweep", "hydra.sweep.subdir=${hydra.job.num}", cwd=cwd,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd / "sweep", result


def test_each_sweep_job_gets_its_own_finished_run_in_the_sweeps_group(sweep) -> None:
    sweep_dir, _ = sweep
    first, second = _offline_run(sweep_dir / "0"), _offline_run(sweep_dir / "1")
    assert first["id"] != second["id"]
    assert (first["config"]["loss"]["beta"], second["config"]["loss"]["beta"]) == (0.1, 0.2)
    assert first["group"] == second["group"] == "kto-sweep"  # <task_name>-<sweep folder>
    assert first["name"].startswith("0_") and second["name"].startswith("1_")
    assert "loss.beta=0.2" in second["name"]
    assert first["exit_code"] == second["exit_code"] == 0, "each run finished, at its job's end"


def test_a_jobs_run_holds_its_metrics_config_and_generations(sweep) -> None:
    job = sweep[0] / "0"
    record = next(job.glob("wandb/offline-run-*/run-*.wandb")).read_bytes()
    for name in ("train/loss", "train/rewards/margins", "train/kl", "val/rewards/auroc",
                 "val/loss/desirable", "val/count/undesirable", "val/generations"):  # fmt: skip
        assert name.encode() in record, f"{name} missing from the offline run"
    assert b"desirable_weight" in record, "the resolved config is uploaded"
    # The generations table is on disk too, for every other logger; the CSV beside feeds the plot.
    tables = list((job / "generations").glob("step_*.jsonl"))
    rows = [json.loads(line) for line in tables[0].read_text().splitlines()]
    assert len(rows) == 4 and all({"prompt", "generation", "step"} <= set(r) for r in rows)
    assert (job / "training_curves.png").is_file()


def test_no_secret_reaches_wandbs_files_or_the_output(sweep) -> None:
    sweep_dir, result = sweep
    run_files = [path for path in sweep_dir.rglob("wandb/**/*") if path.is_file()]
    assert len(run_files) >= 8, "the .wandb record, logs, output.log, ... of both runs"
    # Every file of the sweep: W&B's, Hydra's record (.hydra/, multirun.yaml), checkpoints, logs.
    every_file = [path for path in sweep_dir.rglob("*") if path.is_file()]
    for path in every_file:  # text and binary: the .wandb file is protobuf
        content = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in content, f"{secret} in {path}"
    for secret in SECRETS:
        assert secret not in result.stdout + result.stderr
    # W&B's metadata still holds the command, with the secret-named values hidden.
    args = _offline_run(sweep_dir / "0")["args"]
    assert "+foo_token=***" in args and "+my_password=***" in args and "logger=wandb" in args
    assert _offline_run(sweep_dir / "0")["config"]["foo_token"] == "***"


def test_online_without_a_login_fails_at_once_naming_both_fixes(tmp_path) -> None:
    result, seconds = _wandb_cli(
        "logger=wandb", *FAST, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, in_process=True
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "wandb login" in errors[0] and "WANDB_API_KEY" in errors[0]
    assert "logger.wandb.offline=true" in errors[0]
    assert "loss: kto" not in result.stdout + result.stderr, "before data and model load"
    assert not (tmp_path / "run" / "wandb").exists()
    assert seconds < 60


def test_unreachable_server_logs_offline_and_a_failing_job_still_finishes_its_run(
    tmp_path,
) -> None:
    # A key of the right shape, and a server on a closed port: wandb alone would wait 90 s (and
    # ~10 s more) before failing. The run bounds the wait (15 s unless the user sets it:
    # test_the_wait_for_the_server_is_bounded_unless_the_user_chose_one); set here to 3 s through
    # the logger's `settings`, the wait is ~12 s. The rest is start-up and training, 10-30 s on a
    # busy 2-core machine. `objective` names a metric the run never logs (outside train/ and
    # val/, as a callback's would be: only warned about at the start), so the job fails after
    # training.
    result, seconds = _wandb_cli(
        "logger=wandb", "+logger.wandb.settings={init_timeout: 3}", *FAST,
        "validate_before_training=false", "export.enabled=false",
        "objective=my_callback_metric", f"hydra.run.dir={tmp_path}/run",
        cwd=tmp_path, env={"WANDB_API_KEY": "0123456789abcdef" * 2 + "01234567"},
    )  # fmt: skip
    assert seconds < 75, f"{seconds:.0f} s: the wait for the W&B server is not bounded"
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "the server did not answer" in output and "wandb sync " in output, output[-3000:]
    assert "error: objective='my_callback_metric' was not logged" in result.stderr
    run = _offline_run(tmp_path / "run")
    assert run["config"]["loss"]["beta"] == 0.1
    assert run["exit_code"] == 1, "the run is finished, marked failed"


def test_the_wait_for_the_server_is_bounded_unless_the_user_chose_one(monkeypatch) -> None:
    from omegaconf import OmegaConf

    from kto_lightning.reporting.wandb_logging import INIT_TIMEOUT_S, _init_arguments

    cfg = OmegaConf.create({"task_name": "kto"})
    monkeypatch.delenv("WANDB_INIT_TIMEOUT", raising=False)
    default = _init_arguments(OmegaConf.create({"project": "p"}), cfg)
    assert default["settings"] == {"init_timeout": INIT_TIMEOUT_S} and INIT_TIMEOUT_S < 90
    chosen = OmegaConf.create({"settings": {"init_timeout": 3, "quiet": True}})
    assert _init_arguments(chosen, cfg)["settings"] == {"init_timeout": 3, "quiet": True}
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "40")  # wandb reads it: the run adds no bound
    assert _init_arguments(OmegaConf.create({}), cfg)["settings"] == {}
