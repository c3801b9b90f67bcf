"""The naive log-prob path, the full logits in hand: what the chunked path is tested against."""

from __future__ import annotations

import torch
from torch import Tensor


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16/fp16/fp32 -> fp32, fp64 -> fp64


def compute_logprobs(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sequence sums of log p(target): the naive path, with the full logits in hand.

    logits (B, T, V) are already aligned with targets (B, T): logits[:, t] predicts targets[:, t].
    mask (B, T) bool or 0/1 selects the summed positions (None = all); masked targets may hold any
    value (e.g. -100). Returns (B,) float32 (float64 for float64 logits). Only the (B, T) logsumexp
    is kept in float32; float32 logits are not copied.
    """
    logits = logits.to(_math_dtype(logits.dtype))  # no-op for fp32 logits
    if mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    mask = mask.bool()
    safe_targets = targets.masked_fill(~mask, 0)  # (B, T), valid gather indices
    target_logits = logits.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    token_lp = target_logits - torch.logsumexp(logits, dim=-1)  # (B, T)
    # where, not multiply: a NaN/inf at a masked (e.g. padding) position must not leak into sums.
    return torch.where(mask, token_lp, torch.zeros_like(token_lp)).sum(-1)  # (B,)


def naive_sequence_logprobs(model, ids: Tensor, am: Tensor, cm: Tensor) -> Tensor:
    """model(...).logits -> log_softmax -> gather -> sum over completion tokens: (B,)."""
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    logits = model(ids, attention_mask=am, position_ids=pos).logits
    return compute_logprobs(logits[:, :-1], ids[:, 1:], cm[:, 1:])
