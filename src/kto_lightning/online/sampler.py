"""The sampler: k completions of each prompt, drawn from the policy as it is at a step.

One interface (`Sampler`), so that a faster backend can stand beside the Hugging Face one
(`HFSampler`, `generate` with the KV cache). Each prompt comes with its own seed, and its k
completions depend only on (model, its token ids, its seed, the settings): not on the other
prompts of the batch, their order, or any global random stream (none is read or moved). So a
resumed run draws again what the interrupted one drew, and two ranks that each sample half of a
batch draw what one process sampling all of it draws.

The noise is counter-based (online/noise.py): a hash of (row key, step, token id), added to the
warped scores, and `generate` then takes the argmax (the Gumbel-max trick), which is a draw from
softmax(scores).

Completions end as training data ends one (data/tokenize.py): with the stop token that ended
them (a text row's EOS, a chat turn's end-of-turn marker), or cut short without one when they
reach `max_new_tokens`.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from kto_lightning.common.compile_stance import eager
from kto_lightning.core.logprobs import CausalLM, eval_mode
from kto_lightning.data.collate import left_padded
from kto_lightning.errors import ConfigError
from kto_lightning.models.context import learned_positions
from kto_lightning.models.generating import generation_config
from kto_lightning.online.noise import GumbelNoise, row_keys


@dataclass(frozen=True)
class Samples:
    """N = n_prompts * k completions, each prompt's k together (prompt 0's, then prompt 1's, ...:
    the order `group_labels` reads rewards in).

    Args:
        prompt_index: (N,) long, the position of each completion's prompt in the prompts given.
        completion_ids: N lists of token ids; one that stopped ends with its stop token.
        stopped: (N,) bool, True where a stop token ended the completion, False where it reached
            `max_new_tokens` instead.
        seconds: wall-clock time the draw took (generation and reading the tokens back).
    """

    prompt_index: Tensor
    completion_ids: list[list[int]]
    stopped: Tensor
    seconds: float

    def __len__(self) -> int:
        return len(self.completion_ids)

    def texts(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """The completions as text, without special tokens (the stop token among them)."""
        return [
            str(t) for t in tokenizer.batch_decode(self.completion_ids, skip_special_tokens=True)
        ]


class Sampler(Protocol):
    """Draws `k` completions of each prompt from a model."""

    @property
    def k(self) -> int:
        """Completions per prompt."""
        ...

    def sample(
        self, model: CausalLM, prompt_ids: Sequence[Sequence[int]], seeds: Sequence[int]
    ) -> Samples:
        """`k` completions of each prompt (token ids, as training encodes a prompt), from `model`
        as it is now, in eval mode and without gradients. `seeds` holds one seed per prompt
        (ValueError when the counts differ): a prompt's completions depend only on the model,
        its ids, its seed and the settings, not on the other prompts, their order, the device
        or the global random state, which is neither read nor changed."""
        ...


def _first_stop(new_tokens: Tensor, stops: Tensor) -> tuple[Tensor, Tensor]:
    """(B, T) generated tokens -> each row's length up to and including its first stop token
    (T where there is none) and whether it has one, both (B,)."""
    is_stop = torch.isin(new_tokens, stops)
    stopped = is_stop.any(dim=1)
    # argmax of a 0/1 row is its first 1.
    lengths = torch.where(stopped, is_stop.int().argmax(dim=1) + 1, new_tokens.shape[1])
    return lengths, stopped


@dataclass(frozen=True)
class HFSampler:
    """Samples with Hugging Face `generate` (KV cache), all prompts' k samples as one batch.

    `generate` runs greedy, and sampling is the Gumbel-max trick: after the policy's own
    processors (its generation config lies underneath, e.g. a repetition penalty it ships) come
    the temperature, top-p (below 1) and `GumbelNoise`, whose noise is a hash of (prompt's seed,
    sample, step, token): HF's `multinomial` on the global random stream would tie a row's draw
    to its batch. Top-k is off; sampling-only settings of the model's config (min_p, typical_p,
    epsilon/eta cutoffs) are not applied, as greedy `generate` builds no warpers.

    Args:
        eos_token_id: the tokenizer's end-of-sequence id (see `from_tokenizer`).
        pad_token_id: the id left padding uses; None: `eos_token_id`.
        k: `online.sampling.k`, completions per prompt.
        temperature: `online.sampling.temperature`; 0 is greedy (then k must be 1).
        top_p: `online.sampling.top_p`, nucleus sampling's mass; 1 is off.
        max_new_tokens: `online.sampling.max_new_tokens`, the longest completion.
        stop_token_ids: `online.sampling.stop_token_ids`, ids that end a completion besides the
            EOS and any the model's generation config names (a chat model's end-of-turn marker).
    """

    eos_token_id: int
    pad_token_id: int | None = None
    k: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    stop_token_ids: Sequence[int] = ()

    def __post_init__(self) -> None:
        key = "online.sampling"
        for name in ("k", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}.{name} must be an integer >= 1, got {value!r}")
        if not self.temperature >= 0:
            raise ConfigError(f"{key}.temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{key}.top_p must be in (0, 1], got {self.top_p}")
        if self.k > 1 and self.temperature == 0:
            raise ConfigError(
                f"{key}.k={self.k} with {key}.temperature=0 draws one greedy completion {self.k} "
                "times; set temperature above 0 to sample"
            )
        ids = tuple(self.stop_token_ids)  # a YAML list arrives as a ListConfig
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise ConfigError(f"{key}.stop_token_ids must be token ids (integers >= 0), got {ids}")
        object.__setattr__(self, "stop_token_ids", ids)

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase, **settings: Any) -> HFSampler:
        """A sampler with `tokenizer`'s EOS and pad ids and the given settings (the fields
        after them)."""
        if tokenizer.eos_token_id is None:
            raise ConfigError(
                "the tokenizer has no EOS token, so a sampled completion could never stop; "
                "set one on the tokenizer"
            )
        return cls(tokenizer.eos_token_id, tokenizer.pad_token_id, **settings)

    def generation_config(self, model: CausalLM) -> GenerationConfig:
        """The model's own generation config, greedy, with these lengths and stop ids (the
        sampling settings act through `logits_processors`)."""
        return generation_config(
            model,
            max_new_tokens=self.max_new_tokens,
            temperature=0.0,
            top_p=1.0,
            top_k=0,
            num_return_sequences=1,  # the prompts come repeated k times
            pad_token_id=self._pad_id,
            stop_ids=[self.eos_token_id, *self.stop_token_ids],
        )

    def logits_processors(self, seeds: Sequence[int], prompt_width: int) -> LogitsProcessorList:
        """Temperature, top-p and the seeds' Gumbel noise, for a batch of `len(seeds)` prompts
        left-padded to `prompt_width`, each repeated k times; none at temperature 0 (greedy).

        `generate` puts these after the processors it builds from the generation config (none
        of the same types, as that config is greedy: a custom processor of a type it builds
        would take that one's place instead)."""
        if self.temperature == 0:
            return LogitsProcessorList()
        warpers: list[LogitsProcessor] = [TemperatureLogitsWarper(self.temperature)]
        if self.top_p < 1:
            warpers.append(TopPLogitsWarper(self.top_p))
        noise = GumbelNoise(row_keys(seeds, self.k), prompt_width)
        return LogitsProcessorList([*warpers, noise])

    @property
    def _pad_id(self) -> int:
        return self.pad_token_id if self.pad_token_id is not None else self.eos_token_id

    def sample(
        self, model: CausalLM, prompt_ids: Sequence[Sequence[int]], seeds: Sequence[int]
    ) -> Samples:
        """`k` completions of each prompt, generated as one left-padded batch.

        The model runs in eval mode (no dropout) without gradients, and is put back in the mode
        it was in afterwards, also when generation fails. No global random stream is read or
        moved: a prompt's completions depend on its ids and seed alone (with the model and the
        settings), wherever it stands in the batch and whichever prompts stand beside it.

        Args:
            model: the policy, a Hugging Face causal LM (or a peft model around one).
            prompt_ids: each prompt's token ids, as training encodes a prompt (BOS + tokens, or
                the chat template's rendering with the generation prompt).
            seeds: one seed per prompt (int64 range; larger ints are taken modulo 2**64),
                e.g. derived from the run's seed and the prompt's place in the run; unused at
                temperature 0.

        Returns:
            `Samples`, each prompt's k completions together, prompt by prompt.
        """
        seeds = [operator.index(s) for s in seeds]  # numpy and torch integers too
        if len(seeds) != len(prompt_ids):
            raise ValueError(
                f"sample got {len(seeds)} seeds for {len(prompt_ids)} prompts; give one seed "
                "per prompt"
            )
        if not prompt_ids:
            none = torch.zeros(0, dtype=torch.long)
            return Samples(none, [], none.bool(), 0.0)
        empty = [i for i, ids in enumerate(prompt_ids) if not ids]
        if empty:  # a row of padding alone: attention over nothing
            raise ValueError(f"prompt {empty[0]} has no tokens; every prompt needs at least one")
        device = next(model.parameters()).device
        self._check_length(model, prompt_ids)
        repeated = [ids for ids in prompt_ids for _ in range(self.k)]
        input_ids, attention_mask = left_padded(repeated, self._pad_id)
        config = self.generation_config(model)
        processors = self.logits_processors(seeds, prompt_width=input_ids.shape[1])
        start = time.perf_counter()
        # Eager under compile.enabled: generating with a KV cache would compile every layer anew
        # (see kto_lightning.common.compile_stance.eager).
        with eval_mode(model), torch.no_grad(), eager():
            output = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
                logits_processor=processors,
            )  # (N, width + T); a row that stopped early is padded after its stop token
        new_tokens = output[:, input_ids.shape[1] :].cpu()
        seconds = time.perf_counter() - start
        stops = torch.tensor(config.eos_token_id, dtype=new_tokens.dtype)
        lengths, stopped = _first_stop(new_tokens, stops)
        rows = new_tokens.tolist()
        completions = [row[:n] for row, n in zip(rows, lengths.tolist(), strict=True)]
        prompt_index = torch.arange(len(prompt_ids)).repeat_interleave(self.k)
        return Samples(prompt_index, completions, stopped, seconds)

    def _check_length(self, model: CausalLM, prompt_ids: Sequence[Sequence[int]]) -> None:
        """A model with learned positions (GPT-2) fails with an IndexError past its window."""
        limit = learned_positions(model)
        longest = max(len(ids) for ids in prompt_ids)
        if limit is not None and longest + self.max_new_tokens > limit:
            raise ConfigError(
                f"the longest prompt ({longest} tokens) plus online.sampling.max_new_tokens="
                f"{self.max_new_tokens} exceeds the model's {limit} positions; lower "
                "max_new_tokens or the prompt length"
            )
