"""Training options end to end on the tiny model: length grouping, packing, gradient
checkpointing and a LoRA policy with the adapter-disabled reference (torch.compile:
test_compile.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from kto_lightning.cli.run_build import build
from kto_lightning.cli.run_fit import train
from kto_lightning.core.packing import Packing


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _logged_columns(run_dir: Path) -> set[str]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {k for row in rows for k, v in row.items() if v not in ("", None)}


# ------------------------------------------------------------------------------ length grouping


def test_group_by_length_trains_with_less_padding(make_config, tmp_path) -> None:
    shuffled_dir = tmp_path / "shuffled"
    shuffled = build(make_config(f"paths.output_dir={shuffled_dir}"))
    train(make_config(f"paths.output_dir={shuffled_dir}"), run=shuffled)

    grouped = build(make_config("data.batching.group_by_length=true"))
    before = _snapshot(grouped.module.policy)
    train(make_config("data.batching.group_by_length=true"), run=grouped)

    after = grouped.module.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the policy did not train"
    assert grouped.trainer.global_step == shuffled.trainer.global_step == 6
    grouped_share = grouped.module.train_padding_share
    shuffled_share = shuffled.module.train_padding_share
    assert grouped_share is not None and shuffled_share is not None
    assert 0.0 <= grouped_share < shuffled_share
    # Clearly lower, not by a rounding: sorted batches of the toy task pad little.
    assert grouped_share < 0.75 * shuffled_share, (grouped_share, shuffled_share)
    assert "train/padding" in _logged_columns(tmp_path)
    assert "val/padding" in _logged_columns(tmp_path)


# ------------------------------------------------------------------------------ packing


def test_packing_from_the_config_trains_with_the_padded_numbers(make_config, tmp_path) -> None:
    padded = build(make_config(f"paths.output_dir={tmp_path / 'padded'}"))
    packed = build(make_config("data.batching.packing=true"))
    assert padded.module.packing is None
    assert packed.module.packing == Packing(max_tokens=None)
    batch = next(iter(packed.datamodule.train_dataloader()))
    with torch.no_grad():  # the same weights (same seed) give the same log-probs, packed or not
        logps, packed_logps = (
            run.module.eval().forward_logps(batch, "train") for run in (padded, packed)
        )
    for name in ("policy", "reference", "kl_policy", "kl_reference"):
        torch.testing.assert_close(
            getattr(packed_logps, name), getattr(logps, name), rtol=1e-5, atol=1e-5
        )
    before = _snapshot(packed.module.policy)
    train(make_config("data.batching.packing=true"), run=packed)
    after = packed.module.policy.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before), "the policy did not train"
    assert packed.trainer.global_step == 6


# ------------------------------------------------------------------------------ checkpointing


def _gradients_of_one_step(run, batch: dict[str, torch.Tensor]) -> tuple[dict, int]:
    """Policy gradients of one training step, and how often backward re-ran the last layer."""
    run.module.train()
    run.module.policy.zero_grad(set_to_none=True)
    # Calls of the last decoder layer's MLP while backward runs: the recomputation, if any.
    calls = []
    layer = run.module.policy.get_decoder().layers[-1]
    handle = layer.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    loss = run.module._step(batch, "train").loss
    forward_calls = len(calls)
    loss.backward()
    handle.remove()
    grads = {n: p.grad.clone() for n, p in run.module.policy.named_parameters()}
    return grads, len(calls) - forward_calls


def test_gradient_checkpointing_gives_the_same_gradients(make_config, tmp_path) -> None:
    plain = build(make_config("callbacks=none", f"paths.output_dir={tmp_path / 'plain'}"))
    checkpointed = build(make_config("callbacks=none", "gradient_checkpointing=true"))
    assert checkpointed.module.policy.is_gradient_checkpointing
    assert not plain.module.policy.is_gradient_checkpointing
    # Same seed, same initial weights; one batch fed to both.
    for key, value in _snapshot(plain.module.policy).items():
        torch.testing.assert_close(checkpointed.module.policy.state_dict()[key], value)
    batch = next(iter(plain.datamodule.train_dataloader()))

    expected, plain_recomputed = _gradients_of_one_step(plain, batch)
    actual, recomputed = _gradients_of_one_step(checkpointed, batch)

    assert plain_recomputed == 0
    assert recomputed >= 1, "backward did not recompute the decoder layer"
    assert expected.keys() == actual.keys()
    assert all(g.abs().sum() > 0 for g in expected.values()), "every weight should get a gradient"
    for name, grad in expected.items():
        torch.testing.assert_close(actual[name], grad, rtol=0, atol=1e-6, msg=name)


# ------------------------------------------------------------------------------ LoRA + adapter


def test_lora_policy_with_adapter_reference_trains_the_adapters_only(make_config) -> None:
    overrides = (
        "reference=adapter",
        "+model.lora={r: 4, lora_alpha: 8, target_modules: all-linear}",
    )
    run = build(make_config(*overrides))
    policy = run.module.policy
    names = {id(p): n for n, p in policy.named_parameters()}
    lora = {n for n in names.values() if "lora_" in n}
    assert lora, "no LoRA parameters were added"
    assert list(run.module.reference.parameters()) == [], "the adapter reference holds no weights"

    # Before training the adapters add nothing (B starts at zero): reference = policy.
    run.module.train()
    batch = next(iter(run.datamodule.train_dataloader()))
    with torch.no_grad():
        logps = run.module.forward_logps(batch, "train")
    torch.testing.assert_close(logps.reference, logps.policy)
    torch.testing.assert_close(logps.kl_reference, logps.kl_policy)
    assert policy.training, "scoring the reference must hand the policy back in train mode"

    before = _snapshot(policy)
    train(make_config(*overrides), run=run)

    optimizer = run.trainer.optimizers[0]
    optimized = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    assert optimized and all("lora_" in n for n in optimized), optimized
    assert set(optimized) == lora
    after = policy.state_dict()
    base = [k for k in before if "lora_" not in k]
    assert base
    for key in base:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(after[k], before[k]) for k in before if "lora_B" in k)
    # Trained adapters now move the policy away from its reference.
    with torch.no_grad():
        logps = run.module.forward_logps(batch, "train")
    assert not torch.allclose(logps.reference, logps.policy)
