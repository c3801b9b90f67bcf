"""Issue 19, items 1 and 3: one run per run directory, and checkpoints never staged in $TMPDIR.

Two launches in one second, a launch pointed at a finished run or at a live one; a $TMPDIR with no
space left, and a checkpoint writer killed mid-write.
"""

from __future__ import annotations

import copy
import csv
import errno
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from cli import train_in_process
from conftest import FAST
from kto_lightning.cli import run_fit as train_module
from kto_lightning.cli.config_files import config_dir
from kto_lightning.cli.run_fit import train
from kto_lightning.errors import ConfigError
from kto_lightning.runs.checkpointing import RUN_CONFIG_KEY, remove_partial_checkpoints
from kto_lightning.runs.run_dir import RunDirClaim, release_all

# Two optimizer steps, no validation, no sample generations: a run's files in a few seconds.
SHORT = [
    *FAST,
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=0",
    "validate_before_training=false",
    "~callbacks.generations",
]


@pytest.fixture(autouse=True)
def _no_claims_left():
    yield
    release_all()  # in-process claims end with the test, as they end with a process


def _finished_run(folder: Path) -> dict[Path, bytes]:
    """A run's files as a finished run leaves them; returns their bytes by path."""
    for name, content in {
        "checkpoints/last.ckpt": b"the finished run's weights",
        "hf_model/config.json": b"{}",
        "csv/metrics.csv": b"step,train/loss\n1,0.69\n",
        ".hydra/config.yaml": b"seed: 7\n",
        "train.log": b"the finished run's log\n",
    }.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return _files(folder)


def _files(folder: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def _steps(run: Path) -> list[str]:
    with open(run / "csv" / "metrics.csv", newline="") as file:
        return [row["step"] for row in csv.DictReader(file) if row.get("train/loss")]


# ------------------------------------------------------------------ item 1: one run per folder


def test_two_runs_started_in_the_same_second_each_keep_their_own_directory(tmp_path) -> None:
    """Both launches resolve the same time-stamped name (a day, here, so that they surely do);
    the second gets `<name>_1`, and each run's checkpoint, export and metrics survive whole."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    same_name = "hydra.run.dir=outputs/kto/runs/${now:%Y-%m-%d}"
    command = [sys.executable, "-m", "kto_lightning.train", *SHORT, same_name]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    launches = [
        subprocess.Popen([*command, f"seed={seed}"], cwd=tmp_path, env=env, **pipes)
        for seed in (1, 2)
    ]
    for launch in launches:
        _, stderr = launch.communicate(timeout=300)
        assert launch.returncode == 0, stderr[-3000:]
    runs = sorted((tmp_path / "outputs" / "kto" / "runs").iterdir())
    assert [run.name for run in runs[1:]] == [f"{runs[0].name}_1"], runs
    seeds = []
    for run in runs:
        saved = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        seeds.append(saved[RUN_CONFIG_KEY]["seed"])
        assert f"seed={seeds[-1]}" in (run / ".hydra" / "overrides.yaml").read_text()
        assert (run / "hf_model" / "config.json").is_file()
        assert _steps(run) == ["1", "2"], "one run's metrics, not two interleaved"
    assert sorted(seeds) == [1, 2]


def test_a_run_pointed_at_a_finished_run_is_refused_and_changes_none_of_its_files(
    tmp_path,
) -> None:
    finished = tmp_path / "finished"
    before = _finished_run(finished)
    result = train_in_process(*SHORT, f"hydra.run.dir={finished}", cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert f"error: hydra.run.dir='{finished}' holds another run" in line
    assert f"resume={finished}/checkpoints/last.ckpt" in line
    assert _files(finished) == before, "Hydra's record, the log and the checkpoint as they were"


def test_a_run_pointed_at_a_live_run_is_refused(tmp_path, capsys) -> None:
    """A launch into a folder another process runs in (no checkpoint there yet) is refused before
    Hydra writes there, naming that process; once it is gone, the folder is free again."""
    folder = tmp_path / "live"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from kto_lightning.runs.run_dir import claim; claim(Path(sys.argv[1]), 'hydra.run.dir'); "
         "print('claimed', flush=True); time.sleep(300)", str(folder)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    launch = _composed(f"hydra.run.dir={folder}")
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "claimed\n"
        with pytest.raises(SystemExit) as stopped:
            RunDirClaim().on_run_start(config=copy.deepcopy(launch))
    finally:
        holder.kill()
        holder.wait()
    assert stopped.value.code == 1
    error = capsys.readouterr().err
    assert f"is in use by another run (process {holder.pid} on " in error, error
    assert sorted(path.name for path in folder.iterdir()) == [".run.lock"]
    RunDirClaim().on_run_start(config=launch)  # its process gone, the folder is free


def test_paths_output_dir_of_another_run_is_refused_before_anything_loads(
    make_config, tmp_path, monkeypatch
) -> None:
    def must_not_build(*args, **kwargs):
        raise AssertionError("data and model were loaded")

    monkeypatch.setattr(train_module, "build", must_not_build)
    finished = tmp_path / "finished"
    before = _finished_run(finished)
    with pytest.raises(ConfigError, match=r"^paths\.output_dir='.*/finished' holds another run"):
        train(make_config(f"paths.output_dir={finished}"))
    assert _files(finished) == before


def _composed(*overrides: str) -> DictConfig:
    """train.yaml with its hydra node, as Hydra hands it to the callbacks."""
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("mode", ["run", "sweep"])
def test_the_default_time_stamped_name_taken_already_gets_a_suffix(
    tmp_path, monkeypatch, mode: str
) -> None:
    """Two launches in one second: the default name resolves alike in both; the second launch
    gets `<time>_1`, and a sweep's jobs, composed again from the overrides, get it too."""
    monkeypatch.chdir(tmp_path)
    for name in ("WORLD_SIZE", "SLURM_NTASKS", "LOCAL_RANK", "RANK"):  # one process of one run
        monkeypatch.delenv(name, raising=False)
    first, second = _composed(), _composed()
    OmegaConf.copy_cache(from_config=first, to_config=second)  # the same `${now:}`
    node = f"hydra.{mode}.dir"
    taken = Path(OmegaConf.select(first, node))
    taken.mkdir(parents=True)  # the first launch's
    (taken / "marker").write_text("first")
    start = RunDirClaim().on_run_start if mode == "run" else RunDirClaim().on_multirun_start
    start(config=second)
    assert OmegaConf.select(second, node) == f"{taken}_1"
    assert Path(f"{taken}_1").is_dir() and (taken / "marker").read_text() == "first"
    job = _composed(*OmegaConf.to_container(second.hydra.overrides.hydra))  # as a sweep does
    assert OmegaConf.select(job, node) == f"{taken}_1"


def test_a_sweep_into_another_sweeps_folder_is_refused(tmp_path, capsys) -> None:
    sweep = tmp_path / "multiruns" / "old"
    before = _finished_run(sweep / "0_loss.beta=0.1")
    config = _composed(f"hydra.sweep.dir={sweep}")
    with pytest.raises(SystemExit) as stopped:
        RunDirClaim().on_multirun_start(config=copy.deepcopy(config))
    assert stopped.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: hydra.sweep.dir='{sweep}' holds the jobs of another sweep")
    assert _files(sweep) == before


# ------------------------------------------------------------ item 3: nothing staged in $TMPDIR


def test_a_full_tmpdir_does_not_stop_the_first_checkpoint(make_config, tmp_path, monkeypatch):
    """$TMPDIR with no space left (every file created there fails with ENOSPC): the run trains,
    saves its checkpoints beside them and leaves nothing in $TMPDIR."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    staged = tempfile.mkstemp

    def full(*args, dir=None, **kwargs):
        if dir is None or Path(dir) == tmpdir:
            raise OSError(errno.ENOSPC, "No space left on device")
        return staged(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", full)
    run_dir = tmp_path / "run"
    train(make_config(*SHORT[len(FAST) :], f"paths.output_dir={run_dir}"))
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2
    assert list(tmpdir.iterdir()) == []


def test_a_checkpoint_writer_killed_mid_write_leaves_no_fragment_anywhere(tmp_path) -> None:
    """The writer dies at its first megabyte (a file size limit: SIGXFSZ). Nothing is left in
    $TMPDIR; the fragment beside the checkpoint names its process, and the next start removes it."""
    tmpdir, checkpoints = tmp_path / "tmpdir", tmp_path / "runs" / "a" / "checkpoints"
    tmpdir.mkdir()
    script = (
        "import resource, signal, sys, torch\n"
        "from kto_lightning.runs.checkpointing import AtomicCheckpointIO\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it: the kernel kills\n"
        "AtomicCheckpointIO().save_checkpoint({'w': torch.ones(1 << 20)}, sys.argv[1])\n"
    )
    killed = subprocess.run(
        [sys.executable, "-c", script, str(checkpoints / "last.ckpt")],
        env={**os.environ, "TMPDIR": str(tmpdir)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGXFSZ, killed.stderr[-2000:]
    assert list(tmpdir.iterdir()) == [], "a fragment in $TMPDIR"
    (fragment,) = checkpoints.iterdir()
    assert fragment.name.startswith(".last.ckpt.") and fragment.stat().st_size == 1 << 20
    assert remove_partial_checkpoints(tmp_path / "runs") == [fragment]
    assert list(checkpoints.iterdir()) == []
