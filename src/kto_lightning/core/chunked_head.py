"""The LM head run over chunks of rows, so that the (N, V) logits are never held at once.

`token_logprobs_chunked`: a custom autograd Function over the head's weight matrix, which
recomputes each chunk's logits in backward (peak extra memory chunk_size x V instead of N x V).
`token_logprobs_via_head`: the same bound through the head module itself (activation
checkpointing per chunk), for heads that are more than a weight matrix (LoRA, hooks, ZeRO-3).
`resolve_chunk_size`: `logprob_chunk_size=auto` for the device and the vocabulary.

All softmax math is done in float32, or float64 for float64 inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kto_lightning.errors import ConfigError


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16/fp16/fp32 -> fp32, fp64 -> fp64


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None):
    """(c, H) -> float32 (c, V) logits (after softcap) and tanh(raw / softcap) (or None)."""
    raw = F.linear(h, weight, bias)  # (c, V) in the model dtype (or the autocast dtype)
    logits = raw.to(_math_dtype(h.dtype))  # (c, V) float32 / float64
    if softcap is None:
        return logits, None
    t = torch.tanh(logits / softcap)
    return softcap * t, t


class _ChunkedTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, softcap):
        n = hidden.shape[0]
        out_dtype = _math_dtype(hidden.dtype)
        token_lp = hidden.new_empty(n, dtype=out_dtype)  # (N,)
        lse = hidden.new_empty(n, dtype=out_dtype)  # (N,) saved for backward
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            logits, _ = _chunk_logits(hidden[s:e], weight, bias, softcap)  # (c, V)
            target_logit = logits.gather(1, targets[s:e, None]).squeeze(1)  # (c,)
            # logsumexp in place: the chunk's logits buffer is the only (c, V) tensor alive.
            peak = logits.amax(dim=-1, keepdim=True)  # (c, 1)
            total = logits.sub_(peak).exp_().sum(dim=-1)  # (c,)
            lse[s:e] = peak.squeeze(1) + total.log()
            token_lp[s:e] = target_logit - lse[s:e]
            del logits  # only one chunk of logits alive at a time
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.softcap = chunk_size, softcap
        dev = hidden.device.type  # recompute under the same autocast state as forward
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        return token_lp

    @staticmethod
    def backward(ctx, grad_out):  # grad_out (N,)
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None  # (N, H)
        acc = _math_dtype(weight.dtype)  # accumulate over chunks in >= float32
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None  # (V, H)
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b else None  # (V,)
        dev, enabled, ac_dtype = ctx.autocast
        # The matmuls run in the dtype forward's did: the autocast dtype under mixed precision
        # (an fp32 product of the (V, c) gradient there would be a slow fp32 GEMM on a GPU), else
        # the model's. Only the accumulation over chunks is kept in >= float32.
        mm_dtype = ac_dtype if enabled else weight.dtype
        n = hidden.shape[0]
        with torch.autocast(dev, dtype=ac_dtype, enabled=enabled):
            for s in range(0, n, ctx.chunk_size):
                e = min(s + ctx.chunk_size, n)
                h = hidden[s:e]  # (c, H)
                logits, t = _chunk_logits(h, weight, bias, ctx.softcap)  # (c, V)
                go = grad_out[s:e, None].to(logits.dtype)  # (c, 1)
                # d lp / d logits = onehot(target) - softmax; reuse the logits buffer in place.
                g = logits.sub_(lse[s:e, None]).exp_().mul_(-go)  # (c, V)
                g.scatter_add_(1, targets[s:e, None], go)
                if t is not None:
                    g.mul_(1 - t * t)  # through softcap * tanh(raw / softcap)
                if need_b:
                    grad_b += g.sum(0)
                g = g.to(mm_dtype)
                if need_h:
                    grad_h[s:e] = (g @ weight).to(hidden.dtype)  # (c, V) @ (V, H)
                if need_w:
                    if acc == mm_dtype:  # fp32 throughout: accumulate in place, no temporary
                        grad_w.addmm_(g.T, h.to(mm_dtype))  # (V, c) @ (c, H)
                    else:  # a (V, H) product in mm_dtype, added into the fp32 sum as it is read
                        grad_w.add_(g.T @ h.to(mm_dtype))
                del logits, t, g
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None


# `logprob_chunk_size=auto`: the rows of one LM-head chunk on a GPU, as a count of logits: 4096
# rows at a 32000-token vocabulary (512 MB in float32), fewer and larger products and fewer
# launches than 256 rows. On a CPU, larger chunks are not faster and cost memory, so 256 rows.
# The step times behind both: benchmarks/RESULTS.md ("Options").
GPU_CHUNK_LOGITS = 2**27
CPU_CHUNK_ROWS = 256


def resolve_chunk_size(value: int | str, on_gpu: bool, vocab_size: int) -> int:
    """`logprob_chunk_size` as configured: a number of rows, or "auto" for the device and the
    vocabulary (on a GPU the largest power of two of rows whose logits stay within
    `GPU_CHUNK_LOGITS`, at least 256; on a CPU 256)."""
    if value != "auto":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"logprob_chunk_size must be an integer >= 1 or auto, got {value!r}")
        return value
    if not on_gpu:
        return CPU_CHUNK_ROWS
    rows = 2 ** max(0, (GPU_CHUNK_LOGITS // max(1, vocab_size)).bit_length() - 1)
    return max(CPU_CHUNK_ROWS, rows)


def token_logprobs_chunked(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_size: int = 256,
    bias: Tensor | None = None,
    softcap: float | None = None,
) -> Tensor:
    """log p(targets) for N positions without materialising the (N, V) logits at once.

    hidden (N, H), weight (V, H) (the LM head, possibly tied to the input embeddings; it may or may
    not require grad), targets (N,) long, bias (V,) or None -> (N,) float32 (float64 if hidden is
    float64). Per chunk of rows: logits = hidden_chunk @ weight.T (+ bias) in the model dtype, then
    float32, then optionally softcap * tanh(logits / softcap), float32 logsumexp, gather. Only the
    inputs and the (N,) logsumexp are saved; backward recomputes each chunk. Peak extra memory is
    about chunk_size x V float32 in forward and backward.

    Precision: fp32 inputs match the naive full-logits computation to ~1e-6 (tested at 1e-5).
    bf16 inputs are exactly as precise as the naive path run on the same bf16 logits; against a
    float32 reference they differ by the bf16 rounding of the logits (tested: |err| <= 0.05 +
    0.02 * |ref| for O(1) logits, V=300).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedTokenLogprobs.apply(hidden, weight, bias, targets, chunk_size, softcap)


def is_plain_linear(head: nn.Module) -> bool:
    """Whether `head(h)` is exactly `F.linear(h, head.weight, head.bias)`.

    Only then may the fused kernel read the weight itself. Anything else goes through the module:
    a LoRA-wrapped head (peft's `lora.Linear` adds its adapters in forward), a `modules_to_save`
    copy, a parametrized or hooked layer, a weight that DeepSpeed ZeRO-3 has partitioned (an
    empty placeholder until the module's own hooks gather it).
    """
    return (
        type(head) is nn.Linear
        and not head._forward_pre_hooks
        and not head._forward_hooks
        and tuple(head.weight.shape) == (head.out_features, head.in_features)
    )


def _head_chunk_logprobs(
    head: nn.Module, hidden: Tensor, targets: Tensor, softcap: float | None
) -> Tensor:
    """(c, H) -> (c,) log p(targets) through `head`, with a float32 (or float64) log-sum-exp."""
    logits = head(hidden)  # (c, V)
    logits = logits.to(_math_dtype(logits.dtype))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(-1)


def token_logprobs_via_head(
    hidden: Tensor,
    head: nn.Module,
    targets: Tensor,
    chunk_size: int = 256,
    softcap: float | None = None,
) -> Tensor:
    """`token_logprobs_chunked` for any head module: (N, H) -> (N,) float32 (float64 for float64).

    Each chunk runs `head` under activation checkpointing, so its (c, V) logits are dropped after
    forward and recomputed in backward, one chunk at a time: the same bound on memory as the fused
    kernel, with gradients reaching whatever the head's forward uses (adapter weights included).
    About 2x the fused kernel's temporaries, which is why plain heads take the fused path.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=_math_dtype(hidden.dtype))
    chunks = [
        checkpoint(
            _head_chunk_logprobs,
            head,
            hidden[s : s + chunk_size],
            targets[s : s + chunk_size],
            softcap,
            use_reentrant=False,
        )
        for s in range(0, hidden.shape[0], chunk_size)
    ]
    return torch.cat(chunks)
