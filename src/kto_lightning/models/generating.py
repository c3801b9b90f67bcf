"""The generation config one `generate` call runs with: the model's own, with the call's
settings on top. One rule for the `generate` command (cli/sampling.py) and online KTO's sampler
(online/sampler.py)."""

from __future__ import annotations

import copy
from collections.abc import Iterable

from transformers import GenerationConfig

from kto_lightning.core.logprobs import CausalLM


def generation_config(
    model: CausalLM,
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    num_return_sequences: int,
    pad_token_id: int | None,
    stop_ids: Iterable[int | None],
) -> GenerationConfig:
    """The model's own generation config (e.g. a repetition penalty it ships) with these
    settings. Generation stops at the model's own end-of-sequence ids and at `stop_ids` (a chat
    model may end its turn with a token other than the tokenizer's EOS: both are kept).

    `temperature` 0 is greedy, and the sampling settings are then unset (transformers warns about
    settings it will not use); `top_k` 0 turns top-k off.
    """
    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    eos = config.eos_token_id
    stops = {*(eos if isinstance(eos, list) else [eos]), *stop_ids} - {None}
    sample = temperature > 0
    config.update(
        max_new_tokens=max_new_tokens,
        do_sample=sample,
        num_return_sequences=num_return_sequences,
        temperature=temperature if sample else None,
        top_p=top_p if sample else None,
        top_k=top_k if sample else None,  # None would mean 50
        pad_token_id=pad_token_id,
        eos_token_id=sorted(stops) or None,
    )
    return config
