"""`compile.enabled`: each decoder layer compiled in place (kto_lightning.training.compiling).

Which modules are found and compiled, that one compiled graph serves every layer of the policy and
of the reference whatever the depth, that compiled layers compute what eager ones do (LoRA and
gradient checkpointing included), that generation compiles nothing, and a compiled run through
the entry point with the default inductor backend.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from kto_lightning.cli.run_build import build
from kto_lightning.cli.run_fit import train
from kto_lightning.common.compile_stance import eager
from kto_lightning.errors import ConfigError
from kto_lightning.models import TinyLlama, make_reference
from kto_lightning.training.callbacks import GenerationsTable
from kto_lightning.training.compiling import compile_decoder_layers, decoder_layers

LORA = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}


@pytest.fixture(autouse=True)
def _fresh_compiler() -> Iterator[None]:
    # Compiled entries live on code objects that every decoder layer class shares, and count
    # against one recompile limit: each test starts, and leaves, with none.
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _is_compiled(module: nn.Module) -> bool:
    return module._compiled_call_impl is not None  # set by nn.Module.compile


def _batch(rows: int = 3, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 256, (rows, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -4:] = 0  # one right-padded row
    return input_ids, attention_mask


def _loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return logits.float().logsumexp(-1).mean()


# ------------------------------------------------------------------------------ finding layers


def test_decoder_layers_are_the_blocks_of_a_plain_and_a_lora_model() -> None:
    plain = TinyLlama(num_layers=3).load_policy()
    assert decoder_layers(plain) == list(plain.model.layers)

    lora = TinyLlama(num_layers=3, lora=LORA).load_policy()
    layers = decoder_layers(lora)
    base_layers = list(lora.get_base_model().model.layers)
    assert len(layers) == 3
    assert all(found is block for found, block in zip(layers, base_layers, strict=True))
    # The adapters are inside the layers, not layers of their own.
    assert any("lora_A" in name for name, _ in layers[0].named_modules())


def test_decoder_layers_fall_back_to_the_layers_list_and_name_the_key() -> None:
    model = TinyLlama(num_layers=2).load_policy()
    for module in model.modules():  # a model that does not say which classes are blocks
        module._no_split_modules = None
    assert decoder_layers(model) == list(model.model.layers)

    with pytest.raises(ConfigError, match=r"compile\.enabled=true: found no decoder layers"):
        decoder_layers(nn.Sequential(nn.Linear(2, 2)))


# ------------------------------------------------------------------------------ the compile


@pytest.mark.parametrize("num_layers", [2, 4])
def test_one_compiled_graph_serves_every_layer_of_policy_and_reference(num_layers: int) -> None:
    policy = TinyLlama(num_layers=num_layers).load_policy().train()
    reference = make_reference(policy)
    keys = list(policy.state_dict())

    for model in (policy, reference):
        compiled = compile_decoder_layers(model, backend="aot_eager")
        assert compiled == list(model.model.layers)
        assert all(_is_compiled(layer) for layer in compiled)
        assert not _is_compiled(model.model), "the decoder itself must stay uncompiled"
        assert not _is_compiled(model)
    assert list(policy.state_dict()) == keys, "compiling must not rename any weight"

    input_ids, attention_mask = _batch()
    _loss(policy, input_ids, attention_mask).backward()
    with torch.no_grad():
        _loss(reference, input_ids, attention_mask)
    # Two ways of calling a layer (training with grad; frozen, eval and no_grad): two graphs,
    # shared by every layer of both models, at any depth.
    assert counters["stats"]["unique_graphs"] == 2
    assert counters["frames"]["ok"] == 2


@pytest.mark.parametrize("dynamic", [None, True, False])
def test_compiled_layers_match_eager_with_lora_and_gradient_checkpointing(
    dynamic: bool | None,
) -> None:
    eager_model = TinyLlama(num_layers=2, lora=LORA).load_policy()
    for name, parameter in eager_model.named_parameters():
        if "lora_B" in name:  # adapters that act (B starts at zero)
            nn.init.normal_(parameter, std=0.1)
    models = (eager_model, copy.deepcopy(eager_model))
    for model in models:
        model.train().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    assert len(compile_decoder_layers(models[1], backend="aot_eager", dynamic=dynamic)) == 2

    for length in (12, 9, 15):  # new lengths: torch recompiles, or not, as `dynamic` says
        input_ids, attention_mask = _batch(length=length)
        losses = [_loss(model, input_ids, attention_mask) for model in models]
        torch.testing.assert_close(losses[1], losses[0])
        for loss in losses:
            loss.backward()
    grads = [
        {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
        for model in models
    ]
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)
    assert counters["frames"]["ok"] > 0, "nothing was compiled"


def test_generation_under_eager_compiles_nothing() -> None:
    model = TinyLlama(num_layers=2).load_policy().eval()
    compile_decoder_layers(model, backend="eager")
    prompt = torch.tensor([[256, 72, 105]])  # BOS "Hi"
    options = {"max_new_tokens": 2, "do_sample": False, "pad_token_id": 258}
    with torch.no_grad(), eager():
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **options)
    assert counters["frames"]["total"] == 0
    # Compiled, generation costs an entry per layer (each reads its own slot of the KV cache):
    # entries that count against the limit every way of calling the layers shares.
    with torch.no_grad():
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **options)
    assert counters["frames"]["total"] >= 2


# ------------------------------------------------------------------------------ entry point


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_compiled_run_trains_and_keeps_checkpoint_keys(make_config, tmp_path: Path) -> None:
    # The default backend, inductor, on the training step only: each way of calling the layers
    # costs seconds of C++ compiling on a CPU, so validation's two are the next test's.
    overrides = (
        "compile.enabled=true",
        "compile.dynamic=true",  # one graph per way of calling, whatever the lengths
        "validate_before_training=false",
        "trainer.limit_val_batches=0",
        "trainer.limit_train_batches=3",
    )
    run = build(make_config(*overrides))
    policy, reference = run.module.policy, run.module.reference.model
    for model in (policy, reference):
        assert all(_is_compiled(layer) for layer in model.model.layers)
        assert not _is_compiled(model.model), "the decoder itself must stay uncompiled"
    before, reference_before = _snapshot(policy), _snapshot(reference)

    train(make_config(*overrides), run=run)

    assert run.trainer.global_step == 3
    assert counters["frames"]["ok"] > 0, "nothing was compiled"
    after = policy.state_dict()
    assert set(after) == set(before)
    assert all(not torch.equal(before[k], after[k]) for k in before), "every weight should move"
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(value, reference_before[key], rtol=0, atol=0, msg=key)
    # The checkpoint holds the trainable weights under the names an uncompiled model gives them.
    checkpoint = torch.load(
        tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    uncompiled = TinyLlama(num_layers=len(policy.model.layers)).load_policy()
    names = {f"policy.{name}" for name, _ in uncompiled.named_parameters()}
    assert set(checkpoint["state_dict"]) == names
    # Inductor's kernels score what eager ones do (the ways of calling the layers that training
    # compiled: nothing new to compile).
    batch = next(iter(run.datamodule.train_dataloader()))
    frames = counters["frames"]["total"]
    with torch.no_grad():
        compiled = run.module.train().forward_logps(batch, "train")
        with eager():
            expected = run.module.forward_logps(batch, "train")
    assert counters["frames"]["total"] == frames
    for name in ("policy", "reference", "kl_policy", "kl_reference"):
        torch.testing.assert_close(
            getattr(compiled, name), getattr(expected, name), rtol=1e-4, atol=1e-3, msg=name
        )


def test_validation_and_generation_leave_the_training_step_compiled(
    make_config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default run: validation before training and after, each with its table of generations.
    # Generation must compile nothing: with a KV cache, every layer needs its own entry, and
    # once the layers' entries reach their limit, new ways of calling them (the training step,
    # after the first validation) run eagerly, with one warning. The eager backend: which entries
    # exist does not depend on the backend.
    compiled_by_generation = []
    generate = GenerationsTable.generate

    def counting_generate(self, trainer, pl_module):
        frames = counters["frames"]["total"]
        rows = generate(self, trainer, pl_module)
        compiled_by_generation.append(counters["frames"]["total"] - frames)
        return rows

    monkeypatch.setattr(GenerationsTable, "generate", counting_generate)
    overrides = ("compile.enabled=true", "compile.backend=eager", "trainer.limit_train_batches=3")
    run = build(make_config(*overrides))
    # Past the limit, a way of calling the layers that is not compiled yet fails here.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        train(make_config(*overrides), run=run)

    assert run.trainer.global_step == 3
    assert len(compiled_by_generation) == 2, "validation before and after training"
    assert not any(compiled_by_generation), compiled_by_generation
    assert counters["frames"]["ok"] > 0, "nothing was compiled"
