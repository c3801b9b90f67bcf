"""One run per run directory: a new run gets a folder of its own, and resuming is the only way
into a folder that holds another run.

- A time-stamped name (the default `hydra.run.dir` and `hydra.sweep.dir`) is made unique when the
  launch starts: of two launches in the same second, the second gets `<time>_1` (an exclusive
  mkdir decides, so it holds across processes and hosts sharing the disk).
- A folder the user names (`hydra.run.dir=...`, `hydra.sweep.dir=...`, `paths.output_dir=...`) is
  refused while another live process runs in it, and when it holds another run's checkpoints,
  export or metrics, unless this launch resumes a checkpoint inside it. Hydra writes `.hydra/` and
  `train.log` into the run directory before the run starts, so the check runs first, as a Hydra
  callback (`RunDirClaim`, conf/hydra/default.yaml): a refused launch leaves the other run's files
  as they were.

A process claims a folder by locking its `.run.lock` (a POSIX lock, which the system drops when the
process ends however it ends, and which forked workers do not inherit); the file names the host and
process id for the message another launch prints.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import sys
from pathlib import Path
from typing import Any, cast

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from kto_lightning.errors import ConfigError
from kto_lightning.runs.checkpointing import process_alive

try:
    import fcntl
except ImportError:  # not a POSIX system: the process id in the file is checked instead
    fcntl = None  # type: ignore[assignment]

CLAIM_FILE = ".run.lock"
# What a finished or running run leaves in its folder, which a new run would overwrite.
RUN_OUTPUTS = ("checkpoints/*.ckpt", "hf_model", "csv/metrics.csv")
# Environment variables that give a process's rank when a launcher started several at once.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
_PLAIN_VALUE = re.compile(r"[\w./:+@-]+")

_held: dict[Path, int] = {}  # folder -> file descriptor of its locked claim, in this process


def launched_together() -> bool:
    """Whether this process is one of several started for one run (torchrun, srun, or Lightning
    starting the other ranks): they all must write into one folder, so its name stays as given."""
    return any(
        int(os.environ.get(name, "1") or 1) > 1 for name in ("WORLD_SIZE", "SLURM_NTASKS")
    ) or any(name in os.environ for name in ("LOCAL_RANK", "RANK"))


def is_peer_rank() -> bool:
    """Whether this process is a rank other than 0 of such a launch: rank 0 claims for all."""
    return any(os.environ.get(name, "0") not in ("", "0") for name in _RANK_VARIABLES)


def fresh_dir(base: Path) -> Path:
    """`base`, or else `base_1`, `base_2`, ...: the first that did not exist, created here.

    `mkdir` without exist_ok either creates the folder or fails, so two launches that computed
    the same time-stamped name never both get it.
    """
    base.parent.mkdir(parents=True, exist_ok=True)
    for number in range(10_000):
        folder = base if number == 0 else base.with_name(f"{base.name}_{number}")
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        return folder
    raise ConfigError(f"{base}: 10000 run directories of that name exist; clean up its parent")


def run_outputs(folder: Path) -> list[Path]:
    """The checkpoints, export and metrics a run left in `folder` (see RUN_OUTPUTS)."""
    return sorted(path for pattern in RUN_OUTPUTS for path in folder.glob(pattern))


def _holder(file: Path) -> str:
    """Who holds the claim in `file`, as its text says (`<host> <pid>`)."""
    try:
        host, pid = file.read_text().split()
    except (OSError, ValueError):
        return "another process"
    return f"process {pid} on {host}"


def _pid_alive(file: Path) -> bool:
    """Where locks are not supported: whether the claim's process, on this host, still runs."""
    try:
        host, pid = file.read_text().split()
    except (OSError, ValueError):
        return False
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    return process_alive(int(pid))


def _lock(fd: int, file: Path) -> bool:
    """Lock the open claim `file` for this process; False: another live process holds it."""
    if fcntl is None:
        return not _pid_alive(file)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EAGAIN):
            return False
        # A file system without locks (some network mounts): fall back to the process id.
        return not _pid_alive(file)
    return True


def claim(folder: Path, key: str) -> bool:
    """Make `folder` this process's run directory, for as long as it runs.

    Returns:
        True when claimed now; False when this process held it already.

    Raises:
        ConfigError: naming `key`, the folder and the holder, when another live process holds it.
    """
    folder = folder.resolve()
    if folder in _held:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / CLAIM_FILE
    fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    if not _lock(fd, file):
        os.close(fd)
        raise _in_use(key, folder, _holder(file))
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
    _held[folder] = fd
    return True


def _in_use(key: str, folder: Path, holder: str) -> ConfigError:
    other = "" if key == "resume" else f", or choose another {key}"
    return ConfigError(
        f"{key}: the run directory {folder} is in use by another run ({holder}, see {CLAIM_FILE} "
        f"there), and two processes in one folder overwrite each other's checkpoints; wait until "
        f"it ends{other}"
    )


def _live_holder(folder: Path) -> str | None:
    """Who holds `folder`'s claim, if a live process does; looked at without creating a claim."""
    file = folder / CLAIM_FILE
    try:
        fd = os.open(file, os.O_RDWR)
    except OSError:
        return None
    try:
        return None if _lock(fd, file) else _holder(file)
    finally:
        os.close(fd)  # and with it the lock, if it was taken


def release(folder: Path) -> None:
    """Give up this process's claim on `folder` (the file stays: its lock is what counts)."""
    fd = _held.pop(folder.resolve(), None)
    if fd is not None:
        os.close(fd)


def release_all(keep: tuple[Path, ...] = ()) -> None:
    """Give up every claim of this process but those on `keep`."""
    kept = {folder.resolve() for folder in keep}
    for folder in [folder for folder in _held if folder not in kept]:
        release(folder)


def claim_run_dir(folder: Path, key: str, resumed: bool = False) -> None:
    """Claim `folder` for a run (see the module's docstring); a rank other than 0 claims nothing.

    Args:
        folder: the run directory.
        key: the setting that chose it, for the message.
        resumed: whether this run resumes the run whose checkpoints are in `folder`.

    Raises:
        ConfigError: naming `key`, when another live process runs there, or when `folder` holds
            another run's outputs and `resumed` is False.
    """
    if is_peer_rank():
        return
    folder = folder.resolve()
    outputs = [] if resumed or folder in _held else run_outputs(folder)
    if outputs:  # refused before a claim file is written: the other run's folder stays as it was
        holder = _live_holder(folder)
        if holder is not None:
            raise _in_use(key, folder, holder)
        raise ConfigError(
            f"{key}={str(folder)!r} holds another run ({outputs[0]}), which a new run would "
            f"overwrite; choose another {key}, or continue that run with "
            f"resume={folder / 'checkpoints' / 'last.ckpt'}"
        )
    claim(folder, key)


def output_dir_key(cfg: DictConfig) -> str:
    """The setting that chose `cfg.paths.output_dir`: Hydra's run or sweep folder, or the key."""
    if HydraConfig.initialized():
        hydra = HydraConfig.get()
        if Path(hydra.runtime.output_dir).resolve() == Path(cfg.paths.output_dir).resolve():
            return "hydra.sweep.dir" if hydra.mode == RunMode.MULTIRUN else "hydra.run.dir"
    return "paths.output_dir"


def _resumes_into(resume: Any, folder: Path) -> bool:
    """Whether `resume` names a checkpoint saved in `folder` (`<folder>/checkpoints/<file>`)."""
    if not isinstance(resume, str) or resume in ("", "auto"):
        return False
    return Path(resume).resolve().parent.parent == folder.resolve()


def _override(key: str, value: str) -> str:
    """`key=value` as Hydra parses it back: quoted unless plain."""
    if _PLAIN_VALUE.fullmatch(value):
        return f"{key}={value}"
    return f"{key}='" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _take(config: DictConfig, sweep: bool) -> Path | None:
    """Choose and claim the launch's folder (`hydra.run.dir` or `hydra.sweep.dir`)."""
    if is_peer_rank():
        return None
    node = config.hydra.sweep if sweep else config.hydra.run
    key = "hydra.sweep.dir" if sweep else "hydra.run.dir"
    written = str(cast(dict, OmegaConf.to_container(node, resolve=False))["dir"])
    folder = Path(str(node.dir))
    if "${now:" in written and not launched_together():
        folder = fresh_dir(folder)
        if folder != Path(str(node.dir)):
            with read_write(config.hydra), open_dict(config.hydra):
                node.dir = str(folder)
                # A sweep composes each job's config again from these overrides.
                config.hydra.overrides.hydra.append(_override(key, str(folder)))
    if not sweep:
        claim_run_dir(folder, key, resumed=_resumes_into(config.get("resume"), folder))
        return folder
    taken = [run for job in sorted(folder.glob("*/")) for run in run_outputs(job)]
    if taken:
        raise ConfigError(
            f"{key}={str(folder)!r} holds the jobs of another sweep ({taken[0]}), which this "
            f"sweep would overwrite; choose another {key} (with resume=auto, this sweep's jobs "
            "resume those that match them)"
        )
    claim(folder, key)
    return folder


class RunDirClaim(Callback):
    """A Hydra callback that gives each launch its own folder before Hydra writes into it."""

    def __init__(self) -> None:
        self.launch: tuple[Path, ...] = ()

    def _start(self, config: DictConfig, sweep: bool) -> None:
        try:
            folder = _take(config, sweep)
        except ConfigError as error:  # logging is not set up yet: the entry point's one line
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(1) from None
        self.launch = (folder,) if folder is not None else ()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start(config, sweep=False)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._start(config, sweep=True)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        # A sweep's jobs run one after another in this process: each gives its folder back.
        release_all(keep=self.launch)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        release_all()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        release_all()
