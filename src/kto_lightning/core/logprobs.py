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
from torch import Tensor, nn

from kto_lightning.core.chunked_head import (
    is_plain_linear,
    token_logprobs_chunked,
    token_logprobs_via_head,
)
from kto_lightning.core.packing import Packing, pack_rows

# A transformers causal LM, or a peft PeftModel wrapping one. Their methods reach the model through
# nn.Module.__getattr__ and peft's own __getattr__, which a type checker cannot follow: Any.
CausalLM = Any

# Names other modules import from here (the head's kernels live in chunked_head.py).
__all__ = [
    "SHARDED_ENTRY",
    "CausalLM",
    "batch_logprobs",
    "eval_mode",
    "rows_logprobs",
    "sequence_logprobs",
    "unsharded_sequence_logprobs",
]


def _backbone(model: CausalLM) -> nn.Module:
    """The model without its LM head (e.g. LlamaModel inside LlamaForCausalLM)."""
    get_decoder = getattr(model, "get_decoder", None)
    candidates = [get_decoder() if callable(get_decoder) else None]
    candidates += [getattr(model, "base_model", None), getattr(model, "model", None)]
    for module in candidates:
        if isinstance(module, torch.nn.Module) and module is not model:
            return module
    raise TypeError(f"cannot find the backbone (decoder without LM head) of {type(model).__name__}")


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
        ids, positions = packed.input_ids, packed.position_ids
        if "flash" in str(getattr(getattr(model, "config", None), "_attn_implementation", "")):
            # transformers' flash path reads row bounds from the position ids of a batch of ONE
            # sequence only (_is_packed_sequence): the packs laid end to end keep every row apart
            # in its varlen kernel, where (P, T) would run plain causal attention across rows.
            ids, positions = ids.reshape(1, -1), positions.reshape(1, -1)
        out = _backbone(model)(input_ids=ids, position_ids=positions, use_cache=False)
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
    if is_plain_linear(head):
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
