"""Models read from files: `Pretrained` (a Hugging Face checkpoint, by hub name or local folder)
and `FromRun` (the policy an earlier run exported to `<run dir>/hf_model`), with the checks that
say in one sentence why a folder or hub name cannot be loaded, before transformers guesses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from kto_lightning.common.hub import looks_local, unavailable_reason
from kto_lightning.core.logprobs import CausalLM
from kto_lightning.errors import ConfigError, ModelLoadError
from kto_lightning.models.adapting import apply_lora, disable_dropout
from kto_lightning.models.quantizing import (
    Quantization,
    cannot_quantize,
    loading_kwargs,
    parse_quantization,
    prepare_for_training,
    require_bitsandbytes,
)

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
        quantization: load the weights in 4 or 8 bits through bitsandbytes (QLoRA, with `lora`):
            None, a preset ("nf4", "fp4", "int8") or a mapping of `Quantization`'s keys.
    """

    name_or_path: str
    revision: str | None = None
    tokenizer_name_or_path: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    lora: dict | None = None
    disable_dropout: bool = True
    quantization: dict | str | None = None

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ConfigError(
                f"model.dtype must be one of {[*_DTYPES, 'auto']}, got {self.dtype!r}"
            )
        # Checked here, when the config is built: before any data or weights are read.
        self._quantized: Quantization | None = parse_quantization(self.quantization)
        if self._quantized is not None:
            require_bitsandbytes(self.quantization)

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        source = self.tokenizer_name_or_path or self.name_or_path
        check_reachable(
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
        check_reachable(self.name_or_path, "model.name_or_path")
        kwargs: dict = {
            "revision": self.revision,
            "trust_remote_code": self.trust_remote_code,
            "dtype": "auto" if self.dtype == "auto" else _DTYPES[self.dtype],
            "use_safetensors": True,
        }
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        if self._quantized is not None:
            kwargs |= loading_kwargs(self._quantized)
        try:
            model = AutoModelForCausalLM.from_pretrained(self.name_or_path, **kwargs)
        except (OSError, ValueError) as error:
            raise ModelLoadError(
                f"could not load the model from model.name_or_path={self.name_or_path!r}: {error}"
            ) from None
        except (ImportError, RuntimeError, NotImplementedError) as error:
            # bitsandbytes without a backend for this device; out of memory is not that.
            if self._quantized is None or isinstance(error, torch.OutOfMemoryError):
                raise
            raise cannot_quantize(self._quantized, error) from None
        if self._quantized is not None and self.lora:
            # A quantized base for training (inference, e.g. `generate compare=true`, needs none).
            model = prepare_for_training(model)
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
        dtype, attn_implementation, lora, disable_dropout, quantization: as `Pretrained`'s.
    """

    run_dir: str
    dtype: str = "float32"
    attn_implementation: str | None = None
    lora: dict | None = None
    disable_dropout: bool = True
    quantization: dict | str | None = None

    def __post_init__(self) -> None:
        folder = Path(self.run_dir).expanduser() / EXPORT_DIR
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"model.run_dir={self.run_dir!r} holds no exported model ({folder}/config.json): "
                "point model.run_dir at the directory of a finished run (with export.enabled=true "
                "and export.merge_lora=true it writes hf_model/ at the end of training), or "
                f"export one with: python -m kto_lightning.export ckpt_path=CKPT out={folder}"
            )
        # Our own export: no remote code, the tokenizer beside the weights.
        self._pretrained = Pretrained(
            str(folder),
            dtype=self.dtype,
            attn_implementation=self.attn_implementation,
            lora=self.lora,
            disable_dropout=self.disable_dropout,
            quantization=self.quantization,
        )

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        return self._pretrained.load_tokenizer()

    def load_policy(self) -> CausalLM:
        return self._pretrained.load_policy()


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


def check_reachable(name_or_path: str, key: str, needs: str = "model") -> None:
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
