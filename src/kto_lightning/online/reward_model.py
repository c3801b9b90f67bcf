"""`RewardModel`: a sequence-classification model (a trained reward model) as a reward function.

It reads a Hugging Face checkpoint by hub name or local folder, through the same reachability
checks as the policy's loading (`models/loading.py`): a folder that is missing or holds no model,
or a hub name that is neither cached nor reachable (HF_HUB_OFFLINE), is a ModelLoadError saying
where it looked, before transformers is asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kto_lightning.errors import ConfigError, ModelLoadError
from kto_lightning.models.loading import check_reachable, ensure_pad_token

KEY = "reward.name_or_path"  # how errors name where the reward model is read from


def _torch_dtype(name: str | None) -> torch.dtype | None:
    """The floating-point torch dtype called `name` ("bfloat16", "float32", ...), None for None."""
    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(
            f"reward.dtype must name a floating-point torch dtype such as 'float32' or "
            f"'bfloat16', or be null (the model's own), got {name!r}"
        )
    return dtype


@dataclass
class RewardModel:
    """A reward model: a sequence classifier that scores prompt + completion.

    The text scored is the conversation [user: prompt, assistant: completion] rendered by the
    tokenizer's chat template when it has one (the template writes its own special tokens),
    else `prompt + completion` as they are, with the special tokens the tokenizer adds. A text
    longer than `max_length` tokens loses its start: the completion's end is what is judged.
    The score is the single logit of a 1-label model, or logit[1] - logit[0] of a 2-label one
    (the log-odds of "good").

    The model loads at the first call, so that a config builds without loading it; it then stays
    on `device` in eval mode, and scores under `torch.no_grad()`, `batch_size` texts at a time.

    Args:
        name_or_path: a hub id or a local folder written by `save_pretrained` (model and
            tokenizer).
        batch_size: texts per forward pass.
        max_length: tokens kept of each text.
        dtype: the torch dtype to compute in ("bfloat16", "float32", ...); None keeps the
            checkpoint's own.
        device: where the model runs ("cuda:0", a torch.device); None is the CPU.
    """

    name_or_path: str
    batch_size: int = 16
    max_length: int = 1024
    dtype: str | None = None
    device: str | torch.device | None = None

    def __post_init__(self) -> None:
        for key in ("batch_size", "max_length"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"reward.{key} must be an integer >= 1, got {value!r}")
        self._dtype = _torch_dtype(self.dtype)
        self._loaded: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None

    def __call__(
        self, prompts: list[str], completions: list[str], rows: list[dict[str, Any]]
    ) -> list[float]:
        model, tokenizer = self._load()
        texts = [_text(tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
        batches = [texts[i : i + self.batch_size] for i in range(0, len(texts), self.batch_size)]
        scores = [self._score(model, tokenizer, batch) for batch in batches]
        # One copy to the host for the whole call, not one a batch.
        return torch.cat(scores).tolist() if scores else []

    @torch.no_grad()
    def _score(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: list[str]
    ) -> torch.Tensor:
        """Scores of `texts`, float32 on the model's device: [len(texts)]."""
        encoded = tokenizer(
            texts,
            add_special_tokens=not tokenizer.chat_template,
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        ).to(model.device)
        logits = model(**encoded).logits.float()  # [batch, num_labels]
        return logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]

    def _load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        if self._loaded is None:
            self._loaded = self._read()
        return self._loaded

    def _read(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        check_reachable(self.name_or_path, KEY)
        check_reachable(self.name_or_path, KEY, needs="tokenizer")
        try:
            read_tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
            model = AutoModelForSequenceClassification.from_pretrained(
                self.name_or_path, dtype=self._dtype or "auto", use_safetensors=True
            )
        except (OSError, ValueError) as error:
            raise ModelLoadError(
                f"could not load the reward model from {KEY}={self.name_or_path!r}: {error}"
            ) from None
        num_labels = model.config.num_labels
        if num_labels not in (1, 2):
            raise ConfigError(
                f"{KEY}={self.name_or_path!r} is a classifier with num_labels={num_labels}; a "
                "reward model has 1 label (the score) or 2 (the score is logit[1] - logit[0])"
            )
        tokenizer = ensure_pad_token(read_tokenizer)
        # Right padding keeps each text's positions as they are alone; the cut keeps the end.
        tokenizer.padding_side, tokenizer.truncation_side = "right", "left"
        # The classifier scores each row at its last token that is not padding, which it tells by
        # the config's pad id: that must be the id the tokenizer pads with.
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        model.eval().requires_grad_(False)
        return cast(PreTrainedModel, model.to(torch.device(self.device or "cpu"))), tokenizer


def _text(tokenizer: PreTrainedTokenizerBase, prompt: str, completion: str) -> str:
    """What the reward model reads for one completion (see `RewardModel`)."""
    if not tokenizer.chat_template:
        return prompt + completion
    conversation = [
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": completion},
    ]
    return cast(str, tokenizer.apply_chat_template(conversation, tokenize=False))
