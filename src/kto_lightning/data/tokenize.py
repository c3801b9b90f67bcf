"""Tokenization and truncation (the KL pairing is in kto_lightning.data.pairing).

Prompt and completion are tokenized separately so the completion mask is exact.
- Text rows:
      prompt ids     = [BOS] + tokens(prompt)          (BOS only if the tokenizer has one)
      completion ids = tokens(completion) + [EOS]
- Conversations are rendered with the tokenizer's chat template; the prompt is the rendering of
  the prompt messages with the generation prompt (the assistant header), the completion is the
  rest of the rendering of prompt + completion messages: exactly the assistant's tokens, its
  end-of-turn marker included. The template supplies BOS/EOS; none are added.
Truncation, in this order:
  1. the prompt keeps its last `max_prompt_length` tokens (a leading BOS stays in front): the end
     of a prompt, nearest the answer, matters most;
  2. the completion keeps its first `max_length - len(prompt)` tokens (`fit_beside`, the rule
     that also cuts a KL partner's completion to fit beside a prompt).
A row whose completion is empty after that is dropped and counted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import datasets
import multiprocess.util  # type: ignore[import-untyped]
from transformers import PreTrainedTokenizerBase

from kto_lightning.data.config import check_lengths
from kto_lightning.data.rows import Row
from kto_lightning.errors import DataError

# Bump when the encoding below changes, so cached tokenizations made by older code are not reused.
ENCODING_VERSION = 2


@dataclass(frozen=True)
class Example:
    """One tokenized row and the completion of its KL partner (an unrelated row)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    kl_completion_ids: list[int] = field(default_factory=list)
    index: int = -1  # position in its dataset; the reference cache is looked up by it


def fit_beside(prompt_length: int, completion: Sequence[int], max_length: int) -> list[int]:
    """`completion` cut to the tokens that fit beside a prompt of `prompt_length` tokens.

    The one truncation rule for completions: a row's own, and the KL partner's completion that
    is paired with the row's prompt (kto_lightning.data.pairing).
    """
    return list(completion[: max_length - prompt_length])


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: list[dict]) -> str:
    """A conversation's prompt text, through the chat template with the generation prompt (the
    assistant header), ready for the answer."""
    # With tokenize=False, apply_chat_template returns the rendered text.
    return cast(
        str, tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    )


def cut_prompt(prompt: list[int], max_prompt_length: int, bos_id: int | None) -> list[int]:
    """`prompt` cut to its last `max_prompt_length` tokens; a leading BOS stays in front."""
    if len(prompt) <= max_prompt_length:
        return prompt
    head = prompt[:1] if bos_id is not None and prompt[0] == bos_id else []
    return head + prompt[len(prompt) - (max_prompt_length - len(head)) :]


def render_chat(
    tokenizer: PreTrainedTokenizerBase, prompt: list[dict], completion: list[dict], where: str
) -> tuple[str, str]:
    """(prompt text, completion text) of a conversation, through the chat template."""
    prompt_text = render_prompt(tokenizer, prompt)
    full_text = cast(str, tokenizer.apply_chat_template(prompt + completion, tokenize=False))
    if not full_text.startswith(prompt_text):
        raise DataError(
            f"{where}: the chat template renders the prompt differently alone (with the "
            "generation prompt) than followed by the completion, so the completion tokens "
            "cannot be told apart; set data.columns.chat_template to a template without that "
            "difference"
        )
    return prompt_text, full_text[len(prompt_text) :]


def token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]`, straight from the Rust
    tokenizer where that gives the same ids: a third faster, as transformers builds a Python
    object per text around the ids."""
    fast = getattr(tokenizer, "is_fast", False)
    backend = getattr(tokenizer, "backend_tokenizer", None) if fast else None
    split_special = bool(getattr(tokenizer, "split_special_tokens", False))
    if (
        backend is None
        or backend.truncation is not None  # transformers switches both off for its call
        or backend.padding is not None
        or backend.encode_special_tokens != split_special
    ):
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]


def encode(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    tokenizer: PreTrainedTokenizerBase,
    chat: bool,
    max_length: int,
    max_prompt_length: int,
    where: Sequence[str] | None = None,
) -> dict[str, list]:
    """Token ids of prompts and completions, truncated; plus their lengths before truncation."""
    columns = ("prompt_ids", "completion_ids", "prompt_tokens", "completion_tokens")
    out: dict[str, list] = {column: [] for column in columns}
    if not prompts:  # a fast tokenizer fails on an empty batch
        return out
    if chat:
        where = where or [f"row {i + 1}" for i in range(len(prompts))]
        texts = [
            render_chat(tokenizer, p, c, w)
            for p, c, w in zip(prompts, completions, where, strict=True)
        ]
        prompts, completions = [t[0] for t in texts], [t[1] for t in texts]
        bos, eos = [], []
    else:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt_tokens = token_ids(tokenizer, list(prompts))
    completion_tokens = token_ids(tokenizer, list(completions))
    for prompt, completion in zip(prompt_tokens, completion_tokens, strict=True):
        prompt, completion = bos + prompt, completion + eos
        out["prompt_tokens"].append(len(prompt))
        out["completion_tokens"].append(len(completion))
        prompt = cut_prompt(prompt, max_prompt_length, tokenizer.bos_token_id)
        out["prompt_ids"].append(prompt)
        out["completion_ids"].append(fit_beside(len(prompt), completion, max_length))
    return out


def encode_prompts(
    prompts: Sequence[Any],
    tokenizer: PreTrainedTokenizerBase,
    chat: bool,
    max_prompt_length: int,
) -> list[list[int]]:
    """Token ids of prompts alone, exactly as `encode` gives a row's prompt: a text prompt is
    [BOS] + its tokens, a conversation its rendering with the generation prompt
    (`render_prompt`), both cut to `max_prompt_length` (`cut_prompt`)."""
    if not prompts:  # a fast tokenizer fails on an empty batch
        return []
    bos_id = tokenizer.bos_token_id
    texts = [render_prompt(tokenizer, p) for p in prompts] if chat else list(prompts)
    bos = [bos_id] if bos_id is not None and not chat else []  # a template supplies its own
    return [cut_prompt(bos + ids, max_prompt_length, bos_id) for ids in token_ids(tokenizer, texts)]


def tokenize_rows(
    rows: Sequence[Row],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int,
) -> tuple[list[Example], int]:
    """Tokenize text rows into Examples; returns the kept examples and how many were dropped."""
    check_lengths(max_length, max_prompt_length)
    encoded = encode(
        [r.prompt for r in rows],
        [r.completion for r in rows],
        tokenizer,
        chat=False,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
    )
    examples = [
        Example(p, c, r.label)
        for r, p, c in zip(rows, encoded["prompt_ids"], encoded["completion_ids"], strict=True)
        if c
    ]
    return examples, len(rows) - len(examples)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent(parent: int) -> None:
    """In a worker just forked from `parent`: die when it dies, even by SIGKILL, and leave its
    signals to it (Ctrl-C reaches every process of the terminal's group: only the parent
    reports it; its pool sends SIGTERM to stop a worker)."""
    if sys.platform == "linux":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


class _WorkerGuard:
    """Registered with multiprocess (the pools of datasets.map): each worker forked from this
    process runs `_die_with_parent` as it starts."""

    def __init__(self) -> None:
        self.pid = os.getpid()

    def __call__(self) -> None:
        _die_with_parent(self.pid)


_guards: dict[int, _WorkerGuard] = {}  # one per process; multiprocess keeps a weak reference


def bind_workers_to_this_process() -> None:
    """Make every multiprocess worker forked from now on (datasets.map with num_proc) die with
    this process: otherwise a run killed while preparing data leaves its workers running,
    hundreds of MB each, for as long as their shard takes, or for ever if they wait on it."""
    pid = os.getpid()
    if pid not in _guards:
        _guards[pid] = guard = _WorkerGuard()
        multiprocess.util.register_after_fork(guard, _WorkerGuard.__call__)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything about the tokenizer that changes token ids."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(
        backend.to_str().encode() if backend is not None else repr(tokenizer.get_vocab()).encode()
    )
    specials = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    digest.update(repr((specials, tokenizer.chat_template)).encode())
    return digest.hexdigest()


def _cached(rows: datasets.Dataset, fingerprint: str) -> bool:
    """Whether the whole tokenization is on disk: its one file, or every shard of a run with
    num_proc (a run stopped mid-way leaves some; datasets then makes only the missing ones)."""
    if not rows.cache_files:
        return False
    folder = Path(rows.cache_files[0]["filename"]).parent
    if (folder / f"cache-{fingerprint}.arrow").is_file():
        return True
    shards = [p.name for p in folder.glob(f"cache-{fingerprint}_*_of_*.arrow")]
    counts = {name.rsplit("_of_", 1)[1].removesuffix(".arrow") for name in shards}
    return any(sum(n.endswith(f"_of_{c}.arrow") for n in shards) == int(c) for c in counts)


def tokenize_dataset(
    rows: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    chat: bool,
    max_length: int,
    max_prompt_length: int,
    name: str,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, bool]:
    """Tokenize `{prompt, completion, label}` rows; returns (tokenized, read from cache).

    The result is cached beside the source's own cache files under a fingerprint of the rows,
    the tokenizer and the length settings, so a second run with the same inputs (every run of a
    sweep over beta, say) reads it back instead of tokenizing again.
    """
    check_lengths(max_length, max_prompt_length)
    bind_workers_to_this_process()
    key: tuple[Any, ...] = (rows._fingerprint, tokenizer_fingerprint(tokenizer), chat)
    key += (max_length, max_prompt_length, ENCODING_VERSION)
    fingerprint = hashlib.sha256(repr(key).encode()).hexdigest()[:32]
    cached = _cached(rows, fingerprint)

    def _encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        where = [f"{name}, row {i + 1}" for i in indices]
        out = encode(
            batch["prompt"],
            batch["completion"],
            tokenizer,
            chat,
            max_length,
            max_prompt_length,
            where,
        )
        out["label"] = batch["label"]
        return out

    ids, count = datasets.List(datasets.Value("int32")), datasets.Value("int64")
    features = datasets.Features(  # int32 ids: half the bytes to write, map and read
        prompt_ids=ids,
        completion_ids=ids,
        prompt_tokens=count,
        completion_tokens=count,
        label=rows.features["label"],
    )
    tokenized = rows.map(
        _encode,
        batched=True,
        with_indices=True,
        remove_columns=rows.column_names,
        features=features,
        new_fingerprint=fingerprint,
        num_proc=num_proc,
        desc=f"Tokenizing {name}",
    )
    return tokenized, cached
