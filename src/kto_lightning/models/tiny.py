"""`TinyLlama`: a Llama of a few layers from a handful of sizes, with the byte-level tokenizer
(`byte_tokenizer.py`): a model that needs no download, for the embedded default, the examples and
the tests.

Its weights are a random init, or a safetensors file: `model.weights=bundled` is the one the
package ships (`weights/tiny_toy.safetensors`, the embedded default), the toy task's SFT model,
which speaks the task's language and mostly answers dismissively, so that generations before and
after KTO are readable and show the change. A
random init scores the toy task as well but only ever writes "are are are ..."; `make
tiny-weights` retrains the file (scripts/tiny_weights.py).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from kto_lightning.core.logprobs import CausalLM
from kto_lightning.errors import ConfigError
from kto_lightning.models.adapting import apply_lora, disable_dropout
from kto_lightning.models.byte_tokenizer import BYTE_VOCAB_SIZE, byte_level_tokenizer

# `model.weights` naming the file the package ships.
BUNDLED = "bundled"
BUNDLED_WEIGHTS = Path(__file__).parent / "weights" / "tiny_toy.safetensors"


def weights_digest(path: Path) -> str:
    """SHA-256 of a safetensors file's content: its metadata and each tensor's name, dtype,
    shape and bytes, in name order. Two files of the same content get the same digest even where
    their bytes differ: safetensors writes the metadata keys in an arbitrary order."""
    digest = hashlib.sha256()
    with safe_open(path, framework="pt") as file:
        digest.update(json.dumps(file.metadata() or {}, sort_keys=True).encode())
        for name in sorted(file.keys()):
            tensor = file.get_tensor(name).contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class TinyLlama:
    """A Llama of a few layers, with the byte-level tokenizer; random or from a weights file.

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
        weights: "bundled" (the toy task's SFT model the package ships, at conf/model/tiny.yaml's
            sizes), a .safetensors file of this model's state dict, or None: a random init
            from the global seed.
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
    weights: str | None = None

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
        if self.weights is not None and not self.weights_path().is_file():
            raise ConfigError(
                f"model.weights={self.weights}: no such file; name a .safetensors file, "
                f"{BUNDLED} (the package's toy model), or null for a random init"
            )

    def weights_path(self) -> Path:
        """The weights file `model.weights` names (call only when it names one)."""
        assert self.weights is not None
        return BUNDLED_WEIGHTS if self.weights == BUNDLED else Path(self.weights).expanduser()

    def sizes(self) -> dict[str, int]:
        """The sizes that shape the weights; a weights file records them in its metadata
        (scripts/tiny_weights.py), so that a mismatch names the key to set, not a tensor."""
        config = self.config()
        return {
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden_size,
            "num_layers": config.num_hidden_layers,
            "num_heads": config.num_attention_heads,
            "intermediate_size": config.intermediate_size,
        }

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
        # Random init follows the global seed, which train.py sets before calling this; a
        # weights file then replaces every tensor (the draw stays, so later draws do not move).
        model = LlamaForCausalLM(self.config())
        if self.weights is not None:
            model.load_state_dict(self._checked_state(model))
        policy = apply_lora(model, self.lora)
        return disable_dropout(policy) if self.disable_dropout else policy

    def _checked_state(self, model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
        """The weights file's tensors; ConfigError unless they are `model`'s, shape for shape."""
        path = self.weights_path()
        try:
            with safe_open(path, framework="pt") as file:
                recorded = file.metadata() or {}
                # keys(): a safe_open handle is not iterable.
                state = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
        except (SafetensorError, OSError) as err:
            raise ConfigError(
                f"model.weights={self.weights}: {path} is not a readable safetensors file ({err})"
            ) from err
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        found = {name: tuple(t.shape) for name, t in state.items()}
        if found != expected:
            raise ConfigError(
                f"model.weights={self.weights}: {path} holds another model "
                f"({self._difference(recorded, found, expected)}); set model.weights=null for a "
                "random init at these sizes, or the sizes the file was trained at"
            )
        return state

    def _difference(
        self, recorded: dict[str, str], found: dict[str, tuple], expected: dict[str, tuple]
    ) -> str:
        """What differs: the sizes, where the file records them, else the first tensor."""
        sizes = [
            f"model.{key}={recorded[key]} there, {value} here"
            for key, value in self.sizes().items()
            if key in recorded and recorded[key] != str(value)
        ]
        if sizes:
            return ", ".join(sizes)
        for name in sorted(found.keys() | expected.keys()):
            if found.get(name) != expected.get(name):
                return f"tensor {name}: {found.get(name)} there, {expected.get(name)} here"
        return "the same tensors"  # unreachable: found != expected
