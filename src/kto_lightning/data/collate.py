"""Batches: dynamic right padding, main rows and KL rows padded to one common length; and prompts
padded on the left for generation (`left_padded`).

One common length lets the module run the reference model over main and KL rows in one forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kto_lightning.data.tokenize import Example


def _pad(sequences: list[tuple[list[int], list[int]]], length: int, pad_id: int) -> dict:
    """(prompt ids, completion ids) pairs -> input_ids, attention_mask, completion_mask (B, L)
    and completion_index (N,): the flat positions `row * (L - 1) + t - 1` of the N completion
    tokens t, i.e. of the hidden states that predict them (see logprobs.sequence_logprobs).

    The positions are listed here, on the host, because finding them on the device (`nonzero`)
    makes the host wait for the device in the middle of every forward.
    """
    batch = len(sequences)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    completion_mask = torch.zeros((batch, length), dtype=torch.bool)
    for row, (prompt, completion) in enumerate(sequences):
        ids = prompt + completion
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        completion_mask[row, len(prompt) : len(ids)] = True
    # Token 0 is never a target: nothing precedes it to predict it.
    (completion_index,) = completion_mask[:, 1:].flatten().nonzero(as_tuple=True)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "completion_index": completion_index,
    }


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Prompts (token ids) as one generation batch: input_ids and attention_mask (B, L), each row
    padded on the left, so that every row's new tokens start at column L."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


class KTOCollator:
    """Collate Examples into tensors, padded to the batch's longest row rounded up to a multiple
    of `pad_to_multiple_of` (but not past `max_length`).

    Returns `input_ids`, `attention_mask`, `completion_mask` (B, L) and `completion_index` (N,)
    for the rows themselves, right-padded, `labels` (B,) bool, `index` (B,) the examples' dataset
    positions, and with `needs_kl_rows` the same four tensors prefixed `kl_` for the rows built
    from each prompt and its partner's completion.
    """

    def __init__(
        self,
        pad_token_id: int,
        needs_kl_rows: bool = True,
        pad_to_multiple_of: int = 1,
        max_length: int | None = None,
    ) -> None:
        self.pad_token_id = pad_token_id
        self.needs_kl_rows = needs_kl_rows
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_length = max_length

    def __call__(self, examples: Sequence[Example]) -> dict[str, Tensor]:
        main = [(e.prompt_ids, e.completion_ids) for e in examples]
        kl = [(e.prompt_ids, e.kl_completion_ids) for e in examples] if self.needs_kl_rows else []
        longest = max(len(p) + len(c) for p, c in main + kl)
        multiple = self.pad_to_multiple_of
        length = -(-longest // multiple) * multiple
        if self.max_length is not None:  # never past the model's budget for a row
            length = max(longest, min(length, self.max_length))
        batch = _pad(main, length, self.pad_token_id)
        if self.needs_kl_rows:
            batch.update({f"kl_{k}": v for k, v in _pad(kl, length, self.pad_token_id).items()})
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
        batch["index"] = torch.tensor([e.index for e in examples], dtype=torch.long)
        return batch
