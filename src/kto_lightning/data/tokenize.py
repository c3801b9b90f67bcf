"""Tokenization, truncation and KL pairing.

Prompt and completion are tokenized separately so the completion mask is exact:
    prompt ids     = [BOS] + tokens(prompt)          (BOS only if the tokenizer has one)
    completion ids = tokens(completion) + [EOS]
Truncation, in this order:
    1. the prompt keeps its last `max_prompt_length` tokens (BOS stays in front): the end of a
       prompt, nearest the answer, matters most;
    2. the completion keeps its first `max_length - len(prompt)` tokens.
A row whose completion would be empty after that is dropped and counted.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from kto_lightning.data.rows import Row
from kto_lightning.errors import ConfigError, DataError


@dataclass(frozen=True)
class Example:
    """One tokenized row and the completion of its KL partner (an unrelated row)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    kl_completion_ids: list[int] = field(default_factory=list)


def check_lengths(max_length: int, max_prompt_length: int) -> None:
    if max_length < 2:
        raise ConfigError(f"data.max_length must be >= 2, got {max_length}")
    if not 1 <= max_prompt_length < max_length:
        raise ConfigError(
            f"data.max_prompt_length must be >= 1 and below data.max_length ({max_length}), "
            f"got {max_prompt_length}"
        )


def tokenize_rows(
    rows: Sequence[Row],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int,
) -> tuple[list[Example], int]:
    """Tokenize and truncate; returns the kept examples and how many rows were dropped."""
    check_lengths(max_length, max_prompt_length)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompts = tokenizer([r.prompt for r in rows], add_special_tokens=False)["input_ids"]
    completions = tokenizer([r.completion for r in rows], add_special_tokens=False)["input_ids"]
    examples, dropped = [], 0
    for row, prompt, completion in zip(rows, prompts, completions, strict=True):
        keep = max_prompt_length - len(bos)
        prompt_ids = bos + prompt[len(prompt) - keep :] if len(prompt) > keep else bos + prompt
        completion_ids = (completion + eos)[: max_length - len(prompt_ids)]
        if not completion_ids:
            dropped += 1
            continue
        examples.append(Example(prompt_ids, completion_ids, row.label))
    return examples, dropped


def assign_kl_partners(examples: Sequence[Example], max_length: int, seed: int) -> list[Example]:
    """Give every example the completion of another example whose completion differs from its own.

    The partner is drawn at random (seeded) among examples with a different completion, so an
    example is never paired with its own completion, whatever the sampler or batch size later.
    The partner completion is cut to fit beside the example's own prompt.
    """
    if len(examples) < 2:
        raise DataError(
            f"the KL estimate needs at least 2 examples with different completions; got "
            f"{len(examples)} example(s)"
        )
    keys = [tuple(e.completion_ids) for e in examples]
    if len(set(keys)) < 2:
        raise DataError(
            "every example has the same completion, so no example can be paired with an "
            "unrelated completion for the KL estimate"
        )
    rng = random.Random(seed)
    n = len(examples)
    paired = []
    for i, example in enumerate(examples):
        j = rng.randrange(n)
        while keys[j] == keys[i]:  # terminates: at least one other completion exists
            j = rng.randrange(n)
        room = max_length - len(example.prompt_ids)
        paired.append(
            Example(
                example.prompt_ids,
                example.completion_ids,
                example.label,
                examples[j].completion_ids[:room],
            )
        )
    return paired
