"""The lock on preparing a source's rows in its cache folder, so that processes given the same data
(DDP ranks, a sweep's jobs) tokenize it once; its holder says who it is, and a waiter gives up
after data.source.lock_timeout naming the holder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import datasets
from filelock import FileLock, Timeout

from kto_lightning.data.config import TOY, Source
from kto_lightning.data.sources import is_in_memory
from kto_lightning.data.toy import CONSISTENCY
from kto_lightning.errors import DataError

log = logging.getLogger(__name__)


def _holder_file(lock: Path) -> Path:
    """The file beside `lock` in which its holder writes who it is (a lock file holds nothing)."""
    return lock.with_name(lock.name + ".holder")


def _write_holder(lock: Path) -> None:
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    _holder_file(lock).write_text(json.dumps(record) + "\n")


def _holder(lock: Path) -> str:
    """Who holds `lock`, for a message: "process 1234 on host h (holding it since ...)", and
    whether it is stopped, as its holder wrote it; "a process that did not say which" else."""
    try:
        record = json.loads(_holder_file(lock).read_text())
        pid, host, since = int(record["pid"]), str(record["host"]), float(record["since"])
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that did not say which (no readable holder file)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
    text = f"process {pid} on host {host} (holding it since {started})"
    if host == socket.gethostname() and _stopped(pid):
        text += f" (it is stopped, as by kill -STOP: `kill -CONT {pid}` lets it go on)"
    return text


def _stopped(pid: int) -> bool:
    """Whether process `pid` of this host is stopped (Linux's /proc; False where unknown)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] in (["T"], ["t"])  # the state follows the name


@contextlib.contextmanager
def preparing(source: Source) -> Iterator[None]:
    """Hold the lock on preparing `source`'s rows in its cache folder (nothing for a bundled
    task, which is made in memory).

    The holder writes its process id beside the lock. Another process waits for it up to
    `source.lock_timeout` seconds, saying whom it waits for, then gives up naming the lock file
    and the holder: a holder stopped (`kill -STOP`) or hung would otherwise keep every other run
    of the same data waiting for ever.

    Raises:
        DataError: when the lock is still held after `source.lock_timeout` seconds.
    """
    made_here = is_in_memory(source.path) or source.path in (TOY, CONSISTENCY)
    if made_here and (source.val_path is None or is_in_memory(source.val_path)):
        yield
        return
    folder = Path(source.cache_dir or datasets.config.HF_DATASETS_CACHE).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    # Rows in memory by what they are, not their repr (which may be megabytes).
    name, val_name = (
        "<in memory>" if is_in_memory(value) else value for value in (source.path, source.val_path)
    )
    named = (name, source.subset, source.split, source.revision, val_name)
    digest = hashlib.sha256(repr((*named, source.val_split)).encode()).hexdigest()[:16]
    path = folder / f"kto_lightning-prepare-{digest}.lock"
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        timeout = source.lock_timeout
        limit = "for ever" if timeout is None else f"up to {timeout:g} s"
        log.info(
            "data: another process is preparing %s: %s (lock %s); waiting %s for its cache "
            "(data.source.lock_timeout)",
            name, _holder(path), path, limit,
        )  # fmt: skip
        try:
            lock.acquire(timeout=-1 if timeout is None else timeout)
        except Timeout:
            raise DataError(
                f"data: gave up after waiting {timeout:g} s (data.source.lock_timeout) for the "
                f"lock {path} on preparing {name}, held by {_holder(path)}. If that "
                "process is stopped or hung, end it (or let it go on); if it is still working, "
                "raise data.source.lock_timeout (null waits for ever)"
            ) from None
    try:
        _write_holder(path)
        yield
    finally:
        _holder_file(path).unlink(missing_ok=True)  # before the release: the next holder's stays
        lock.release()
