"""The training entry point as a user runs it: a subprocess, offline, with its own HF cache."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def train_cli(
    *args: str, cwd: Path, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m kto_lightning.train ARGS` in `cwd`; `env` adds to the offline environment."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf_home"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "kto_lightning.train", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
