"""Keep secrets (API keys, tokens, passwords) out of logged hyperparameters and checkpoints."""

from __future__ import annotations

import copy
import re
from typing import Any

# Matched anywhere in a key's name, case-insensitively: `hf_token`, `WANDB_API_KEY`, `db_passwd`.
SECRET_KEY = re.compile(r"api_?key|token|secret|password|passwd|wandb_key", re.IGNORECASE)
REDACTED = "***"
# Keys that contain "token" but name a count, an id or the tokenizer, not a credential.
NOT_SECRET = re.compile(
    r"tokenizer|tokens$|token_ids?$|^(bos|eos|pad|unk|sep|cls|mask)_token", re.IGNORECASE
)


def is_secret_key(name: str) -> bool:
    """Whether a config key's name says that its value is a credential."""
    return bool(SECRET_KEY.search(name)) and not NOT_SECRET.search(name)


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: REDACTED
            if isinstance(k, str) and is_secret_key(k) and v not in (None, "")
            else _redact(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(_redact(v) for v in value)
    return copy.deepcopy(value)


def redact_secrets(config: dict) -> dict:
    """A deep copy of `config` with the value of every secret-named key replaced by '***'.

    Keys are matched by name at any depth (inside nested dicts and lists of dicts); a value that
    is None or empty stays as it is, so the log still shows that no secret was set.
    """
    return _redact(config)
