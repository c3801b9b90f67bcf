"""Publishing an exported folder to the Hugging Face hub: `export.push_to_hub` at the end of a
training run, `push_to_hub=` on the export command.

The token is the hub client's own: HF_TOKEN in the environment, else the one `hf auth login`
(`huggingface-cli login`) stored. It is never read from a config or an option, never logged,
never written: a config value that looks like a token is refused, so that it does not end up in
the run's records. Both checks (a target that is a repo id, a token to push with) run before
any work, so that a run does not train for an hour to fail at its upload.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kto_lightning.common.hub import offline
from kto_lightning.common.security import is_secret_key
from kto_lightning.errors import ConfigError, KTOError

# What a Hugging Face access token looks like (`hf_` and ~34 letters and digits).
TOKEN_LIKE = re.compile(r"hf_[A-Za-z0-9]{20,}")
LOGIN_HINT = (
    "set HF_TOKEN in the environment, or log in once with `hf auth login` (`huggingface-cli "
    "login` before huggingface_hub 1.0)"
)
DEFAULT_MESSAGE = "Upload a model trained with kto_lightning"
HUB = "https://huggingface.co"
# The keys of the export block (and of the export command) that say where and how to push.
PUSH_KEYS = ("push_to_hub", "private", "revision", "commit_message")


class HubPushError(KTOError):
    """The hub refused an upload, or could not be reached; the message names the repo."""


@dataclass(frozen=True)
class HubTarget:
    """Where an exported folder goes: a model repo, its visibility when created, a branch."""

    repo_id: str
    private: bool
    revision: str | None  # a branch; None: main
    commit_message: str | None

    @property
    def url(self) -> str:
        tree = f"/tree/{self.revision}" if self.revision else ""
        return f"{HUB}/{self.repo_id}{tree}"

    def arguments(self) -> list[str]:
        """The export command's `key=value` arguments that push to this target again."""
        args = [f"push_to_hub={self.repo_id}"]
        if self.private:
            args.append("private=true")
        if self.revision:
            args.append(f"revision={self.revision}")
        return args


def _refuse_tokens(values: Mapping[str, Any], prefix: str) -> None:
    """ConfigError for a secret-named key or a token-looking value: a token given in a config
    would be logged and stored with the run; the message never repeats the value."""
    for key, value in values.items():
        if is_secret_key(str(key)) or (isinstance(value, str) and TOKEN_LIKE.search(value)):
            raise ConfigError(
                f"{prefix}{key} holds what looks like a hub access token; a token is never taken "
                f"from a config or an option (it would be logged): {LOGIN_HINT}, and remove it "
                "from the config"
            )


def hub_target(values: Mapping[str, Any], prefix: str = "") -> HubTarget | None:
    """The push that `values` asks for (the export block, `prefix="export."`, or the export
    command's options), checked; None when `push_to_hub` is null.

    Raises:
        ConfigError: naming the key: a token in the config, a repo id the hub would refuse, an
            empty branch name, a `private` that is not true or false.
    """
    _refuse_tokens(values, prefix)
    repo_id = values.get("push_to_hub")
    if repo_id in (None, ""):
        return None
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(repo_id))
    except HFValidationError as error:
        raise ConfigError(
            f"{prefix}push_to_hub={repo_id!r} is not a hub repo id ({error}); write user/name or "
            "org/name"
        ) from None
    private = values.get("private", False)
    if not isinstance(private, bool):
        raise ConfigError(f"{prefix}private must be true or false, got {private!r}")
    revision = values.get("revision")
    if revision is not None and not str(revision).strip():
        raise ConfigError(f"{prefix}revision must name a branch, or be null for main")
    message = values.get("commit_message")
    return HubTarget(
        str(repo_id),
        private,
        str(revision) if revision is not None else None,
        str(message) if message else None,
    )


def hub_token(key: str = "push_to_hub") -> str:
    """The token to push with, from the environment or the stored login; ConfigError naming
    `key` when offline mode forbids the hub or there is no token."""
    if offline():
        raise ConfigError(
            f"{key} is set, but HF_HUB_OFFLINE=1 (offline mode) forbids pushing to the hub; unset "
            f"HF_HUB_OFFLINE, or set {key}=null"
        )
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ConfigError(
            f"{key} is set, but no Hugging Face token was found to push with: {LOGIN_HINT} (a "
            "token with write access)"
        )
    return token


def check_push(values: Mapping[str, Any], prefix: str = "") -> HubTarget | None:
    """`hub_target`, and for a push, a token to push with: what a run checks before its work."""
    target = hub_target(values, prefix)
    if target is not None:
        hub_token(f"{prefix}push_to_hub")
    return target


def check_run_push(export: Mapping[str, Any]) -> HubTarget | None:
    """A training run's `export` block checked (`check_push`); a push also needs the export it
    uploads. For the config checks of a run, before its data and model load."""
    target = hub_target(export, "export.")
    if target is None:
        return None
    if not export.get("enabled", True):
        raise ConfigError(
            f"export.push_to_hub={target.repo_id} uploads <run dir>/hf_model, which "
            "export.enabled=false does not write; set export.enabled=true, or export.push_to_hub="
            "null"
        )
    hub_token("export.push_to_hub")
    return target


def push_folder(folder: str | Path, target: HubTarget) -> str:
    """Upload every file of `folder` to `target` (the repo created if needed, private as asked;
    the branch created from main if needed); returns the commit's URL.

    Raises:
        HubPushError: the hub refused (no write access, a repo of another type) or could not be
            reached; the message names the repo and never holds the token.
    """
    from huggingface_hub import HfApi

    token = hub_token()
    api = HfApi(token=token)
    try:
        api.create_repo(target.repo_id, private=target.private, repo_type="model", exist_ok=True)
        if target.revision:
            api.create_branch(
                target.repo_id, branch=target.revision, repo_type="model", exist_ok=True
            )
        commit = api.upload_folder(
            repo_id=target.repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=target.revision,
            commit_message=target.commit_message or DEFAULT_MESSAGE,
        )
    # The hub client raises its HTTP errors, its transport's connection errors and OSError for
    # files: whichever it is, the upload did not happen, and the caller keeps the folder.
    except Exception as error:
        # One line (the client's messages span several), the token never in it.
        reason = " ".join(str(error).replace(token, "***").split())[:300] or type(error).__name__
        raise HubPushError(
            f"pushing {folder} to the hub repo {target.repo_id!r} failed: {reason}"
        ) from None
    return str(getattr(commit, "commit_url", None) or target.url)
