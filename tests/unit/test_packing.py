"""Padding-free batches (core/packing.py): the packed layout by hand, and packed log-probs,
loss and gradients equal to the padded path's (fp32, 1e-5) for main and KL rows."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close
from transformers import masking_utils

from kto_lightning.core.logprobs import batch_logprobs
from kto_lightning.core.losses import KTOLoss
from kto_lightning.core.packing import Packing, first_fit, pack_rows
from kto_lightning.data.collate import KTOCollator
from kto_lightning.data.config import Batching
from kto_lightning.errors import ConfigError
from kto_lightning.models import TinyLlama, make_reference
from kto_lightning.models.reference import AdapterReference, CopyReference
from kto_lightning.training.module import KTOModule

PAD = 258
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "lm_head"]}


def _batch(seed: int = 0, rows: int = 6, scale: int = 1) -> dict[str, torch.Tensor]:
    """Rows of very different lengths (3 to 40 tokens, times `scale`), each with a KL partner,
    right-padded."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        n = int(torch.randint(lo * scale, hi * scale, (1,), generator=g))
        return torch.randint(0, 256, (n,), generator=g).tolist()

    examples = [
        SimpleNamespace(
            prompt_ids=ids(1, 12),
            completion_ids=ids(2, 28),
            kl_completion_ids=ids(2, 28),
            label=i % 2 == 0,
            index=i,
        )
        for i in range(rows)
    ]
    return KTOCollator(PAD, needs_kl_rows=True)(examples)  # type: ignore[arg-type]


def test_first_fit_by_hand() -> None:
    # Longest first: 5 -> bin 0, 4 -> bin 1, 3 -> bin 2 (fits neither), 2 -> bin 2 (3 + 2 = 5),
    # 1 -> bin 1 (4 + 1 = 5).
    bins, offsets, fill = first_fit([3, 5, 1, 4, 2], budget=5)
    assert bins == [2, 0, 1, 1, 2]
    assert offsets == [0, 0, 4, 0, 3]
    assert fill == [5, 5, 5]
    with pytest.raises(ValueError, match="a row of 6 tokens"):
        first_fit([6], budget=5)


def test_pack_rows_by_hand() -> None:
    # Rows of 3 and 2 real tokens (right-padded to 4), completions from the 2nd and 1st token.
    ids = torch.tensor([[10, 11, 12, 0], [20, 21, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    completion = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    packed = pack_rows(ids, attention, completion, budget=8)
    assert packed.input_ids.tolist() == [[10, 11, 12, 20, 21]]  # one pack, no padding
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1]]  # restart at each row
    # Targets 11, 12 (row 0) and 21 (row 1; 20 is its row's first token, which nothing
    # predicts), each predicted by the slot before it.
    assert packed.targets.tolist() == [11, 12, 21]
    assert packed.hidden_index.tolist() == [0, 1, 3]
    assert packed.row.tolist() == [0, 0, 1]
    # The default budget is the longest row: 3 tokens, so two packs of width 3.
    packed = pack_rows(ids, attention, completion)
    assert packed.input_ids.tolist() == [[10, 11, 12], [20, 21, 0]]
    assert packed.position_ids.tolist() == [[0, 1, 2], [0, 1, 0]]


def test_batching_packing_keys() -> None:
    assert Batching().packed is None  # padded by default
    assert Batching(packing=True).packed == Packing(None)
    assert Batching(packing=True, max_tokens_per_pack=512).packed == Packing(512)
    with pytest.raises(ConfigError, match=r"data\.batching\.max_tokens_per_pack"):
        Batching(packing=True, max_tokens_per_pack=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("max_tokens", [None, 64, 10_000])
def test_packed_logprobs_equal_padded(
    attn: str, max_tokens: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = TinyLlama(hidden_size=32, num_layers=2).load_policy().eval()
    model.set_attn_implementation(attn)
    batch = _batch()
    lengths = torch.cat([batch["attention_mask"], batch["kl_attention_mask"]]).sum(-1)
    assert lengths.min() < lengths.max() / 2, "the rows must be of mixed lengths"
    with torch.no_grad():
        main, kl = batch_logprobs(model, batch, 7, needs_kl_rows=True)
        packed_main, packed_kl = batch_logprobs(model, batch, 7, True, Packing(max_tokens))
    assert kl is not None and packed_kl is not None
    assert_close(packed_main, main, rtol=1e-5, atol=1e-5)
    assert_close(packed_kl, kl, rtol=1e-5, atol=1e-5)
    # Fewer slots than padded, and the equality above rests on the block-diagonal mask: if
    # transformers stopped reading row boundaries from the position ids, rows would attend to
    # each other and the numbers would move.
    packed = pack_rows(
        torch.cat([batch["input_ids"], batch["kl_input_ids"]]),
        torch.cat([batch["attention_mask"], batch["kl_attention_mask"]]),
        torch.cat([batch["completion_mask"], batch["kl_completion_mask"]]),
        max_tokens,
    )
    assert packed.input_ids.numel() < lengths.numel() * batch["input_ids"].shape[1]
    if packed.input_ids.shape[0] < lengths.numel():  # some pack holds two rows
        monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda ids: None)
        with torch.no_grad():
            leaky_main, leaky_kl = batch_logprobs(model, batch, 7, True, Packing(max_tokens))
        assert not torch.allclose(torch.cat([leaky_main, leaky_kl]), torch.cat([main, kl]))


def test_packs_go_to_a_flash_kernel_laid_end_to_end(monkeypatch: pytest.MonkeyPatch) -> None:
    # transformers' flash attention reads packed rows' bounds from the position ids only for a
    # batch of one sequence (_is_packed_sequence); given (P, T) it runs plain causal attention
    # across the rows of a pack. Under a flash implementation the packs go as (1, P * T): here the
    # model runs sdpa (no flash kernel on a CPU) while the code sees "flash_attention_2", and the
    # numbers must still equal the padded ones (so the flat indices fit the end-to-end layout).
    from kto_lightning.core import logprobs

    torch.manual_seed(0)
    model = TinyLlama(hidden_size=32, num_layers=2).load_policy().eval()
    batch = _batch()
    with torch.no_grad():
        main, kl = batch_logprobs(model, batch, 7, needs_kl_rows=True)
    backbone, shapes = logprobs._backbone(model), []

    def as_sdpa(**kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        model.config._attn_implementation = "sdpa"
        try:
            return backbone(**kwargs)
        finally:
            model.config._attn_implementation = "flash_attention_2"

    monkeypatch.setattr(logprobs, "_backbone", lambda _: as_sdpa)
    model.config._attn_implementation = "flash_attention_2"
    with torch.no_grad():
        packed_main, packed_kl = batch_logprobs(model, batch, 7, True, Packing(64))
    assert shapes and all(shape[0] == 1 for shape in shapes), shapes
    assert_close(packed_main, main, rtol=1e-5, atol=1e-5)
    assert_close(packed_kl, kl, rtol=1e-5, atol=1e-5)


def _module(reference: str, packing: Packing | None, moved: bool = True) -> KTOModule:
    torch.manual_seed(0)
    lora = LORA if reference == "adapter" else None
    policy = TinyLlama(hidden_size=32, num_layers=2, lora=lora).load_policy()
    provider = CopyReference(make_reference(policy)) if reference == "copy" else AdapterReference()
    if lora is not None:  # PEFT starts lora_B at 0: the adapters change nothing yet
        assert all(p.abs().sum() == 0 for n, p in policy.named_parameters() if "lora_B" in n)
    # Move the policy off the reference, so that the rewards and the KL term are not all 0.
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad and moved:
                p.add_(0.02 * torch.randn_like(p))
    loss = KTOLoss(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
    optimizer = functools.partial(torch.optim.SGD, lr=0.1)
    return KTOModule(policy, provider, loss, optimizer, logprob_chunk_size=5, packing=packing)


@pytest.mark.parametrize("reference", ["copy", "adapter"])
def test_packed_training_step_equals_padded(reference: str) -> None:
    batch = _batch(seed=1, rows=8)
    results = {}
    for name, packing in (("padded", None), ("packed", Packing())):
        module = _module(reference, packing).train()
        step = module._step(batch, "train")
        step.loss.backward()
        grads = {n: p.grad for n, p in module.policy.named_parameters() if p.requires_grad}
        results[name] = (step.loss.detach(), step.metric_sums, grads)
    (loss, sums, grads), (packed_loss, packed_sums, packed_grads) = results.values()
    assert loss != 0
    assert_close(packed_loss, loss, rtol=1e-5, atol=1e-5)
    assert_close(packed_sums, sums, rtol=1e-5, atol=1e-5)  # rewards, KL, padding share alike
    assert grads.keys() == packed_grads.keys()
    for name, grad in grads.items():
        scale = grad.abs().max()
        assert scale > 0, name
        assert_close(packed_grads[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("reference", ["copy", "adapter"])
def test_packed_live_reference_equals_the_packed_policy_exactly_at_step_0(reference: str) -> None:
    # The reference packs main and KL rows as the policy's passes do, so before any update the
    # log-ratios are exactly 0 (not float rounding of other packs), for main and KL rows.
    module = _module(reference, Packing(), moved=False).train()
    logps = module.forward_logps(_batch(seed=2, rows=16, scale=6), "train")  # up to 240 tokens
    assert logps.kl_policy is not None and logps.kl_reference is not None
    assert torch.equal(logps.policy.detach(), logps.reference)
    assert torch.equal(logps.kl_policy, logps.kl_reference)
