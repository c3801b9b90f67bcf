"""Policy, reference and tokenizer construction.

A model config (`conf/model/*.yaml`) builds one of the sources below; each knows how to make a
tokenizer and a policy. The reference model starts as an exact frozen copy of the policy.

- `TinyLlama`: a Llama-architecture model initialised at random from a handful of sizes, with a
  byte-level tokenizer that needs no download (`byte_tokenizer.py`). The embedded default and
  the tests use it.
- `Pretrained`: a Hugging Face checkpoint, by hub name or local path (the same code path).
- `FromRun`: the policy an earlier run exported to `<run dir>/hf_model` (KTO after an SFT run).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kto_lightning.common.hub import looks_local, unavailable_reason
from kto_lightning.core.logprobs import CausalLM
from kto_lightning.errors import ConfigError, ModelLoadError
from kto_lightning.models.byte_tokenizer import BYTE_VOCAB_SIZE, byte_level_tokenizer

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSource(Protocol):
    """What a `model` config builds: a tokenizer and a trainable policy."""

    def load_tokenizer(self) -> PreTrainedTokenizerBase: ...

    def load_policy(self) -> CausalLM: ...


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Padding needs an id; reuse EOS when the tokenizer has none (attention masks hide it)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(
                "the tokenizer has neither a pad token nor an EOS token; set one on the tokenizer "
                "saved at model.tokenizer_name_or_path"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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


@dataclass
class Pretrained:
    """A Hugging Face causal LM, by hub name or by local directory (one code path for both).

    Args:
        name_or_path: a hub id such as "TinyLlama/TinyLlama-1.1B-Chat-v1.0", or a local folder
            written by `save_pretrained`.
        revision: hub branch, tag or commit.
        tokenizer_name_or_path: where the tokenizer lives, when not beside the weights.
        dtype: "float32", "bfloat16", "float16" or "auto" (the checkpoint's own).
        trust_remote_code: run modelling code shipped with the checkpoint. Off unless you trust it.
        attn_implementation: "sdpa", "eager", "flash_attention_2", or None for the default.
        lora: peft.LoraConfig arguments to train LoRA adapters only; None trains every weight.
        disable_dropout: set every dropout probability to 0 (see `disable_dropout`).
    """

    name_or_path: str
    revision: str | None = None
    tokenizer_name_or_path: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    lora: dict | None = None
    disable_dropout: bool = True

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ConfigError(
                f"model.dtype must be one of {[*_DTYPES, 'auto']}, got {self.dtype!r}"
            )

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        source = self.tokenizer_name_or_path or self.name_or_path
        _check_reachable(
            source,
            "model.tokenizer_name_or_path" if self.tokenizer_name_or_path else "model.name_or_path",
            needs="tokenizer",
        )
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                source, revision=self.revision, trust_remote_code=self.trust_remote_code
            )
        except (OSError, ValueError) as error:
            raise ModelLoadError(f"could not load the tokenizer from {source!r}: {error}") from None
        return ensure_pad_token(tokenizer)

    def load_policy(self) -> CausalLM:
        _check_reachable(self.name_or_path, "model.name_or_path")
        kwargs: dict = {
            "revision": self.revision,
            "trust_remote_code": self.trust_remote_code,
            "dtype": "auto" if self.dtype == "auto" else _DTYPES[self.dtype],
            "use_safetensors": True,
        }
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(self.name_or_path, **kwargs)
        except (OSError, ValueError) as error:
            raise ModelLoadError(
                f"could not load the model from model.name_or_path={self.name_or_path!r}: {error}"
            ) from None
        policy = apply_lora(model, self.lora)
        return disable_dropout(policy) if self.disable_dropout else policy


# Where a run writes its trained policy as a Hugging Face folder (lifecycle.HuggingFaceExport).
EXPORT_DIR = "hf_model"


@dataclass
class FromRun:
    """The policy an earlier run trained, from the Hugging Face folder it exported at its end.

    `model=from_run model.run_dir=RUN_DIR` is `model=local model.name_or_path=RUN_DIR/hf_model`
    with one key that names the run: the usual way to start KTO from an SFT run.

    Args:
        run_dir: the earlier run's directory (it holds `hf_model/`, `checkpoints/`, `csv/`).
        dtype, attn_implementation, lora, disable_dropout: as `Pretrained`'s.
    """

    run_dir: str
    dtype: str = "float32"
    attn_implementation: str | None = None
    lora: dict | None = None
    disable_dropout: bool = True

    def __post_init__(self) -> None:
        folder = Path(self.run_dir).expanduser() / EXPORT_DIR
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"model.run_dir={self.run_dir!r} holds no exported model ({folder}/config.json): "
                "point model.run_dir at the directory of a finished run (with export.enabled=true "
                "and export.merge_lora=true it writes hf_model/ at the end of training), or "
                f"export one with: python -m kto_lightning.export CKPT {folder}"
            )
        # Our own export: no remote code, the tokenizer beside the weights.
        self._pretrained = Pretrained(
            str(folder),
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            lora=self.lora,
            disable_dropout=self.disable_dropout,
        )

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        return self._pretrained.load_tokenizer()

    def load_policy(self) -> CausalLM:
        return self._pretrained.load_policy()


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


def apply_lora(model: PreTrainedModel, lora: dict | None) -> CausalLM:
    """Wrap `model` with LoRA adapters (peft) when `lora` is set; only the adapters then train.

    `lora` holds peft.LoraConfig arguments, e.g. {r: 16, lora_alpha: 32, lora_dropout: 0.0,
    target_modules: all-linear}. The adapters start at zero, so the wrapped model computes exactly
    what the base model does until it trains.
    """
    if not lora:
        return model
    from peft import LoraConfig, get_peft_model

    settings = OmegaConf.to_container(lora) if isinstance(lora, DictConfig) else dict(lora)
    settings.setdefault("task_type", "CAUSAL_LM")
    try:
        config = LoraConfig(**settings)
    except TypeError as error:
        raise ConfigError(f"model.lora: {error}") from None
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # e.g. target modules that the model does not have
        raise ConfigError(f"model.lora: {error}") from None


_DROPOUT_MODULES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def disable_dropout(model: CausalLM) -> CausalLM:
    """Set every dropout probability in `model` to 0, in place (TRL's `disable_dropout=True`).

    The policy trains in train mode and the reference runs in eval mode; with dropout the two
    differ at step 0 although their weights are equal, so rewards and the KL estimate start as
    noise. Zeroed here: every torch dropout module (peft's `lora_dropout` included) and every
    number named like a dropout on a module or a config. Hugging Face attention reads such a float
    in forward instead of owning a module, e.g. Llama's `dropout=0.0 if not self.training else
    self.attention_dropout`, copied from `config.attention_dropout`.
    """
    configs: dict[int, PretrainedConfig] = {}
    for module in model.modules():
        if isinstance(module, _DROPOUT_MODULES):
            module.p = 0.0
        _zero_dropout_attributes(module)
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            configs[id(config)] = config
    while configs:  # the model's config(s) and their sub-configs (e.g. a text_config)
        config = configs.popitem()[1]
        _zero_dropout_attributes(config)
        for value in vars(config).values():
            if isinstance(value, PretrainedConfig):
                configs[id(value)] = value
    return model


def _zero_dropout_attributes(owner: object) -> None:
    """Set the numbers named `*dropout*` or `*pdrop` (GPT-2's `attn_pdrop`) of `owner` to 0."""
    for name, value in list(vars(owner).items()):
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if is_number and ("dropout" in name or name.endswith("pdrop")):
            setattr(owner, name, 0.0)


def make_reference(policy: CausalLM, autocast_dtype: torch.dtype | None = None) -> CausalLM:
    """The frozen reference: an exact copy of the policy as it is before training.

    `autocast_dtype`: the dtype mixed precision computes in (bf16-mixed: bfloat16), if any. The
    copy's linear layers then hold their weights in it (`hold_linear_weights_in`): at about half
    the memory, and computing exactly what the policy's fp32 weights compute under autocast.
    """
    reference = copy.deepcopy(policy)
    reference.eval()
    reference.requires_grad_(False)
    if autocast_dtype is not None:
        hold_linear_weights_in(reference, autocast_dtype)
    return reference


def hold_linear_weights_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast the weights and biases of `model`'s linear layers to `dtype`, in place; returns the
    bytes saved.

    Under autocast to `dtype`, a linear layer casts its float32 weight to `dtype` at every call
    (one copy of the weights per forward) and multiplies in `dtype`; holding the weight in `dtype`
    already skips that cast, and the product is bit for bit the same, since the cast rounds the
    same way once or every time. Embeddings, norms and anything tied to an embedding keep their
    dtype, so the residual stream stays float32 as autocast runs it: a frozen model so held
    scores exactly what its float32 original scores under autocast.
    """
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    saved = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or id(module.weight) in tied:
            continue
        for name in ("weight", "bias"):
            tensor = getattr(module, name)
            if tensor is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                saved += tensor.numel() * (tensor.element_size() - dtype.itemsize)
                tensor.data = tensor.data.to(dtype)
    return saved


# What a folder holds when `save_pretrained` wrote a tokenizer into it (any one suffices).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
    "spiece.model", "sentencepiece.bpe.model",
)  # fmt: skip
TOKENIZER_GLOBS = ("tokenizer*", "vocab*", "merges.txt", "*.model", "*.tiktoken")


def _check_folder(folder: Path, key: str, needs: str) -> None:
    """ModelLoadError naming `key` when a local folder lacks what `needs` ("model" or
    "tokenizer") is read from: transformers would guess at another cause (for a folder without
    tokenizer files, a missing sentencepiece package)."""
    if not folder.is_dir():
        raise ModelLoadError(
            f"{key}={str(folder)!r} is a file; point {key} at a folder written by "
            "save_pretrained (config.json, weights, tokenizer files), or at a hub id"
        )
    has_model = (folder / "config.json").is_file()
    # Lenient: any file a tokenizer may be read from (remote-code ones name theirs freely).
    has_tokenizer = any(
        path.is_file() for pattern in TOKENIZER_GLOBS for path in folder.glob(pattern)
    )
    if has_model if needs == "model" else has_tokenizer:
        return
    if not has_model and not has_tokenizer:
        inner = folder / EXPORT_DIR
        hint = (
            f"; it looks like a run directory: use model=from_run model.run_dir={folder}, or "
            f"{key}={inner}"
            if (inner / "config.json").is_file()
            else ""
        )
        raise ModelLoadError(
            f"{key}={str(folder)!r} is not a model folder: it holds neither a config.json nor "
            f"tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...). Point {key} at a folder "
            f"written by save_pretrained, or at a hub id{hint}"
        )
    if needs == "tokenizer":
        raise ModelLoadError(
            f"{key}={str(folder)!r} holds a model (config.json) but no tokenizer files "
            f"({', '.join(TOKENIZER_FILES[:2])}, ...); set model.tokenizer_name_or_path to the "
            "folder or hub id of its tokenizer, or save the tokenizer into the folder"
        )
    raise ModelLoadError(
        f"{key}={str(folder)!r} holds tokenizer files but no model (no config.json); point {key} "
        "at the folder save_pretrained wrote the model into"
    )


def _check_reachable(name_or_path: str, key: str, needs: str = "model") -> None:
    """Fail at once, in one sentence, when a hub name is neither local, cached nor reachable, or
    a local folder lacks what `needs` ("model" or "tokenizer") is read from."""
    if Path(name_or_path).expanduser().exists():
        _check_folder(Path(name_or_path).expanduser(), key, needs)
        return
    if looks_local(name_or_path):
        raise ModelLoadError(
            f"{key}={name_or_path!r}: no such folder. Point {key} at a folder written by "
            "save_pretrained, or at a Hugging Face hub id such as 'org/name'."
        )
    if _is_cached(name_or_path):
        return
    reason = unavailable_reason()
    if reason is None:
        return
    raise ModelLoadError(
        f"{key}={name_or_path!r} is not a local folder, it is not in the Hugging Face cache, and "
        f"{reason}. Download it where there is network (`hf download {name_or_path}`) and point "
        f"{key} at the folder, or copy the cache (HF_HOME) to this machine."
    )


def _is_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # a malformed id is "not cached"; the load itself reports it properly
        return False
    return isinstance(found, str)
