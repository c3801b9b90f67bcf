"""Log-probabilities of completions under a causal LM, without materialising (N, V) logits.

`token_logprobs_chunked` runs the LM head over chunks of rows in a custom autograd Function that
recomputes each chunk's logits in backward, so the peak extra memory is chunk_size x V instead of
N x V. `token_logprobs_via_head` does the same through the head module itself, for heads that
are more than a weight matrix.
`sequence_logprobs` is what the trainer calls: backbone -> hidden states of the positions that
predict completion tokens -> chunked head -> per-sequence sums. `batch_logprobs` scores a
batch's main and KL rows in one such forward (the reference providers and the cache use it).
Either runs padded rows as they come, or packed without their padding (kto_lightning.core.packing).

Dtypes: all softmax math is done in float32, or in float64 when the inputs are float64 (so that
gradient checks can be tight); the returned log-probs have that dtype.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kto_lightning.core.packing import Packing, pack_rows
from kto_lightning.errors import ConfigError

# A transformers causal LM, or a peft PeftModel wrapping one. Their methods reach the model through
# nn.Module.__getattr__ and peft's own __getattr__, which a type checker cannot follow: Any.
CausalLM = Any


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


# `logprob_chunk_size=auto`: the rows of one LM-head chunk on a GPU, as a count of logits. On one
# H200 with a 32000-token vocabulary, 4096 rows (2^27 logits, 512 MB in float32) made a 1.1B
# step 15% faster than 256: fewer, larger products and fewer launches. On a CPU, larger chunks
# are not faster and cost memory, so 256 rows.
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


def _backbone(model: CausalLM) -> nn.Module:
    """The model without its LM head (e.g. LlamaModel inside LlamaForCausalLM)."""
    get_decoder = getattr(model, "get_decoder", None)
    candidates = [get_decoder() if callable(get_decoder) else None]
    candidates += [getattr(model, "base_model", None), getattr(model, "model", None)]
    for module in candidates:
        if isinstance(module, torch.nn.Module) and module is not model:
            return module
    raise TypeError(f"cannot find the backbone (decoder without LM head) of {type(model).__name__}")


def _is_plain_linear(head: nn.Module) -> bool:
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


# The name under which a sharding strategy registers `sequence_logprobs` as a forward method of a
# sharded model (training/strategies.py): the scoring below calls the backbone and reads the LM
# head directly, outside `model.forward`, so FSDP2 must be told that it gathers the root's weights.
SHARDED_ENTRY = "kto_sequence_logprobs"


def sequence_logprobs(
    model: CausalLM,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    chunk_size: int = 256,
    packing: Packing | None = None,
    completion_index: Tensor | None = None,
) -> Tensor:
    """Per-sequence sum of log p(token) over completion tokens only: (B, L) each -> (B,) float32.

    completion_mask is 1 on the completion tokens themselves (0 on prompt and padding); token t is
    predicted by the hidden state at t - 1, so the first token is never a target. Positions come
    from attention_mask (cumsum - 1), so left- and right-padded batches give the same numbers.
    With `packing`, the rows' real tokens run packed, without their padding
    (kto_lightning.core.packing); the numbers are the same up to float rounding.
    Models that rescale logits other than by final_logit_softcapping are not supported. The head
    runs as the model's own head would: through its adapters and its strategy's hooks.

    `completion_index` (N,) long, when given, says the rows are laid out as `KTOCollator` lays
    them out: right-padded, with the flat positions `row * (L - 1) + t - 1` of their completion
    tokens t listed on the host. The forward then needs neither the attention mask nor a
    `nonzero`, so it never waits for the device (see `_right_padded_states`).
    """
    sharded_entry = model.__dict__.get(SHARDED_ENTRY)  # set on a sharded root only
    if sharded_entry is not None:
        return sharded_entry(
            input_ids, attention_mask, completion_mask, chunk_size, packing, completion_index
        )
    return unsharded_sequence_logprobs(
        model, input_ids, attention_mask, completion_mask, chunk_size, packing, completion_index
    )


def unsharded_sequence_logprobs(
    model: CausalLM,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    chunk_size: int = 256,
    packing: Packing | None = None,
    completion_index: Tensor | None = None,
) -> Tensor:
    """`sequence_logprobs` itself, for a model whose weights are all in hand (or gathered)."""
    if packing is not None:
        packed = pack_rows(input_ids, attention_mask, completion_mask, packing.max_tokens)
        # No attention mask: the model reads the row boundaries from the restarting position ids
        # and keeps attention block-diagonal (transformers' find_packed_sequence_indices).
        out = _backbone(model)(
            input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (P, T, H)
        hidden_sel = hidden.flatten(0, 1)[packed.hidden_index]  # (N, H)
        targets, row = packed.targets, packed.row  # (N,), (N,)
    elif completion_index is not None:
        hidden_sel, targets, row = _right_padded_states(model, input_ids, completion_index)
    else:
        # position_ids: (B, L), 0 at the first real token whatever the padding side.
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = _backbone(model)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, L, H)
        select = completion_mask[:, 1:].bool()  # (B, L-1): next token t+1 is a completion token
        row, pos_idx = select.nonzero(as_tuple=True)  # (N,), (N,)
        hidden_sel = hidden[row, pos_idx]  # (N, H): states at t-1 ...
        targets = input_ids[:, 1:][row, pos_idx]  # (N,): ... predicting token t
    head = model.get_output_embeddings()  # Linear(H, V), weight (V, H), or a wrapper of one
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if _is_plain_linear(head):
        token_lp = token_logprobs_chunked(
            hidden_sel, head.weight, targets, chunk_size, bias=head.bias, softcap=softcap
        )  # (N,)
    else:
        token_lp = token_logprobs_via_head(hidden_sel, head, targets, chunk_size, softcap)  # (N,)
    sums = token_lp.new_zeros(input_ids.shape[0])  # (B,)
    return sums.index_add(0, row, token_lp)  # (B,)


def _full_attention_sdpa(config: object) -> bool:
    """Whether every layer of a model with this config attends causally over the whole row, with
    SDPA: no sliding window, chunked or bidirectional layers (their masks are not a plain
    triangle)."""
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return not any(getattr(config, key, None) for key in ("sliding_window", "attention_chunk_size"))


@functools.lru_cache(maxsize=32)
def _triangle(length: int, device: torch.device) -> Tensor:
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]


def _causal_mask(model: nn.Module, length: int, device: torch.device) -> Tensor | None:
    """The (1, 1, L, L) causal mask for SDPA, made once per length and device; None (the model
    builds its own) for other attention.

    Given no mask, transformers checks its position ids for packed rows, and given a padding
    mask, whether it masks anything: each check reads a device value, so the host waits for the
    device at the start of every forward. A ready 4-D mask is used as it is: no check, and no
    mask rebuilt for each batch.
    """
    if not _full_attention_sdpa(getattr(model, "config", None)):
        return None
    return _triangle(length, device)


def _right_padded_states(
    model: CausalLM, input_ids: Tensor, completion_index: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(N, H) hidden states predicting the completion tokens, their (N,) targets and (N,) rows,
    for right-padded rows whose completion positions the collator listed (`completion_index`).

    No padding mask and no position ids: in a right-padded row every real token sits before all
    padding, so causal attention alone never lets a real token see a pad, and the positions are
    the default 0, 1, 2, ... The states of pad positions are garbage, but never selected. The
    positions come from the host: a `nonzero` on the device would wait for it.
    """
    length = input_ids.shape[1]
    mask = _causal_mask(model, length, input_ids.device)
    out = _backbone(model)(input_ids=input_ids, attention_mask=mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # (B, L, H)
    # The flat position row * (L - 1) + t - 1 as (row, t - 1): the N states are gathered
    # straight from `hidden`, without a copy of all B * (L - 1) of them.
    row = torch.div(completion_index, length - 1, rounding_mode="floor")  # (N,)
    position = completion_index - row * (length - 1)  # (N,) t - 1
    hidden_sel = hidden[row, position]  # (N, H): the state at t - 1 predicts token t
    targets = input_ids[row, position + 1]  # (N,)
    return hidden_sel, targets, row


def rows_logprobs(
    model: nn.Module,
    batch: dict[str, Tensor],
    prefix: str = "",
    chunk_size: int = 256,
    packing: Packing | None = None,
) -> Tensor:
    """(B,) `sequence_logprobs` of a collated batch's main rows (`prefix` "") or KL rows ("kl_"),
    with the completion positions the collator listed, when it did."""
    return sequence_logprobs(
        model,
        batch[f"{prefix}input_ids"],
        batch[f"{prefix}attention_mask"],
        batch[f"{prefix}completion_mask"],
        chunk_size,
        packing,
        batch.get(f"{prefix}completion_index"),
    )


def batch_logprobs(
    model: nn.Module,
    batch: dict[str, Tensor],
    chunk_size: int,
    needs_kl_rows: bool,
    packing: Packing | None = None,
) -> tuple[Tensor, Tensor | None]:
    """(main, KL or None) log-probs of one batch, in one forward over main and KL rows.

    Packed, main and KL rows run in two forwards, each packed on its own, as the policy's passes
    run them (KTOModule.forward_logps): a packed row's numbers depend, by float rounding, on the
    rows it shares a pack with, so a live reference packed like the policy equals it exactly at
    step 0.
    """
    if not needs_kl_rows:
        return rows_logprobs(model, batch, "", chunk_size, packing), None
    if packing is not None:
        main = rows_logprobs(model, batch, "", chunk_size, packing)
        return main, rows_logprobs(model, batch, "kl_", chunk_size, packing)
    keys = ("input_ids", "attention_mask", "completion_mask")
    both = {k: torch.cat([batch[k], batch[f"kl_{k}"]]) for k in keys}
    if "completion_index" in batch:
        # The KL rows follow the main rows: their flat positions shift by B * (L - 1).
        rows, length = batch["input_ids"].shape
        shift = rows * (length - 1)
        both["completion_index"] = torch.cat(
            [batch["completion_index"], batch["kl_completion_index"] + shift]
        )
    main, kl = rows_logprobs(model, both, "", chunk_size).chunk(2)
    return main, kl


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """`model` in eval mode (no dropout) for the block; then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
