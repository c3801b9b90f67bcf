"""Keep secrets (API keys, tokens, passwords) out of logged hyperparameters and checkpoints."""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

# A key's name that says its value is a credential, case-insensitively: one ending in "key"
# (`openai_key`, `access_key`, `apikey`), or one holding "api_key", "token", "secret", "pass"
# (`password`, `db_passwd`, `passphrase`), "credential" or "auth" (`auth_header`).
SECRET_KEY = re.compile(r"key$|api_?key|token|secret|pass|credential|auth", re.IGNORECASE)
REDACTED = "***"
# Names that match the above but hold no credential: token counts, limits and ids, the
# tokenizer, special tokens, a model card's author, and the logging filter that redacts.
NOT_SECRET = re.compile(
    r"tokenizer|tokens$|tokens_per_|^(max|min|num)_|token_ids?$|^(bos|eos|pad|unk|sep|cls|mask)_token"
    r"|author|^redact",
    re.IGNORECASE,
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


def _leaves(value: Any) -> set[str]:
    """Every scalar under `value` (a secret's value: text, a number, or a list of them)."""
    if isinstance(value, dict):
        return set().union(*(_leaves(v) for v in value.values())) if value else set()
    if isinstance(value, list | tuple):
        return set().union(*(_leaves(v) for v in value)) if value else set()
    if isinstance(value, bool) or value is None or value == "":
        return set()
    return {str(value)}


def secret_values(config: Any) -> set[str]:
    """The values held under secret-looking keys, anywhere in `config`, as text: strings,
    numbers (`+my_password=12345678`) and the items of lists."""
    found: set[str] = set()
    if isinstance(config, dict):
        for key, value in config.items():
            if is_secret_key(str(key)):
                found |= _leaves(value)
            else:
                found |= secret_values(value)
    elif isinstance(config, list | tuple):
        for item in config:
            found |= secret_values(item)
    return found


def _whole_values(secrets: set[str]) -> re.Pattern[str]:
    """A pattern of the secrets as whole values, longest first: a secret 1234 must not turn
    max_steps: 12345 into ***5."""
    alternatives = sorted(secrets, key=len, reverse=True)
    return re.compile("|".join(rf"(?<![\w.]){re.escape(s)}(?![\w.])" for s in alternatives))


def scrub_files(folder: str | Path, secrets: set[str]) -> None:
    """Replace every secret value by *** in the YAML files of `folder` (Hydra's .hydra/ record:
    config.yaml, hydra.yaml and overrides.yaml all repeat what was given on the command line)."""
    if not secrets:
        return
    pattern = _whole_values(secrets)
    for path in Path(folder).glob("*.yaml"):
        text = path.read_text()
        scrubbed = pattern.sub("***", text)
        if scrubbed != text:
            path.write_text(scrubbed)


# `key=value` as a command line or a log line writes it: an override, with its + or ~.
ASSIGNMENT = re.compile(
    r"(?P<key>[+~]*[A-Za-z_][\w.\-]*)=(?P<value>'[^']*'|\"[^\"]*\"|\[[^\]]*\]|[^\s,\]'\"]+)"
)


def redact_assignments(text: str) -> str:
    """`text` with the value of every `key=value` whose key is secret-named replaced by ***."""

    def _shown(match: re.Match[str]) -> str:
        key = match.group("key")
        return f"{key}={REDACTED}" if is_secret_key(key.lstrip("+~")) else match.group(0)

    return ASSIGNMENT.sub(_shown, text)


# A YAML mapping line (`  key: value`, `- key: value`); its value may be empty (a block below).
_YAML_ENTRY = re.compile(r"^(?P<indent>[ -]*)(?P<key>[^\s:#'\"][^:#]*?):(?:[ ]+(?P<value>.*))?$")


def _yaml_secrets(text: str) -> set[str]:
    """The values YAML `text` holds under secret-named keys: scalars on the key's line, and the
    items and values of a block indented below one."""
    found: set[str] = set()
    secret_indent: int | None = None  # inside the block of a secret-named key
    for line in text.splitlines():
        body = line.lstrip(" -")
        indent = len(line) - len(body)
        if secret_indent is not None and body and indent > secret_indent:
            entry = _YAML_ENTRY.match(line)
            value = entry.group("value") if entry else body
            if value:
                found.add(value.strip().strip("'\""))
            continue
        secret_indent = None
        entry = _YAML_ENTRY.match(line)
        if entry is None or not is_secret_key(entry.group("key").strip()):
            continue
        value = (entry.group("value") or "").strip()
        if value in ("", "|", ">", "|-", ">-"):
            secret_indent = indent
        elif value not in ("null", "~", "''", '""', "[]", "{}"):
            found.add(value.strip("'\""))
    return found


def _assignment_secrets(text: str) -> set[str]:
    """The values of secret-named `key=value` overrides written in `text`."""
    return {
        match.group("value").strip("'\"")
        for match in ASSIGNMENT.finditer(text)
        if is_secret_key(match.group("key").lstrip("+~"))
    }


def redact_text(text: str) -> str:
    """`text` (Hydra's `--cfg`/`--info` output: YAML and override lists) with every value held
    by a secret-named key, or given to one as `key=value`, replaced by *** wherever it appears
    (so an interpolation resolved into another key shows *** too)."""
    secrets = {s for s in _yaml_secrets(text) | _assignment_secrets(text) if s and s != REDACTED}
    if not secrets:
        return text
    return _whole_values(secrets).sub(REDACTED, text)


class RedactingFilter(logging.Filter):
    """A logging filter that hides the values of secret-named overrides in every record.

    Hydra's launcher logs each sweep job's overrides (`#0 : +hf_token=...`); conf/hydra puts this
    filter on Hydra's and the job's log handlers, console and file.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_assignments(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def scrub_hydra_record(cfg: DictConfig) -> None:
    """Hydra has already written the config and overrides to <run dir>/.hydra, and a sweep's to
    <sweep dir>/multirun.yaml: drop the secrets of `cfg` from them."""
    hydra_config = HydraConfig.get()
    secrets = secret_values(OmegaConf.to_container(cfg, resolve=False))
    if hydra_config.output_subdir is not None:
        scrub_files(Path(hydra_config.runtime.output_dir) / hydra_config.output_subdir, secrets)
    if hydra_config.mode == RunMode.MULTIRUN:
        scrub_files(hydra_config.sweep.dir, secrets)
