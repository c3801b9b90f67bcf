"""How many positions a model can embed, and the check that refuses rows longer than that
(data.lengths.max_length against a learned position table or a rotary model's trained length).
"""

from __future__ import annotations

import logging

from torch import nn

from kto_lightning.errors import ConfigError

log = logging.getLogger(__name__)

# Names that models with learned absolute positions give their position table (GPT-2 and its
# kin: wpe; OPT, BART-style decoders: embed_positions; GPT-Neo and others: position_embeddings).
POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")


def learned_positions(model: nn.Module) -> int | None:
    """How many positions a model with a learned position table can embed; None for models with
    rotary or ALiBi positions (Llama, Mistral, Qwen, ...), which run past their trained length."""
    sizes = [
        module.num_embeddings
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES
    ]
    return min(sizes) if sizes else None


def rotary_positions(model: nn.Module) -> int | None:
    """How many positions a model without a learned position table was trained for: its config's
    `max_position_embeddings`, stretched by a rope scaling factor if it has one; None when the
    config does not say."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit < 1:
        return None
    scaling = getattr(config, "rope_scaling", None) or {}
    factor = scaling.get("factor") if isinstance(scaling, dict) else None
    if scaling.get("rope_type", "default") != "default" and isinstance(factor, int | float):
        original = scaling.get("original_max_position_embeddings") or limit
        limit = max(limit, int(original * factor))
    return limit


def check_context_window(
    model: nn.Module, max_length: int, key: str, longest: int | None = None
) -> None:
    """Refuse rows that do not fit the model's positions, naming `key` (data.lengths.max_length).

    A model with learned positions (GPT-2) fails with an IndexError at the first batch longer
    than its table: ConfigError when `max_length` exceeds it. A rotary model (Llama, Qwen, ...)
    runs past its `max_position_embeddings` without an error, on positions it never learned (a
    model=tiny of max_seq_len 256 given 512-token rows): ConfigError when the longest row the
    data holds (`longest`, prompt and completion, or its KL row) exceeds them; without
    `longest`, a warning when `max_length` admits such rows.
    """
    limit = learned_positions(model)
    if limit is not None and max_length > limit:
        raise ConfigError(
            f"{key}={max_length} is longer than the model's context window: it has learned "
            f"positions for {limit} tokens. Set {key}={limit} or less"
        )
    limit = rotary_positions(model) if limit is None else None
    if limit is None:
        return
    where = (
        f"the model's positions end at {limit} (max_position_embeddings in its config; "
        "model.max_seq_len for a model built from sizes, model=tiny or model=scratch)"
    )
    if longest is not None and longest > limit:
        raise ConfigError(
            f"the longest row holds {longest} tokens ({key}={max_length}), but {where}: its "
            f"tokens past {limit} would train on positions the model never learned. Set "
            f"{key}={limit} (rows are then cut to fit) or use a model with a longer context"
        )
    if longest is None and max_length > limit:
        log.warning(
            "%s=%d admits rows longer than the model's context window: %s; tokens past %d "
            "run on positions the model never learned. Set %s=%d or less",
            key, max_length, where, limit, key, limit,
        )  # fmt: skip
