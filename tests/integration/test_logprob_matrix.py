"""The class of bugs, not the cases: every option that changes how log-probs are computed.

{full fine-tune, LoRA with an adapter on the LM head} x {reference=copy, cache, and adapter for
LoRA} x {fp32, bf16 autocast} x {dropout in the model config or not} x {logprob_chunk_size 1,
256}. For each: at step 0 the policy equals the reference, so rewards and the KL estimate are
exactly 0 and the policy's log-probs are the naive path's (full logits -> log_softmax -> gather
-> masked sum); after one optimizer step the gradient of the KTO loss equals the one computed
through the naive path.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from kto_lightning.core.losses import KTOLoss
from kto_lightning.core.metrics import metrics_from_sums
from kto_lightning.data import KTODataModule
from kto_lightning.models import TinyLlama
from kto_lightning.models.reference import ReferenceSpec, build_provider
from kto_lightning.training.module import KTOModule
from naive_logprobs import compute_logprobs

BATCH = 4
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "lm_head"]}
MODELS = {"full": ("copy", "cache"), "lora": ("copy", "cache", "adapter")}
CASES = [
    (model, reference, precision, dropout, chunk)
    for model, references in MODELS.items()
    for reference, precision, dropout, chunk in itertools.product(
        references, ("32-true", "bf16-mixed"), (0.0, 0.1), (1, 256)
    )
]
# bf16 rounds the logits; both paths see the same rounded logits, but a matmul's rounding can
# depend on the shape it runs in (a chunk of rows against the whole batch).
LOGP_TOL = {"32-true": 1e-4, "bf16-mixed": 0.05}
GRAD_TOL = {"32-true": 1e-4, "bf16-mixed": 0.05}


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory) -> KTODataModule:
    tokenizer = TinyLlama().load_tokenizer()
    cache = tmp_path_factory.mktemp("datasets")
    data = KTODataModule(
        tokenizer,
        source={"toy_rows": 40, "cache_dir": str(cache)},
        lengths={"max_length": 56, "max_prompt_length": 40},
        batching={"batch_size": BATCH},
    )
    data.setup("fit")
    return data


def _autocast(precision: str):
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _naive(model: torch.nn.Module, batch: dict[str, torch.Tensor], prefix: str = ""):
    ids, am, cm = (
        batch[f"{prefix}{k}"] for k in ("input_ids", "attention_mask", "completion_mask")
    )
    positions = (am.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=am, position_ids=positions).logits
    return compute_logprobs(logits[:, :-1], ids[:, 1:], cm[:, 1:])


def _module(case, datamodule: KTODataModule, cache_dir: Path) -> KTOModule:
    model, reference, precision, dropout, chunk = case
    torch.manual_seed(0)
    lora = {**LORA, "lora_dropout": dropout} if model == "lora" else None
    policy = TinyLlama(hidden_size=32, num_layers=1, dropout=dropout, lora=lora).load_policy()
    spec = ReferenceSpec(kind=reference, cache_dir=str(cache_dir), batch_size=BATCH)
    provider = build_provider(
        spec,
        policy,
        datamodule.tokenizer,
        datamodule,
        chunk,
        needs_kl_rows=True,
        precision=precision,
    )
    loss = KTOLoss(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
    optimizer = functools.partial(torch.optim.SGD, lr=0.5)
    return KTOModule(policy, provider, loss, optimizer, logprob_chunk_size=chunk).train()


def _grads(module: KTOModule, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The gradient of one step's loss, and the step's metric sums."""
    module.policy.zero_grad()
    result = module._step(batch, "train")
    result.loss.backward()
    grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    return grads, result.metric_sums


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_step_zero_is_neutral_and_every_path_is_the_naive_one(case, datamodule, tmp_path) -> None:
    precision = case[2]
    module = _module(case, datamodule, tmp_path)
    # The cache was scored in batches of BATCH rows in dataset order: the same first batch.
    batch = datamodule.collator([datamodule.train_set[i] for i in range(BATCH)])
    with _autocast(precision):
        logps = module.forward_logps(batch, "train")
        naive = _naive(module.policy, batch)
    # Policy == reference at step 0: every reward and the KL estimate are exactly 0.
    assert (logps.policy - logps.reference).abs().max() == 0
    assert (logps.kl_policy - logps.kl_reference).abs().max() == 0
    tol = LOGP_TOL[precision]
    assert_close(logps.policy, naive.float(), rtol=tol / 10, atol=tol)

    # One optimizer step, then the gradient of the next step against the naive path.
    optimizer = torch.optim.SGD([p for p in module.policy.parameters() if p.requires_grad], lr=0.5)
    with _autocast(precision):
        _grads(module, batch)
    optimizer.step()
    with _autocast(precision):
        chunked, sums = _grads(module, batch)
        moved = module.forward_logps(batch, "train").policy
        naive = _naive(module.policy, batch)
        module._logps = lambda model, batch, prefix="": _naive(model, batch, prefix)
        expected, _ = _grads(module, batch)
    # After a step LoRA's B is no longer zero: an adapter that a path bypassed would show here.
    assert_close(moved, naive.float(), rtol=LOGP_TOL[precision] / 10, atol=LOGP_TOL[precision])
    assert metrics_from_sums(sums)["rewards/margins"] != 0, "the step must move the rewards"
    assert any("lm_head" in name for name in expected), "the head must train"
    for name, grad in expected.items():
        scale = grad.abs().max()
        assert scale > 0, name
        tol = GRAD_TOL[precision]
        assert_close(chunked[name], grad, rtol=tol, atol=tol * scale, msg=name)
