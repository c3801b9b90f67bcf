"""Atomic checkpoint files, leftovers of killed writers, and the resumable shuffle."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from kto_lightning.data.sampler import EpochShuffleSampler
from kto_lightning.data.sharding import RankShard
from kto_lightning.runs.checkpointing import (
    AtomicCheckpointIO,
    remove_partial_checkpoints,
)


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


def test_a_save_stages_nothing_in_tmpdir(tmp_path, monkeypatch) -> None:
    """Lightning's writer staged the file in $TMPDIR: a full one failed the save (ENOSPC)."""

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkstemp", full)
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    assert torch.load(path, weights_only=True)["state_dict"]["w"].tolist() == [1.0, 1.0, 1.0]


def test_a_failed_save_leaves_neither_a_file_nor_a_partial(tmp_path, monkeypatch) -> None:
    def disk_full(obj, file, *args, **kwargs):
        Path(file).write_bytes(b"a first part")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    path = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(OSError, match="No space left"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, path)
    assert list(path.parent.iterdir()) == []


def test_partial_files_of_a_host_with_dots_in_its_name_are_removed(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "node1.cluster.example")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    checkpoints = tmp_path / "runs" / "a" / "checkpoints"
    checkpoints.mkdir(parents=True)
    killed = checkpoints / f".last.ckpt.node1.cluster.example.{int(gone.stdout)}.partial"
    other_host = checkpoints / f".last.ckpt.cluster.example.{int(gone.stdout)}.partial"
    for path in (killed, other_host):
        path.write_bytes(b"x")
    assert remove_partial_checkpoints(tmp_path / "runs") == [killed]
    assert [p.name for p in checkpoints.iterdir()] == [other_host.name]


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
