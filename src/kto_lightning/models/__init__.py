"""Policy, reference and tokenizer construction.

A model config (`conf/model/*.yaml`) builds one of the sources below; each knows how to make a
tokenizer and a policy. The reference model starts as an exact frozen copy of the policy.

- `TinyLlama` (`tiny.py`): a Llama-architecture model initialised at random from a handful of
  sizes, with a byte-level tokenizer that needs no download (`byte_tokenizer.py`). The embedded
  default and the tests use it.
- `Pretrained` (`loading.py`): a Hugging Face checkpoint, by hub name or local path (the same
  code path).
- `FromRun` (`loading.py`): the policy an earlier run exported to `<run dir>/hf_model` (KTO after
  an SFT run).

What is done to a loaded policy (LoRA, dropout, the reference copy) is in `adapting.py`; the
context-window check in `context.py`. The names are re-exported here: configs name them as
`kto_lightning.models.<Name>`.
"""

from kto_lightning.models.adapting import (
    apply_lora,
    disable_dropout,
    hold_linear_weights_in,
    make_reference,
)
from kto_lightning.models.context import (
    POSITION_TABLES,
    check_context_window,
    learned_positions,
    rotary_positions,
)
from kto_lightning.models.loading import (
    EXPORT_DIR,
    TOKENIZER_FILES,
    TOKENIZER_GLOBS,
    FromRun,
    ModelSource,
    Pretrained,
    ensure_pad_token,
)
from kto_lightning.models.tiny import TinyLlama

__all__ = [
    "EXPORT_DIR",
    "POSITION_TABLES",
    "TOKENIZER_FILES",
    "TOKENIZER_GLOBS",
    "FromRun",
    "ModelSource",
    "Pretrained",
    "TinyLlama",
    "apply_lora",
    "check_context_window",
    "disable_dropout",
    "ensure_pad_token",
    "hold_linear_weights_in",
    "learned_positions",
    "make_reference",
    "rotary_positions",
]
