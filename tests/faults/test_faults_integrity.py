"""Issue 19, items 5, 7 and 9: files a run trusts are checked, and a wait for another process ends.

- A data file changed at the same path: `resume=auto` starts fresh saying why, `resume=<ckpt>`
  is refused naming data.source.path and both hashes; a checkpoint from before the record
  still resumes, with a note.
- A reference cache file edited (same size, values halved) or truncated: one log line naming
  the file, the table scored again, and the step-1 margin is 0 again.
- A preparation lock held by a stopped process: the wait names the lock file and the holder's
  process id, and gives up after data.source.lock_timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kto_lightning.cli.run_build import build
from kto_lightning.cli.run_fit import train
from kto_lightning.common import distributed
from kto_lightning.core.metrics import metrics_from_sums
from kto_lightning.errors import ConfigError, DataError
from kto_lightning.models import reference_cache
from kto_lightning.runs.checkpointing import RUN_CONFIG_KEY
from kto_lightning.runs.resume import find_resume

# ---------------------------------------------------------------- data files (item 5)


def _write_rows(path: Path, flavour: str, rows: int = 120) -> None:
    with path.open("w") as handle:
        for i in range(rows):
            row = {"prompt": f"Q{i}: {flavour}?", "completion": f"A {flavour} {i}", "label": i % 2}
            handle.write(json.dumps(row) + "\n")


def _on_file(data: Path, run: str, tmp_path: Path) -> list[str]:
    return [
        "data=local",
        f"data.source.path={data}",
        f"data.source.cache_dir={tmp_path / 'datasets'}",
        "data.lengths.max_length=64",
        "data.lengths.max_prompt_length=32",
        "validate_before_training=false",
        f"paths.output_dir={tmp_path / 'kto' / 'runs' / run}",
    ]


@pytest.fixture
def trained_on_file(make_config, tmp_path) -> tuple[Path, Path]:
    """(the data file, the last.ckpt of a run trained on it), under <tmp>/kto/runs/first."""
    data = tmp_path / "rows.jsonl"
    _write_rows(data, "cats")
    train(make_config(*_on_file(data, "first", tmp_path), "trainer.limit_train_batches=2"))
    return data, tmp_path / "kto" / "runs" / "first" / "checkpoints" / "last.ckpt"


def test_a_changed_data_file_is_not_resumed_auto_nor_by_name(
    make_config, tmp_path, trained_on_file, caplog
) -> None:
    data, last = trained_on_file
    auto = make_config(*_on_file(data, "second", tmp_path), "resume=auto")
    saved = find_resume(auto)
    assert saved is not None and saved.path == last, "the same file: resume=auto resumes"

    _write_rows(data, "dogs")  # the same path, other rows
    with caplog.at_level("INFO", logger="kto_lightning"):
        assert find_resume(auto) is None, "other rows are another run: start fresh"
    said = caplog.text
    assert "data.source.path" in said and str(data) in said and "contents changed" in said
    assert "Starting from scratch" in said

    named = make_config(*_on_file(data, "third", tmp_path), f"resume={last}")
    with pytest.raises(ConfigError) as refused:
        find_resume(named)
    message = str(refused.value)
    recorded = torch.load(last, weights_only=True)[RUN_CONFIG_KEY]["data_files"]
    old_hash = recorded["data.source.path"]["blake2b"]
    assert f"resume={str(last)!r} was trained on other data" in message
    assert "data.source.path" in message and str(data) in message
    assert old_hash[:12] in message, "the hash the checkpoint recorded"
    assert "trained on" in message and "rows" in message and "resume=null" in message


def test_a_checkpoint_without_a_data_record_still_resumes_with_a_note(
    make_config, tmp_path, trained_on_file, caplog
) -> None:
    data, last = trained_on_file
    checkpoint = torch.load(last, weights_only=True)
    checkpoint[RUN_CONFIG_KEY].pop("data_files", None)  # as an older kto_lightning saved it
    older = tmp_path / "kto" / "runs" / "older" / "checkpoints" / "last.ckpt"
    older.parent.mkdir(parents=True)
    torch.save(checkpoint, older)
    cfg = make_config(*_on_file(data, "again", tmp_path), f"resume={older}")
    with caplog.at_level("INFO", logger="kto_lightning"):
        saved = find_resume(cfg)
    assert saved is not None and saved.path == older
    assert "records no hash of its data files" in caplog.text and "data.source.path" in caplog.text


# ---------------------------------------------------------------- reference cache (item 7)


def _cached(tmp_path: Path) -> list[str]:
    return ["reference=cache", f"reference.cache_dir={tmp_path / 'cache'}"]


def _step_one_margin(make_config, tmp_path: Path) -> float:
    """The reward margin of the first training batch, before any update: 0 when the reference
    log-probs are the untrained policy's own."""
    run = build(make_config(*_cached(tmp_path)))
    run.module.setup("fit")  # reads, or fills, the cache (as the trainer does on every rank)
    batch = next(iter(run.datamodule.train_dataloader()))
    return float(metrics_from_sums(run.module._step(batch, "train").metric_sums)["rewards/margins"])


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        names = handle.keys()  # a safe_open handle is not iterable
        return {name: handle.get_tensor(name).clone() for name in names}


def _halve(path: Path) -> None:
    """The same file, same size, same header, every value halved: what a checksum must catch."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        names = handle.keys()  # a safe_open handle is not iterable
        table = {name: handle.get_tensor(name) / 2 for name in names}
    save_file(table, str(path), metadata=metadata)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_halve, _truncate], ids=["values_halved", "truncated"])
def test_a_damaged_cache_is_reported_and_filled_again(make_config, tmp_path, caplog, damage):
    assert abs(_step_one_margin(make_config, tmp_path)) < 1e-4
    (path,) = (tmp_path / "cache").glob("*.safetensors")
    good, size = _read(path), path.stat().st_size
    damage(path)
    assert damage is _truncate or path.stat().st_size == size
    with caplog.at_level("INFO", logger="kto_lightning"):
        margin = _step_one_margin(make_config, tmp_path)
    reports = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert len(reports) == 1 and "is not used" in reports[0], reports
    assert abs(margin) < 1e-4, f"the step-1 margin is {margin}: trained against a damaged table"
    refilled = _read(path)  # whole again, and the table scored the first time
    for name, values in good.items():
        torch.testing.assert_close(refilled[name], values, rtol=0, atol=0, equal_nan=True)


def test_one_rank_that_distrusts_the_cache_has_every_rank_fill_it(
    make_config, tmp_path, monkeypatch
) -> None:
    """Under DDP the ranks agree: another rank's failed check refills the file here too, where
    it reads well (on node-local disks each rank sees its own copy)."""
    _step_one_margin(make_config, tmp_path)
    (path,) = (tmp_path / "cache").glob("*.safetensors")
    before = path.stat().st_mtime_ns

    def two_ranks(mine):  # this rank's report, and rank 1's: its copy failed its check
        return [mine, (mine[0], False, "its contents do not match their checksum")]

    monkeypatch.setattr(distributed, "gather_objects", two_ranks)
    fills = []
    fill = reference_cache.fill_cache
    monkeypatch.setattr(
        reference_cache, "fill_cache", lambda *a, **k: fills.append(1) or fill(*a, **k)
    )
    _step_one_margin(make_config, tmp_path)
    assert fills == [1] and path.stat().st_mtime_ns != before, "every rank fills, rank 0 writes"


# ---------------------------------------------------------------- the preparation lock (item 9)


@pytest.fixture
def stopped_holder(tmp_path) -> Iterator[tuple[Path, int]]:
    """(a data file, the pid of a process holding its preparation lock, stopped by SIGSTOP)."""
    data = tmp_path / "rows.jsonl"
    _write_rows(data, "locks")
    holder = (
        "import sys, time\n"
        "from kto_lightning.data.config import Source\n"
        "from kto_lightning.data.preparing import preparing\n"
        "with preparing(Source(path=sys.argv[1], cache_dir=sys.argv[2])):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", holder, str(data), str(tmp_path / "datasets")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        os.kill(child.pid, signal.SIGSTOP)
        yield data, child.pid
    finally:
        child.kill()  # SIGKILL ends a stopped process too
        child.wait(timeout=30)


def _alarm(signum, frame):
    raise TimeoutError("the preparation lock was waited on for 60 s: it never gave up")


def test_a_stopped_lock_holder_is_named_and_given_up_on(
    make_config, tmp_path, stopped_holder, caplog
) -> None:
    data, pid = stopped_holder
    cfg = make_config(*_on_file(data, "waits", tmp_path), "data.source.lock_timeout=2")
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(60)  # the old code waits for ever
    started = time.monotonic()
    try:
        with caplog.at_level("INFO", logger="kto_lightning"), pytest.raises(DataError) as gave_up:
            train(cfg)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    waited = time.monotonic() - started
    (lock,) = (tmp_path / "datasets").glob("kto_lightning-prepare-*.lock")
    message = str(gave_up.value)
    assert str(lock) in message and f"process {pid}" in message and "stopped" in message
    assert f"kill -CONT {pid}" in message and "data.source.lock_timeout" in message
    assert f"process {pid}" in caplog.text, "the wait says whom it waits for, as it starts"
    assert 2 <= waited < 30
