"""`TinyLlama`: a Llama of a few layers initialised at random from a handful of sizes, with the
byte-level tokenizer (`byte_tokenizer.py`): a model that needs no download, for the embedded
default, the examples and the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from kto_lightning.core.logprobs import CausalLM
from kto_lightning.errors import ConfigError
from kto_lightning.models.adapting import apply_lora, disable_dropout
from kto_lightning.models.byte_tokenizer import BYTE_VOCAB_SIZE, byte_level_tokenizer


@dataclass
class TinyLlama:
    """A randomly initialised Llama of a few layers, with the byte-level tokenizer.

    Args:
        vocab_size: embedding rows; at least 259 (the byte tokenizer's size).
        hidden_size: width of the residual stream.
        num_layers: decoder layers.
        num_heads: attention heads (hidden_size must divide evenly).
        dropout: attention dropout probability; it only acts with disable_dropout=false.
        max_seq_len: largest position the model supports.
        intermediate_size: MLP width; None means 4 x hidden_size.
        lora: peft.LoraConfig arguments to train LoRA adapters only; None trains every weight.
        disable_dropout: set every dropout probability to 0 (see `disable_dropout`).
    """

    vocab_size: int = BYTE_VOCAB_SIZE
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    dropout: float = 0.0
    max_seq_len: int = 256
    intermediate_size: int | None = None
    lora: dict | None = None
    disable_dropout: bool = True

    def __post_init__(self) -> None:
        if self.vocab_size < BYTE_VOCAB_SIZE:
            raise ConfigError(
                f"model.vocab_size must be at least {BYTE_VOCAB_SIZE} (the byte-level "
                f"tokenizer's size), got {self.vocab_size}"
            )
        for key in ("hidden_size", "num_layers", "num_heads", "max_seq_len"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ConfigError(
                f"model.intermediate_size must be >= 1 or null, got {self.intermediate_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_heads ({self.num_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")

    def config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size or 4 * self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            max_position_embeddings=self.max_seq_len,
            attention_dropout=self.dropout,
            tie_word_embeddings=False,
            bos_token_id=256,  # the byte-level tokenizer's special tokens
            eos_token_id=257,
            pad_token_id=258,
        )

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        return byte_level_tokenizer()

    def load_policy(self) -> CausalLM:
        # Random init follows the global seed, which train.py sets before calling this.
        policy = apply_lora(LlamaForCausalLM(self.config()), self.lora)
        return disable_dropout(policy) if self.disable_dropout else policy
