"""resume=auto/path resolution, atomic checkpoint files, and the resumable shuffle."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from kto_lightning.checkpointing import (
    AtomicCheckpointIO,
    remove_partial_checkpoints,
    resume_checkpoint,
)
from kto_lightning.data.sampler import EpochShuffleSampler
from kto_lightning.data.sharding import RankShard
from kto_lightning.errors import ConfigError


def test_resume_none_path_and_missing_path(tmp_path) -> None:
    assert resume_checkpoint(None, tmp_path / "runs" / "now") is None
    ckpt = tmp_path / "a.ckpt"
    ckpt.write_bytes(b"x")
    assert resume_checkpoint(str(ckpt), tmp_path) == str(ckpt)
    with pytest.raises(
        ConfigError, match=r"resume='nope\.ckpt': no such checkpoint file or sharded folder"
    ):
        resume_checkpoint("nope.ckpt", tmp_path)


def test_resume_auto_takes_the_newest_checkpoint_of_the_task(tmp_path) -> None:
    runs = tmp_path / "runs"
    assert resume_checkpoint("auto", runs / "new") is None, "nothing to resume: start fresh"
    older = runs / "first" / "checkpoints" / "last.ckpt"
    newer = runs / "second" / "checkpoints" / "step40.ckpt"
    for path in (older, newer):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
    os.utime(older, (time.time() - 100, time.time() - 100))
    assert resume_checkpoint("auto", runs / "third") == str(newer.resolve())


def test_atomic_checkpoint_leaves_a_whole_file_and_no_partial(tmp_path) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    assert torch.load(path, weights_only=True)["state_dict"]["w"].tolist() == [1.0, 1.0, 1.0]
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_partial_files_of_killed_writers_are_removed_and_live_ones_kept(tmp_path) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True)  # fmt: skip
    gone, host = int(finished.stdout), socket.gethostname()
    checkpoints = tmp_path / "runs" / "a" / "checkpoints"
    checkpoints.mkdir(parents=True)
    killed = checkpoints / f".last.ckpt.{host}.{gone}.partial"
    live = checkpoints / f".best-step4.ckpt.{host}.{os.getpid()}.partial"
    elsewhere = checkpoints / f".last.ckpt.{host}-other-node.{gone}.partial"
    whole = checkpoints / "last.ckpt"
    for path in (killed, live, elsewhere, whole):
        path.write_bytes(b"x")
    assert remove_partial_checkpoints(tmp_path / "runs") == [killed]
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(
        p.name for p in (live, elsewhere, whole)
    )


def test_epoch_shuffle_depends_on_seed_and_epoch_and_skips_once() -> None:
    sampler = RankShard(EpochShuffleSampler(20, seed=3))  # one rank: the order itself
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(20)) and epoch0 == list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    sampler.load_state_dict({"epoch": 1, "samples_seen": 8})  # as a checkpoint restores it
    assert list(sampler) == epoch1[8:], "a restart continues at the exact next sample"
    assert list(sampler) == epoch1, "the skip applies once"
    assert list(EpochShuffleSampler(20, seed=4)) != epoch0
