"""Whether the Hugging Face hub can be used now, decided in seconds rather than after retries.

Without this check, transformers and datasets retry an unreachable hub for about a minute and
then print a page of tracebacks.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse


def looks_local(name_or_path: str) -> bool:
    """A path that no hub id can be: absolute, starting with . or ~, or more than one '/' deep."""
    return (
        Path(name_or_path).is_absolute()
        or name_or_path.startswith((".", "~"))
        or "\\" in name_or_path
        or name_or_path.count("/") > 1
    )


def can_connect(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def offline() -> bool:
    """Whether HF_HUB_OFFLINE forbids the hub (read as the hub client reads it)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def unavailable_reason() -> str | None:
    """Why the hub cannot be used right now, or None when it can."""
    if offline():
        return "HF_HUB_OFFLINE is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    host = host or "huggingface.co"
    return None if can_connect(host) else f"the hub ({host}) cannot be reached"
