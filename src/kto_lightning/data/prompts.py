"""Prompts to generate from: read from the command line or a file, rendered as training renders
them (`data/formats.py`, `data/tokenize.py`), so that a model sees at generation what it saw in
training.

- A conversation (a list of `{role, content}` messages) goes through the tokenizer's chat template
  with the generation prompt (the assistant header); the template supplies any BOS.
- A text prompt becomes one user turn of the same template when the tokenizer has one, as a text
  prompt column of chat data does in training; with `chat_template=False` it is BOS + its tokens,
  as training encodes a text row's prompt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

from transformers import PreTrainedTokenizerBase

from kto_lightning.errors import DataError

# A prompt as a user writes it: text, or a conversation of {role, content} messages.
Prompt = str | list[dict[str, str]]


def checked_prompt(value: Any, where: str) -> Prompt:
    """`value` as a prompt: non-empty text, or a conversation that training would accept."""
    if isinstance(value, list):
        # The check training applies to a conversation. Imported here: kto_lightning.data
        # imports its data module, and with it Lightning, seconds that text prompts need not wait.
        from kto_lightning.data.formats import _messages

        return _messages(value, where)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: empty or not text ({value!r})")
    return value


def read_prompts(path: Path) -> list[tuple[Prompt, str]]:
    """(prompt, where it is) of each prompt of a .jsonl file (a `prompt` field: text or a
    conversation) or a .txt file (one per line); blank lines are skipped. Errors name the file
    and the line."""
    if not path.is_file():
        raise DataError(f"prompts=: no such file {str(path)!r}")
    if path.suffix not in (".jsonl", ".txt"):
        raise DataError(
            f'prompts={str(path)!r}: expected a .jsonl file (one {{"prompt": ...}} per line) '
            "or a .txt file (one prompt per line)"
        )
    prompts: list[tuple[Prompt, str]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        where = f"{path}, line {number}"
        if not line.strip():
            continue
        if path.suffix == ".txt":
            prompts.append((line, where))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(record, dict) or "prompt" not in record:
            raise DataError(f'{where}: expected an object with a "prompt" field, got {line[:80]}')
        prompts.append((checked_prompt(record["prompt"], f"{where}, field 'prompt'"), where))
    if not prompts:
        raise DataError(f"prompts={str(path)!r} holds no prompts")
    return prompts


def gather_prompts(texts: list[str] | None, path: Path | None) -> list[tuple[Prompt, str]]:
    """(prompt, where it is) of the `prompt=` texts, then of the `prompts=` file's prompts."""
    prompts: list[tuple[Prompt, str]] = []
    for number, text in enumerate(texts or [], start=1):
        where = f"prompt number {number}"
        prompts.append((checked_prompt(text, where), where))
    if path is not None:
        prompts += read_prompts(path)
    if not prompts:
        raise DataError("no prompts: give prompt=TEXT (or prompt=[a,b]) or prompts=FILE")
    return prompts


def prompt_ids(
    prompt: Prompt, tokenizer: PreTrainedTokenizerBase, chat_template: bool, where: str
) -> list[int]:
    """The token ids a prompt has in training, ready for the answer (see the module docstring)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, list) and not has_template:
        raise DataError(f"{where}: a conversation, but the tokenizer has no chat template")
    if isinstance(prompt, list) or (chat_template and has_template):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(cast(str, text), add_special_tokens=False)["input_ids"])
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
