"""Padding-free forwards: the real tokens of a padded batch's rows, packed into fewer sequences.

`pack_rows` takes the (B, L) tensors the collator builds and lays the rows' real tokens end to
end into P <= B sequences of at most `budget` tokens each (first-fit, longest row first), with
position ids that restart at 0 for each row. The backbone is then called with those position ids
and *no* attention mask: transformers (masking_utils.find_packed_sequence_indices) reads a new
sequence wherever the position ids do not step by +1, and builds a block-diagonal causal mask, so
no token attends outside its own row. Each row's hidden states are therefore its padded-path
hidden states (up to float rounding), and so are its completion log-probs.

Where it pays: every padded slot is a token of work for the MLPs and projections; packing drops
them. With flash-attention's varlen kernels (GPU) attention skips the other rows too; with the
sdpa/eager paths (CPU) the block-diagonal mask is a dense (P, T, T) mask, so attention still costs
T^2 per pack (benchmarks/packing.py measures both paths; benchmarks/RESULTS.md has the figures).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)
# The budgets already reported as raised in this process (one warning each, not one per batch).
_RAISED: set[int] = set()


@dataclass(frozen=True)
class Packing:
    """Score rows packed (`data.batching.packing=true`).

    Args:
        max_tokens: tokens per packed sequence; None packs up to the batch's longest row, so a
            pack is never longer than the padded rows were and attention never costs more per
            pack than per padded row. Fewer than a batch's longest row: raised to it, with a
            warning (`pack_budget`).
    """

    max_tokens: int | None = None


def pack_budget(max_tokens: int | None, longest: int) -> int:
    """Tokens per pack for rows of which the longest holds `longest` tokens.

    `max_tokens` (data.batching.max_tokens_per_pack), or the longest row when it is unset or
    smaller: a row is never split across packs. A set budget raised so is reported once per
    process, naming the key, the row and the value used, since the packs then cost more memory
    than the key asked for.
    """
    if max_tokens is None or max_tokens >= longest:
        return longest if max_tokens is None else max_tokens
    if max_tokens not in _RAISED:
        _RAISED.add(max_tokens)
        log.warning(
            "data.batching.max_tokens_per_pack=%d is below a row of %d tokens: a row is never "
            "split, so packs of such batches hold up to the longest row instead (%d here). Set "
            "data.batching.max_tokens_per_pack to data.lengths.max_length (the longest a row can "
            "be) or more, or to null to pack up to each batch's longest row",
            max_tokens, longest, longest,
        )  # fmt: skip
    return longest


@dataclass(frozen=True)
class PackedRows:
    """A padded batch's rows, packed.

    input_ids, position_ids (P, T): the packed sequences (pad slots: pad id, position 0, each
    its own one-token sequence). hidden_index (N,): flat index into (P * T) of the state that
    predicts each completion token; targets (N,): that token; row (N,): its row in the batch.
    """

    input_ids: Tensor
    position_ids: Tensor
    hidden_index: Tensor
    targets: Tensor
    row: Tensor


def first_fit(lengths: list[int], budget: int) -> tuple[list[int], list[int], list[int]]:
    """Bins for rows of `lengths`: (bin of each row, offset in its bin, tokens in each bin).

    First-fit decreasing: rows longest first, each into the first bin it fits in. Every row must
    fit the budget on its own.
    """
    free: list[int] = []  # tokens left in each bin
    bins, offsets = [0] * len(lengths), [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > budget:
            raise ValueError(f"a row of {n} tokens does not fit a pack of {budget}")
        b = next((b for b, left in enumerate(free) if left >= n), len(free))
        if b == len(free):
            free.append(budget)
        bins[i], offsets[i] = b, budget - free[b]
        free[b] -= n
    return bins, offsets, [budget - left for left in free]


def pack_rows(
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    budget: int | None = None,
    pad_id: int = 0,
) -> PackedRows:
    """Pack the real tokens of (B, L) rows into P sequences of at most `budget` tokens (None: the
    longest row's length); T is the fullest pack's length.

    Rows may be left- or right-padded (real tokens are those of `attention_mask`). A completion
    token is a target when it is not its row's first token, as in the padded path for the
    collator's right-padded rows.
    """
    mask = attention_mask.bool()
    # One device sync: the bin packing is a host-side loop over B row lengths.
    lengths = mask.sum(-1).tolist()
    budget = pack_budget(budget, max(max(lengths), 1))
    bins, offsets, fill = first_fit(lengths, budget)
    n_bins, width = len(fill), max(fill)
    device = input_ids.device
    bin_of = torch.tensor(bins, device=device)  # (B,)
    offset_of = torch.tensor(offsets, device=device)  # (B,)

    position = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L): rank of a real token in its row
    row, col = mask.nonzero(as_tuple=True)  # (R,) each: every real token
    pos = position[row, col]  # (R,)
    flat = bin_of[row] * width + offset_of[row] + pos  # (R,) slot in the flat (P * T) layout

    packed_ids = input_ids.new_full((n_bins * width,), pad_id)
    packed_ids[flat] = input_ids[row, col]
    packed_pos = torch.zeros(n_bins * width, dtype=torch.long, device=device)
    packed_pos[flat] = pos

    # Targets: completion tokens after their row's first token, predicted by the slot before.
    is_target = completion_mask[row, col].bool() & (pos > 0)  # (R,)
    return PackedRows(
        input_ids=packed_ids.view(n_bins, width),
        position_ids=packed_pos.view(n_bins, width),
        hidden_index=flat[is_target] - 1,
        targets=input_ids[row, col][is_target],
        row=row[is_target],
    )
