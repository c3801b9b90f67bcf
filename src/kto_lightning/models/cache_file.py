"""A reference cache file: the table of log-probs in safetensors, with a checksum of its tensors in
the header, checked on every read (a file edited, truncated or written by another version is
never trained against), and written atomically.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

# The safetensors header entry that holds a file's `table_checksum`.
CHECKSUM = "kto_lightning.blake2b"


def table_checksum(table: dict[str, Tensor]) -> str:
    """A hash of a table's tensors: names, dtypes, shapes and bytes (any edit changes it).

    The table is two floats a row (16 MB for a million rows): hashing it costs milliseconds.
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, values in sorted(table.items()):
        digest.update(f"{name}:{values.dtype}:{tuple(values.shape)}".encode())
        digest.update(values.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_table(path: Path) -> tuple[dict[str, Tensor] | None, str | None]:
    """The table in the cache file `path`, checked against its checksum: (table, None); (None,
    None) when there is no file; (None, what is wrong) when it cannot be trusted."""
    if not path.is_file():
        return None, None
    try:
        with safe_open(str(path), framework="pt") as handle:
            recorded = (handle.metadata() or {}).get(CHECKSUM)
            names = handle.keys()  # a safe_open handle is not iterable
            # Copies, not views of the mapped file: the values checked are the values used,
            # whatever later happens to the file.
            table = {name: handle.get_tensor(name).clone() for name in names}
    except (SafetensorError, OSError) as error:
        return None, f"it cannot be read ({error})"
    if recorded is None:
        return None, "it holds no checksum (written by an older kto_lightning)"
    if table_checksum(table) != recorded:
        return None, "its contents do not match their checksum (the file was changed)"
    return table, None


def write_table(table: dict[str, Tensor], path: Path) -> None:
    """Write `table` to `path` with its checksum, atomically: a crash or a concurrent run never
    leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    save_file(table, str(partial), metadata={CHECKSUM: table_checksum(table)})
    os.replace(partial, path)
