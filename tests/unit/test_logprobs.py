"""Tests for core/logprobs.py: naive vs chunked log-probs, values, gradients and memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from kto_lightning.core.chunked_head import (
    GPU_CHUNK_LOGITS,
    resolve_chunk_size,
    token_logprobs_chunked,
)
from kto_lightning.core.logprobs import sequence_logprobs
from kto_lightning.errors import ConfigError
from naive_logprobs import compute_logprobs, naive_sequence_logprobs

V, H, N = 300, 24, 37  # vocab, hidden, selected rows (H != V so V only appears as the vocab dim)


def naive_token_logprobs(hidden, weight, targets, bias=None, softcap=None):
    logits = F.linear(hidden, weight, bias)  # (N, V) all at once
    if logits.dtype != torch.float64:
        logits = logits.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def rand_inputs(dtype=torch.float32, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    b = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return hidden, weight, targets, b


# ---------------------------------------------------------------- compute_logprobs


@pytest.mark.parametrize("with_mask", [False, True])
def test_compute_logprobs_matches_naive(with_mask):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 9, V, generator=g) * 3
    targets = torch.randint(0, V, (3, 9), generator=g)
    mask = torch.rand(3, 9, generator=g) > 0.4 if with_mask else None
    m = mask.float() if with_mask else torch.ones(3, 9)
    expected = (logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1) * m).sum(-1)
    out = compute_logprobs(logits, targets, mask)
    assert out.shape == (3,) and out.dtype == torch.float32
    assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_compute_logprobs_ignores_masked_garbage():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 5, V, generator=g)
    targets = torch.randint(0, V, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    expected = compute_logprobs(logits, targets, mask)
    bad_logits, bad_targets = logits.clone(), targets.clone()
    bad_logits[~mask] = float("nan")  # e.g. fully-masked padding rows
    bad_targets[~mask] = -100
    assert_close(compute_logprobs(bad_logits, bad_targets, mask), expected)


def test_compute_logprobs_bf16_logits_are_upcast():
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 6, V, generator=g) * 4).bfloat16()
    targets = torch.randint(0, V, (2, 6), generator=g)
    out = compute_logprobs(logits, targets)
    assert out.dtype == torch.float32
    assert_close(out, compute_logprobs(logits.float(), targets), rtol=0, atol=0)


# ---------------------------------------------------------------- token_logprobs_chunked


@pytest.mark.parametrize("chunk_size", [1, 7, N, N + 50])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_chunked_matches_naive_fp32(chunk_size, bias, softcap):
    hidden, weight, targets, b = rand_inputs(bias=bias)
    hidden = hidden * 3  # make logits O(several) so the softcap actually bites
    out = token_logprobs_chunked(hidden, weight, targets, chunk_size, bias=b, softcap=softcap)
    assert out.shape == (N,) and out.dtype == torch.float32
    expected = naive_token_logprobs(hidden, weight, targets, b, softcap)
    assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [1, 7, N, N + 50])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_chunked_grads_match_autograd_float64(chunk_size, bias, softcap):
    hidden, weight, targets, b = rand_inputs(torch.float64, bias=bias)
    hidden = hidden * 3
    coef = torch.randn(N, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    leaves = [hidden, weight] + ([b] if bias else [])
    grads = {}
    for name in ("chunked", "naive"):
        xs = [x.detach().clone().requires_grad_(True) for x in leaves]
        bb = xs[2] if bias else None
        if name == "chunked":
            lp = token_logprobs_chunked(xs[0], xs[1], targets, chunk_size, bias=bb, softcap=softcap)
        else:
            lp = naive_token_logprobs(xs[0], xs[1], targets, bb, softcap)
        assert lp.dtype == torch.float64
        (lp * coef).sum().backward()
        grads[name] = [x.grad for x in xs]
    for got, want in zip(grads["chunked"], grads["naive"], strict=True):
        assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_chunked_gradcheck():
    hidden, weight, targets, b = rand_inputs(torch.float64, bias=True)
    hidden, weight, b = hidden[:5], weight[:11], b[:11]
    targets = targets[:5] % 11
    xs = [x.clone().requires_grad_(True) for x in (hidden, weight, b)]

    def fn(h, w, bb):
        return token_logprobs_chunked(h, w, targets, chunk_size=2, bias=bb, softcap=1.5)

    assert torch.autograd.gradcheck(fn, xs)


def test_chunked_frozen_weight_and_frozen_hidden():
    hidden, weight, targets, _ = rand_inputs(torch.float64)
    h = hidden.clone().requires_grad_(True)
    token_logprobs_chunked(h, weight, targets, chunk_size=5).sum().backward()
    h_ref = hidden.clone().requires_grad_(True)
    naive_token_logprobs(h_ref, weight, targets).sum().backward()
    assert weight.grad is None and not weight.requires_grad
    assert_close(h.grad, h_ref.grad, rtol=1e-10, atol=1e-12)

    w = weight.clone().requires_grad_(True)
    token_logprobs_chunked(hidden, w, targets, chunk_size=5).sum().backward()
    w_ref = weight.clone().requires_grad_(True)
    naive_token_logprobs(hidden, w_ref, targets).sum().backward()
    assert_close(w.grad, w_ref.grad, rtol=1e-10, atol=1e-12)


def test_chunked_without_grad_and_empty_selection():
    hidden, weight, targets, _ = rand_inputs()
    with torch.no_grad():
        out = token_logprobs_chunked(hidden.requires_grad_(True), weight, targets, chunk_size=4)
    assert not out.requires_grad
    empty = token_logprobs_chunked(hidden[:0], weight, targets[:0])
    assert empty.shape == (0,)
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs_chunked(hidden, weight, targets, chunk_size=0)


def test_chunked_bf16_close_to_fp32_reference():
    """bf16 tolerance: |err| <= 0.05 + 0.02 * |ref| (ref = fp32 naive on the fp32 inputs)."""
    hidden, weight, targets, b = rand_inputs(bias=True)
    hidden = hidden * 2
    ref = naive_token_logprobs(hidden, weight, targets, b)
    hb, wb, bb = hidden.bfloat16(), weight.bfloat16(), b.bfloat16()
    out = token_logprobs_chunked(hb, wb, targets, chunk_size=7, bias=bb)
    assert out.dtype == torch.float32
    assert_close(out, ref, rtol=0.02, atol=0.05)
    # ... and exactly as good as the naive path computed from the same bf16 logits.
    assert_close(out, naive_token_logprobs(hb, wb, targets, bb), rtol=1e-5, atol=1e-5)
    # bf16 gradients flow and have the parameter dtypes.
    hb.requires_grad_(True)
    wb.requires_grad_(True)
    token_logprobs_chunked(hb, wb, targets, chunk_size=7, bias=bb).sum().backward()
    assert hb.grad.dtype == wb.grad.dtype == torch.bfloat16
    h32, w32 = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    naive_token_logprobs(h32, w32, targets, b).sum().backward()
    assert_close(hb.grad.float(), h32.grad, rtol=0.05, atol=0.05)
    assert_close(wb.grad.float(), w32.grad, rtol=0.05, atol=0.05)


def test_chunked_under_autocast_recomputes_consistently():
    """fp32 params under bf16 autocast: same tolerance as the bf16 test, fp32 grads."""
    hidden, weight, targets, b = rand_inputs(bias=True)
    xs = [x.clone().requires_grad_(True) for x in (hidden, weight, b)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = token_logprobs_chunked(xs[0], xs[1], targets, chunk_size=7, bias=xs[2])
    assert out.dtype == torch.float32
    assert_close(
        out.detach(), naive_token_logprobs(hidden, weight, targets, b), rtol=0.02, atol=0.05
    )
    out.sum().backward()
    refs = [x.clone().requires_grad_(True) for x in (hidden, weight, b)]
    naive_token_logprobs(refs[0], refs[1], targets, refs[2]).sum().backward()
    for x, r in zip(xs, refs, strict=True):
        assert x.grad.dtype == torch.float32
        assert_close(x.grad, r.grad, rtol=0.05, atol=0.05)


class _MatmulDtypes(TorchDispatchMode):
    """The input dtypes of every matrix product run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in {"mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "linear", "addmv"}:
            dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor) and a.dim() == 2)
            self.seen.append((name, dtypes))
        return func(*args, **(kwargs or {}))


def test_chunked_under_autocast_runs_every_matmul_in_the_autocast_dtype():
    # fp32 master weights under bf16 autocast: forward and backward (which recomputes the chunk
    # logits and forms both gradients) run their products in bf16, as a GPU's tensor cores want;
    # only the log-sum-exp and the accumulation over chunks stay in fp32.
    hidden, weight, targets, b = rand_inputs(bias=True)
    xs = [x.clone().requires_grad_(True) for x in (hidden, weight, b)]
    with _MatmulDtypes() as products:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = token_logprobs_chunked(xs[0], xs[1], targets, chunk_size=7, bias=xs[2])
        out.sum().backward()
    assert len(products.seen) >= 3 * -(-len(targets) // 7)  # forward, recompute, 2 gradients
    assert all(dtypes and set(dtypes) == {torch.bfloat16} for _, dtypes in products.seen), (
        products.seen
    )
    assert xs[1].grad.dtype == torch.float32


def _saved_shapes(fn):
    shapes = []

    def pack(t):
        shapes.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, shapes


def _full_vocab_saved(shapes, max_rows):
    return [s for s in shapes if len(s) >= 1 and s[-1] == V and s[:-1].numel() > max_rows]


def test_chunked_never_saves_full_logits():
    hidden, weight, targets, b = rand_inputs(bias=True)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    chunk = 8
    out, shapes = _saved_shapes(
        lambda: token_logprobs_chunked(hidden, weight, targets, chunk, bias=b, softcap=3.0)
    )
    assert shapes, "the hook saw nothing: the check would be vacuous"
    assert _full_vocab_saved(shapes, chunk) == []
    out.sum().backward()
    # Control: the naive path does save an (N, V) tensor, so the check above can fail.
    _, naive_shapes = _saved_shapes(lambda: naive_token_logprobs(hidden, weight, targets, b, 3.0))
    assert _full_vocab_saved(naive_shapes, chunk) != []


# ---------------------------------------------------------------- sequence_logprobs


def tiny_llama(dtype=torch.float32, tie=False, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    return model.eval()


# (prompt length, completion length) per sequence
SHAPES = [(3, 4), (5, 2), (2, 6)]


def make_batch(side, shapes=SHAPES, seed=0, pad_id=0):
    """Pads `side` ('left' / 'right'); returns input_ids, attention_mask, completion_mask."""
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(1, V, (p + c,), generator=g) for p, c in shapes]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id)
    am = torch.zeros(len(seqs), length, dtype=torch.long)
    cm = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, (s, (p, c)) in enumerate(zip(seqs, shapes, strict=True)):
        start = 0 if side == "right" else length - len(s)
        ids[i, start : start + len(s)] = s
        am[i, start : start + len(s)] = 1
        cm[i, start + p : start + p + c] = 1
    return ids, am, cm


def test_get_decoder_is_backbone_and_reproduces_logits():
    model = tiny_llama()
    assert model.get_decoder() is model.model
    ids, am, _ = make_batch("left")
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=am, position_ids=pos)
    logits = model(ids, attention_mask=am, position_ids=pos).logits
    assert_close(model.lm_head(hidden.last_hidden_state), logits, rtol=0, atol=0)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("chunk_size", [1, 5, 1024])
def test_sequence_logprobs_matches_naive(side, chunk_size):
    model = tiny_llama()
    ids, am, cm = make_batch(side)
    with torch.no_grad():
        out = sequence_logprobs(model, ids, am, cm, chunk_size=chunk_size)
        expected = naive_sequence_logprobs(model, ids, am, cm)
    assert out.shape == (3,) and out.dtype == torch.float32
    assert (out < 0).all()
    assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_sequence_logprobs_padding_invariant():
    model = tiny_llama()
    left, right = make_batch("left"), make_batch("right")
    with torch.no_grad():
        lp_left = sequence_logprobs(model, *left, chunk_size=4)
        lp_right = sequence_logprobs(model, *right, chunk_size=4)
        assert_close(lp_left, lp_right, rtol=1e-5, atol=1e-5)
        for i, (p, c) in enumerate(SHAPES):  # each sequence alone, unpadded
            ids, am, cm = (t[i : i + 1, : p + c] for t in right)
            assert am.all()
            alone = sequence_logprobs(model, ids, am, cm, chunk_size=4)
            assert_close(alone, lp_right[i : i + 1], rtol=1e-5, atol=1e-5)


def test_listed_completion_positions_give_the_masked_numbers_and_gradients():
    # The collator's layout: right-padded rows, the completion positions listed on the host.
    # The forward then runs without attention mask or nonzero; numbers and gradients match the
    # masked path and the naive one.
    model = tiny_llama()
    ids, am, cm = make_batch("right")
    index = cm[:, 1:].flatten().nonzero().flatten()
    listed = sequence_logprobs(model, ids, am, cm, chunk_size=4, completion_index=index)
    grads = torch.autograd.grad(listed.sum(), list(model.parameters()))
    masked = sequence_logprobs(model, ids, am, cm, chunk_size=4)
    expected = torch.autograd.grad(masked.sum(), list(model.parameters()))
    assert_close(listed, masked, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert_close(listed, naive_sequence_logprobs(model, ids, am, cm), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected, strict=True):
        assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_sequence_logprobs_train_mode_and_no_grad():
    model = tiny_llama().train()
    ids, am, cm = make_batch("left")
    with_grad = sequence_logprobs(model, ids, am, cm, chunk_size=3)
    assert with_grad.requires_grad
    with torch.no_grad():
        without = sequence_logprobs(model, ids, am, cm, chunk_size=3)
        expected = naive_sequence_logprobs(model, ids, am, cm)
    assert not without.requires_grad
    assert_close(with_grad.detach(), without, rtol=0, atol=0)
    assert_close(without, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("tie", [False, True])
def test_sequence_logprobs_grads_match_naive(side, tie):
    ids, am, cm = make_batch(side)
    coef = torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64)
    names = [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.norm.weight",
    ]
    grads = {}
    for path in ("chunked", "naive"):
        model = tiny_llama(torch.float64, tie=tie).train()
        if path == "chunked":
            lp = sequence_logprobs(model, ids, am, cm, chunk_size=4)
        else:
            lp = naive_sequence_logprobs(model, ids, am, cm)
        (lp * coef).sum().backward()
        params = dict(model.named_parameters(remove_duplicate=False))
        grads[path] = {n: params[n].grad.clone() for n in names}
    for n in names:
        assert grads["chunked"][n].abs().sum() > 0, n
        assert_close(grads["chunked"][n], grads["naive"][n], rtol=1e-9, atol=1e-11, msg=n)


def test_sequence_logprobs_uses_config_softcap():
    model = tiny_llama()
    cap = 0.5  # small enough to change the numbers a lot
    ids, am, cm = make_batch("right")
    with torch.no_grad():
        plain = sequence_logprobs(model, ids, am, cm)
        model.config.final_logit_softcapping = cap
        capped = sequence_logprobs(model, ids, am, cm)
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids, attention_mask=am, position_ids=pos).logits  # Llama ignores the cap
        expected = compute_logprobs(cap * torch.tanh(logits[:, :-1] / cap), ids[:, 1:], cm[:, 1:])
    assert_close(capped, expected, rtol=1e-5, atol=1e-5)
    assert (capped - plain).abs().max() > 1e-2


# ---------------------------------------------------------------- heads that are more than a matrix
HEAD_LORAS = {
    "lora on q_proj and lm_head": {"target_modules": ["q_proj", "lm_head"], "r": 4},
    "lm_head in modules_to_save": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
}


def lora_llama(lora: dict):
    from kto_lightning.models import TinyLlama

    torch.manual_seed(0)
    model = TinyLlama(vocab_size=V, hidden_size=32, num_layers=2, lora=lora).load_policy()
    # LoRA's B starts at zero, and a modules_to_save copy equals the original: move every trainable
    # weight, so that a path that bypasses them gives other numbers.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(0.5 * torch.randn_like(parameter))
    return model.train()


@pytest.mark.parametrize("lora", list(HEAD_LORAS.values()), ids=list(HEAD_LORAS))
@pytest.mark.parametrize("chunk_size", [1, 4, 256])
def test_head_adapters_give_the_naive_logprobs_and_gradients(lora, chunk_size):
    ids, am, cm = make_batch("left")
    coef = torch.tensor([0.7, -1.3, 0.4])
    results = {}
    for path in ("chunked", "naive"):
        model = lora_llama(lora)
        if path == "chunked":
            lp = sequence_logprobs(model, ids, am, cm, chunk_size=chunk_size)
        else:
            lp = naive_sequence_logprobs(model, ids, am, cm)
        (lp * coef).sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results[path] = lp.detach(), grads
    (chunked, chunked_grads), (naive, naive_grads) = results["chunked"], results["naive"]
    assert_close(chunked, naive, rtol=0, atol=1e-4)
    head_grads = [n for n in naive_grads if "lm_head" in n]
    assert head_grads, "the head must have trainable weights in this test"
    for name, grad in naive_grads.items():
        assert grad.abs().sum() > 0, name
        assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_bypassed_head_adapter_would_be_seen():
    # The case above is only meaningful if the adapter changes the numbers: the base head alone
    # (what reading get_output_embeddings().weight gives) is far from the adapted head.
    model = lora_llama(HEAD_LORAS["lora on q_proj and lm_head"])
    ids, am, cm = make_batch("left")
    with torch.no_grad():
        adapted = sequence_logprobs(model, ids, am, cm)
        with model.disable_adapter():
            base = sequence_logprobs(model, ids, am, cm)
    assert (adapted - base).abs().max() > 1.0


def test_a_hooked_head_runs_through_its_module():
    model = tiny_llama()
    calls = []
    model.lm_head.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    ids, am, cm = make_batch("right")
    with torch.no_grad():
        out = sequence_logprobs(model, ids, am, cm, chunk_size=5)
        expected = naive_sequence_logprobs(model, ids, am, cm)
    assert_close(out, expected, rtol=1e-5, atol=1e-5)
    n_targets = int(cm[:, 1:].sum())
    # one naive call over (B, L) plus one call per chunk of completion positions
    assert len(calls) == 1 + -(-n_targets // 5)


@pytest.mark.parametrize(
    ("on_gpu", "vocab", "rows"),
    [(False, 32000, 256), (True, 32000, 4096), (True, 128256, 1024), (True, 256000, 512)],
)
def test_auto_chunk_size_fits_the_device_and_vocabulary(on_gpu, vocab, rows):
    assert resolve_chunk_size("auto", on_gpu, vocab) == rows
    assert rows * vocab <= GPU_CHUNK_LOGITS or not on_gpu
    assert resolve_chunk_size(64, on_gpu, vocab) == 64  # a number is kept


@pytest.mark.parametrize("value", [0, -3, "big", 2.5, True])
def test_a_bad_chunk_size_is_named(value):
    with pytest.raises(ConfigError, match=r"logprob_chunk_size must be an integer >= 1 or auto"):
        resolve_chunk_size(value, True, 32000)
