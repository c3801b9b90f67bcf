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

# Random draws per example before assign_kl_partners lists the eligible partners explicitly.
_DRAWS = 64


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
    if not rows:  # a fast tokenizer fails on an empty batch
        return [], 0
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

    The partner completion is cut to fit beside the example's own prompt, and is drawn at random
    (seeded) among the completions that still differ from the example's own after that cut, so an
    example is never paired with its own completion, whatever the sampler or batch size later.
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
        # Compare the partner completion as it will be used, cut to fit beside this prompt: two
        # completions that differ only past the cut would otherwise give a copy of the row itself.
        room = max_length - len(example.prompt_ids)
        own = example.completion_ids[:room]
        partner = None
        for _ in range(_DRAWS):  # rejection sampling: quick unless most completions equal this one
            candidate = examples[rng.randrange(n)].completion_ids[:room]
            if candidate != own:
                partner = candidate
                break
        if partner is None:
            others = [c for e in examples if (c := e.completion_ids[:room]) != own]
            if not others:
                raise DataError(
                    f"example {i}: every completion cut to the {room} token(s) left beside its "
                    "prompt equals its own, so it has no unrelated completion for the KL "
                    "estimate; raise data.max_length or lower data.max_prompt_length"
                )
            partner = rng.choice(others)
        paired.append(Example(example.prompt_ids, example.completion_ids, example.label, partner))
    return paired
