"""The entry points as a user runs them: a subprocess, offline, with its own HF cache; or, where
the process itself is not what a test checks, the same command run in this process."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest


def train_cli(
    *args: str, cwd: Path, timeout: int = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m kto_lightning.train ARGS` in `cwd`; `env` adds to the offline environment."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf_home"), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "kto_lightning.train", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@contextlib.contextmanager
def offline_env(
    cwd: Path, env: dict[str, str] | None = None, unset: Sequence[str] = ()
) -> Iterator[None]:
    """The environment `train_cli` gives its process, also for a module-scoped fixture (which
    runs before the per-test one of conftest.py): offline, caches under `cwd`; `env` adds to it,
    and the variables named in `unset` are removed."""
    import datasets

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HOME", str(cwd / "hf_home"))
        patch.setenv("WANDB_MODE", "offline")
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        for name in unset:
            patch.delenv(name, raising=False)
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cwd / "datasets_cache"))
        yield


def train_in_process(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """What `train_cli` returns, from the entry point run in this process (`command_in_process`)."""
    return command_in_process("train", *args, cwd=cwd, env=env)


def command_in_process(
    command: str,
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    unset: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """What `python -m kto_lightning.<command> ARGS` returns, from the same path run in this
    process (`kto-lightning <command> ARGS`, kto_lightning.__main__): its exit status and what it
    printed, without the ~8 s of CPU a new interpreter spends importing torch, transformers and
    Lightning.

    For tests of what a command says and writes; signals, exit by a signal, child processes,
    what a fresh process imports and environment read at import still need a subprocess.
    Hydra's logging handlers (which write to the captured streams and the run's log file) and
    the config Hydra keeps of its last job are removed afterwards, so later tests log, and run,
    as before.
    """
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from kto_lightning.__main__ import main

    root = logging.getLogger()
    kept_handlers, kept_level = list(root.handlers), root.level
    loggers = {name: logging.getLogger(name) for name in ("kto_lightning", "lightning", "hydra")}
    kept = {name: (lg.handlers[:], lg.level, lg.propagate) for name, lg in loggers.items()}
    kept_argv, kept_cwd = sys.argv, Path.cwd()
    kept_full_error = os.environ.get("HYDRA_FULL_ERROR")
    out, err = io.StringIO(), io.StringIO()
    code = 0
    os.chdir(cwd)
    try:
        with (
            offline_env(cwd, env, unset),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            try:
                code = main([command, *args])
            except SystemExit as stopped:
                code = stopped.code if isinstance(stopped.code, int) else (stopped.code is not None)
    finally:
        os.chdir(kept_cwd)
        sys.argv = kept_argv
        # Hydra keeps the last job's config (which tells a sweep's job from a run) in process.
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
        if kept_full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = kept_full_error
        for handler in [h for h in root.handlers if h not in kept_handlers]:
            root.removeHandler(handler)
            handler.close()
        root.handlers[:] = kept_handlers
        root.setLevel(kept_level)
        for name, (handlers, level, propagate) in kept.items():
            loggers[name].handlers[:] = handlers
            loggers[name].setLevel(level)
            loggers[name].propagate = propagate
    return subprocess.CompletedProcess(
        [f"kto_lightning.{command}", *args], int(code), out.getvalue(), err.getvalue()
    )
