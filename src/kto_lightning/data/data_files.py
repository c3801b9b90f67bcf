"""What the local data files of a run held: a checksum of each, recorded in the run config (and so
in its checkpoints), that a resume compares with the files it finds (runs/resume.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from kto_lightning.data.config import TOY, Source
from kto_lightning.data.toy import CONSISTENCY

# The run config's entry (and so a checkpoint's) that records what the local data files held.
DATA_FILES_KEY = "data_files"
# Local files hashed by this process: {(path, size, mtime_ns): blake2b}; a resume check and the
# run it starts read each file once.
_hashed: dict[tuple[str, int, int], str] = {}


def _file_hash(path: Path) -> str:
    """blake2b of a file's bytes (benchmarks/RESULTS.md, "Options"), once per version of the
    file."""
    stat = path.stat()
    known = (str(path), stat.st_size, stat.st_mtime_ns)
    if known not in _hashed:
        digest = hashlib.blake2b(digest_size=16)
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
        _hashed[known] = digest.hexdigest()
    return _hashed[known]


def data_files(source: Source) -> dict[str, dict[str, Any]]:
    """{key: {file, bytes, blake2b}} of each local file `source` trains or validates on
    (`data.source.path`, `data.source.val_path`).

    What the config cannot say: whether a file at the same path still holds the same rows. A
    resume compares it (runs/resume.py). Hub datasets and the bundled tasks have no entry:
    their name and revision, in the config, say which rows they are; rows in memory have none.
    """
    record: dict[str, dict[str, Any]] = {}
    for key, value in (("path", source.path), ("val_path", source.val_path)):
        if not isinstance(value, str):  # rows in memory, or no val_path
            continue
        bundled = key == "path" and value in (TOY, CONSISTENCY)
        path = Path(value).expanduser() if value and not bundled else None
        if path is not None and path.is_file():
            resolved = path.resolve()
            record[f"data.source.{key}"] = {
                "file": str(resolved),
                "bytes": resolved.stat().st_size,
                "blake2b": _file_hash(resolved),
            }
    return record
