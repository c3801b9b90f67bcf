"""How generate samples: the settings of one `generate` call, checked, as the model's own
generation config with the tokenizer's pad and end-of-sequence ids."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import GenerationConfig, PreTrainedTokenizerBase

from kto_lightning.core.logprobs import CausalLM
from kto_lightning.errors import ConfigError
from kto_lightning.models.generating import generation_config


@dataclass(frozen=True)
class Sampling:
    """How to generate; each field is the command-line key of the same name."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    num_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.num_samples > 1 and self.temperature == 0:
            raise ConfigError(
                f"num_samples={self.num_samples} with temperature=0 would repeat one greedy "
                "completion; set temperature above 0 to sample"
            )

    def generation_config(
        self, model: CausalLM, tokenizer: PreTrainedTokenizerBase
    ) -> GenerationConfig:
        """The model's own generation config with these settings and the tokenizer's pad and
        end-of-sequence ids (`kto_lightning.models.generating.generation_config`)."""
        return generation_config(
            model,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            num_return_sequences=self.num_samples,
            pad_token_id=tokenizer.pad_token_id,
            stop_ids=[tokenizer.eos_token_id],
        )
