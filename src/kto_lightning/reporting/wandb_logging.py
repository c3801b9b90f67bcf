"""Weights & Biases around a job: a login checked before anything loads, one run per job (named
and grouped in a sweep), a bounded wait for the server, and no secret in W&B's own files.

A Hydra sweep runs its jobs one after another in one process, and `WandbLogger` reuses any W&B
run still active: without `finishing_wandb_run` every job would log into job 0's run.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

from kto_lightning.common.extras import require
from kto_lightning.errors import ConfigError
from kto_lightning.runs.sweeps import in_sweep, job_dirname, shown_overrides

log = logging.getLogger("kto_lightning")

# wandb waits 90 s for its server by default, then fails; it answers within seconds when it is
# reachable. A run that gets no answer in this time (plus the time wandb spends looking up the
# user) logs offline instead. WANDB_INIT_TIMEOUT in the environment overrides it.
INIT_TIMEOUT_S = 15.0
# WANDB_MODE values (and `mode=`) under which wandb needs neither a login nor a network.
NO_SERVER_MODES = ("offline", "dryrun", "disabled")


def _mode(entry: DictConfig) -> str:
    """The mode the logger `entry` will run in: its `offline` key, its `mode`, then WANDB_MODE."""
    if entry.get("offline"):
        return "offline"
    return str(entry.get("mode") or os.environ.get("WANDB_MODE") or "online")


def _has_credentials() -> bool:
    """Whether wandb finds an API key (WANDB_API_KEY, `wandb login`'s netrc entry, its settings
    file) for its server, without asking the server."""
    try:
        from wandb.errors import AuthenticationError
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib.wbauth import authenticate_session
    except ImportError:  # another wandb version: wandb.init reports a missing login itself
        return True
    try:
        found = authenticate_session(
            host=wandb_setup.singleton().settings.base_url,
            source="kto_lightning",
            prompt=False,
            update_session=False,
        )
    except AuthenticationError as error:  # a key is set, but is not one
        raise ConfigError(
            f"logger=wandb: the W&B credentials are invalid ({error}); fix WANDB_API_KEY or run "
            "`wandb login --relogin`, or log offline with logger.wandb.offline=true"
        ) from None
    return found is not None


def check_wandb_login(cfg: DictConfig) -> None:
    """Raise ConfigError, before any data or model is loaded, when a W&B logger is chosen
    without the wandb package (an extra), or talks to the server without credentials (otherwise
    wandb fails only once the model is loaded)."""
    for name, entry in (cfg.get("logger") or {}).items():
        if not is_wandb(entry):
            continue
        require("wandb", f"logger={name}")  # chosen in a config file, not on the command line
        if _mode(entry) not in NO_SERVER_MODES and not _has_credentials():
            raise ConfigError(
                f"logger={name}: no W&B login (no WANDB_API_KEY, no `wandb login`). Run "
                "`wandb login` (or set WANDB_API_KEY in the environment), or log without an "
                f"account with logger.{name}.offline=true and upload later with `wandb sync`"
            )


def _settings(given: Any) -> Any:
    """wandb.init's `settings`, with the wait for the server bounded unless the user chose it."""
    if isinstance(given, DictConfig):
        given = OmegaConf.to_container(given, resolve=True)
    given = {} if given is None else given
    if isinstance(given, dict) and "WANDB_INIT_TIMEOUT" not in os.environ:
        given = {"init_timeout": INIT_TIMEOUT_S, **given}
    return given  # a dict: wandb.init builds fresh Settings from it on every attempt


@contextmanager
def _command_line_redacted() -> Iterator[None]:
    """wandb.init records sys.argv in the run's metadata (wandb-metadata.json, the .wandb file):
    let it see the command with the values of secret-named overrides shown as ***."""
    argv = sys.argv
    sys.argv = [argv[0], *shown_overrides(argv[1:])]
    try:
        yield
    finally:  # Lightning's DDP launcher starts the other ranks with the real command
        sys.argv = argv


def is_wandb(entry: DictConfig | None) -> bool:
    """Whether the logger config `entry` builds a WandbLogger."""
    return entry is not None and "WandbLogger" in str(entry.get("_target_", ""))


def _init_arguments(entry: DictConfig, cfg: DictConfig) -> dict[str, Any]:
    """What WandbLogger passes on to wandb.init beyond `entry`: in a sweep a group and a name
    (unless logger.wandb.group / name say), the mode, and a bounded wait for the server."""
    arguments: dict[str, Any] = {"settings": _settings(entry.get("settings"))}
    if in_sweep():
        hydra = HydraConfig.get()
        if entry.get("group") is None:  # the same in every job, also across processes
            arguments["group"] = f"{cfg.task_name}-{Path(hydra.sweep.dir).name}"
        if entry.get("name") is None:  # its folder's name, without secret-named overrides
            arguments["name"] = f"{hydra.job.num}_{job_dirname(list(hydra.overrides.task))}"
    if _mode(entry) == "offline":  # said, not left to WANDB_MODE: wandb reads that once a process
        arguments["mode"] = "offline"
    return arguments


def wandb_logger(entry: DictConfig, cfg: DictConfig) -> WandbLogger:
    """Build the WandbLogger of `entry` and start its run now (one per job); offline, with a
    warning that says how to upload it later, when the server does not answer."""
    from wandb.errors import AuthenticationError, CommError, UsageError

    # _convert_: plain dicts and lists for wandb.init (it ignores `settings` given as a DictConfig)
    arguments = {"_convert_": "all", **_init_arguments(entry, cfg)}
    logger: WandbLogger = instantiate(entry, **arguments)
    with _command_line_redacted():
        try:
            logger.experiment  # noqa: B018 - the property starts the run
        except AuthenticationError as error:
            raise ConfigError(
                f"logger=wandb: the W&B server refused the login ({error}); run "
                "`wandb login --relogin`, or log offline with logger.wandb.offline=true"
            ) from None
        except CommError as error:
            reason = str(error).splitlines()[0]
            logger = instantiate(entry, **{**arguments, "mode": "offline"})
            run_dir = Path(logger.experiment.dir).parent
            log.warning(
                "W&B: the server did not answer (%s); this run logs offline to %s. Upload it "
                "later with: wandb sync %s",
                reason,
                run_dir,
                run_dir,
            )
        except UsageError as error:  # a wandb without the early login check
            raise ConfigError(
                f"logger=wandb: {error} Run `wandb login` (or set WANDB_API_KEY), or log "
                "offline with logger.wandb.offline=true"
            ) from None
    return logger


def _active_run() -> Any:
    wandb = sys.modules.get("wandb")  # not imported: no run to finish
    return None if wandb is None else wandb.run


@contextmanager
def finishing_wandb_run() -> Iterator[None]:
    """Finish the W&B run that starts inside the block, marked failed if the block raises."""
    before = _active_run()
    try:
        yield
    except BaseException:
        run = _active_run()
        if run is not None and run is not before:
            run.finish(exit_code=1)
        raise
    run = _active_run()
    if run is not None and run is not before:
        run.finish(exit_code=0)
