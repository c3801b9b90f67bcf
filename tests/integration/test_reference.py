"""Reference providers: the cache equals the live reference, is reused, and misses on any change;
the default (`auto`) is the disabled adapters with LoRA and the frozen copy without."""

from __future__ import annotations

import contextlib
import copy
import csv
import functools
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from kto_lightning.cli.run_build import Run, build
from kto_lightning.cli.run_fit import train
from kto_lightning.core.logprobs import batch_logprobs
from kto_lightning.core.losses import KTOLoss
from kto_lightning.core.metrics import FIELDS
from kto_lightning.data import KTODataModule
from kto_lightning.errors import ConfigError
from kto_lightning.models import TinyLlama, reference_cache
from kto_lightning.models.byte_tokenizer import byte_level_tokenizer
from kto_lightning.models.cache_key import cache_key
from kto_lightning.models.reference import (
    AdapterReference,
    CachedReference,
    CopyReference,
    ReferenceSpec,
    build_provider,
    configured_kind,
)
from kto_lightning.training.module import KTOModule


def _cache(tmp_path: Path) -> list[str]:
    return ["reference=cache", f"reference.cache_dir={tmp_path / 'cache'}"]


def _cache_files(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "cache").glob("*.safetensors")}


def _prepared(run: Run) -> Run:
    """`run` with its reference ready, as `trainer.fit` makes it (KTOModule.setup, every rank)."""
    run.module.setup("fit")
    return run


def _train_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [float(r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss")]


def test_cached_log_probs_equal_the_live_reference(make_config, tmp_path) -> None:
    live = build(make_config())
    cached = build(make_config(*_cache(tmp_path)))
    assert isinstance(live.module.reference, CopyReference)
    assert isinstance(cached.module.reference, CachedReference)
    assert not _cache_files(tmp_path), "the trainer fills the cache, once it has started every rank"
    _prepared(cached)
    assert len(_cache_files(tmp_path)) == 1
    for split, loader in (
        ("train", live.datamodule.train_dataloader()),
        ("validation", live.datamodule.val_dataloader()),
    ):
        for batch in loader:
            a = live.module.forward_logps(batch, split)
            b = cached.module.forward_logps(batch, split)
            torch.testing.assert_close(b.reference, a.reference, rtol=0, atol=1e-5)
            torch.testing.assert_close(b.kl_reference, a.kl_reference, rtol=0, atol=1e-5)


def test_training_with_the_cache_gives_the_live_losses(make_config, tmp_path) -> None:
    live_dir, cached_dir = tmp_path / "live", tmp_path / "cached"
    train(make_config(f"paths.output_dir={live_dir}"))
    train(make_config(f"paths.output_dir={cached_dir}", *_cache(tmp_path)))
    live, cached = _train_losses(live_dir), _train_losses(cached_dir)
    assert len(live) == len(cached) >= 4
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(live), rtol=0, atol=1e-5)


def test_a_second_run_reuses_the_cache_and_loads_no_reference(
    make_config, tmp_path, monkeypatch
) -> None:
    _prepared(build(make_config(*_cache(tmp_path))))
    files = _cache_files(tmp_path)
    assert len(files) == 1

    def must_not_score(*args, **kwargs):
        raise AssertionError("the reference log-probs were computed again")

    def must_not_copy(*args, **kwargs):
        raise AssertionError("a reference model was built")

    monkeypatch.setattr(reference_cache, "fill_cache", must_not_score)
    monkeypatch.setattr("kto_lightning.models.make_reference", must_not_copy)
    for beta in (0.05, 0.3):  # a sweep over beta shares the cache
        run = build(make_config(*_cache(tmp_path), f"loss.beta={beta}"))
        assert not list(run.module.reference.parameters()), "no reference weights in memory"
        train(make_config(*_cache(tmp_path), f"loss.beta={beta}"), run=run)
    assert _cache_files(tmp_path) == files

    checkpoint = torch.load(
        tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert not [k for k in checkpoint["state_dict"] if k.startswith("reference")]


@pytest.mark.parametrize(
    "change",
    [
        "seed=7",  # other initial weights (and another pairing)
        "data.seed=7",  # the same weights, another KL pairing and split
        "data.lengths.max_length=160",
        "data.lengths.max_prompt_length=48",
        "loss.estimator=batch",  # no KL rows any more
        "model.hidden_size=32",
        "trainer.precision=bf16-mixed",  # scored under autocast: another table
    ],
)
def test_a_change_to_any_hashed_input_misses_the_cache(make_config, tmp_path, change) -> None:
    _prepared(build(make_config(*_cache(tmp_path))))
    first = _cache_files(tmp_path)
    _prepared(build(make_config(*_cache(tmp_path), change)))
    assert len(_cache_files(tmp_path) - first) == 1, f"{change} should have missed the cache"


def _datamodule(tokenizer, **kwargs) -> KTODataModule:
    source = {"path": "toy", "toy_rows": 60}
    dm = KTODataModule(tokenizer, source=source, batching={"batch_size": 4}, **kwargs)
    dm.setup()
    return dm


def test_cache_key_follows_weights_tokenizer_and_data() -> None:
    torch.manual_seed(0)
    model = TinyLlama(hidden_size=32, num_layers=1).load_policy()
    tokenizer = byte_level_tokenizer()
    dm = _datamodule(tokenizer)
    splits = {"train": dm.train_set, "validation": dm.val_set}

    def key(
        model=model, tokenizer=tokenizer, splits=splits, max_length=256, needs_kl_rows=True,
        precision="32-true",
    ):  # fmt: skip
        return cache_key(
            model, tokenizer, splits, max_length, 128, needs_kl_rows, precision=precision
        )

    base = key()
    assert key() == base, "the key must be reproducible"
    rebuilt = _datamodule(byte_level_tokenizer())
    same_data = {"train": rebuilt.train_set, "validation": rebuilt.val_set}
    assert key(splits=same_data) == base, "the same data built again gives the same key"

    other_tokenizer = byte_level_tokenizer()
    other_tokenizer.chat_template = "{{ messages }}"
    assert key(tokenizer=other_tokenizer) != base
    assert key(max_length=200) != base
    assert key(needs_kl_rows=False) != base
    precisions = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true")
    keys = {key(precision=precision) for precision in precisions}
    assert len(keys) == len(precisions), "a bf16 run must never read an fp32 table"
    reseeded = _datamodule(tokenizer, seed=1)
    assert key(splits={"train": reseeded.train_set, "validation": reseeded.val_set}) != base
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-3
    assert key() != base, "a change to one weight must miss"


def _cache_batches(datamodule, batch_size: int):
    """(split, batch) as `build_provider` batches rows to fill the cache.

    At step 0 only precision and batch shapes separate the policy from its cached scores. Other
    batches pad rows to other lengths, which moves a bf16 result by a rounding step now and then;
    on these the comparison is exact, so any precision mismatch shows.
    """
    for split, dataset in (("train", datamodule.train_set), ("validation", datamodule.val_set)):
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=datamodule.collator)
        for batch in loader:
            yield split, batch


def _step_zero(run, split: str, batch: dict[str, torch.Tensor]):
    """Step-0 log-probs and metric sums of `run` on `batch`, as a bf16-mixed CPU step runs them."""
    run.module.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps = run.module.forward_logps(batch, split)
        sums = run.module._step(batch, split).metric_sums
    return logps, dict(zip(FIELDS, sums.tolist(), strict=True))


def test_bf16_mixed_cache_gives_zero_log_ratios_at_step_zero(
    make_config, tmp_path, monkeypatch
) -> None:
    # Only step-0 forwards: no optimizer step, so fused AdamW and clipping play no part here.
    # The comparison runs on the CPU, so the cache is scored there too, even beside a GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bf16 = ["trainer.precision=bf16-mixed", "trainer.accelerator=cpu"]
    live = build(make_config(*bf16))
    cached = _prepared(build(make_config(*bf16, *_cache(tmp_path), "reference.batch_size=8")))
    assert isinstance(cached.module.reference, CachedReference)
    offsets = []
    for split, batch in _cache_batches(live.datamodule, batch_size=8):
        a, live_sums = _step_zero(live, split, batch)
        b, cached_sums = _step_zero(cached, split, batch)
        # The live copy runs under the same autocast as the policy: exactly 0.
        assert torch.equal(a.policy, a.reference)
        assert torch.equal(a.kl_policy, a.kl_reference)
        offsets.append((b.policy - b.reference).mean().item())
        offsets.append((b.kl_policy - b.kl_reference).mean().item())
        assert torch.equal(b.policy, b.reference), f"mean offset {offsets[-2]:.3g}"
        assert torch.equal(b.kl_policy, b.kl_reference), f"KL offset {offsets[-1]:.3g}"
        assert torch.equal(b.reference, a.reference)
        assert torch.equal(b.kl_reference, a.kl_reference)
        for name in ("reward_desirable_sum", "reward_undesirable_sum", "kl_sum"):
            assert live_sums[name] == cached_sums[name] == 0.0, name
    assert len(offsets) >= 4 and all(offset == 0.0 for offset in offsets)


@pytest.mark.parametrize(
    "precision", ["32-true", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true"]
)
def test_the_cache_is_scored_as_lightning_runs_the_policy(tmp_path, monkeypatch, precision) -> None:
    """Lightning's own precision plugin is the oracle: it converts the module and runs the step."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPU here, as the cache
    with pytest.warns(UserWarning) if precision == "16-mixed" else contextlib.nullcontext():
        trainer = L.Trainer(accelerator="cpu", precision=precision, logger=False)
    plugin = trainer.precision_plugin
    torch.manual_seed(0)
    policy = TinyLlama(hidden_size=32, num_layers=1).load_policy()
    tokenizer = byte_level_tokenizer()
    dm = _datamodule(tokenizer)
    spec = ReferenceSpec(kind="cache", cache_dir=str(tmp_path), batch_size=8)
    reference = build_provider(spec, policy, tokenizer, dm, 64, True, precision=precision)
    loss = KTOLoss(beta=0.1)
    module = KTOModule(policy, reference, loss, functools.partial(torch.optim.SGD))
    module = plugin.convert_module(module)  # *-true: the policy and any float buffer change dtype
    module.train()
    for split, batch in _cache_batches(dm, spec.batch_size):
        with plugin.forward_context():
            logps = module.forward_logps(batch, split)
        assert torch.equal(logps.policy, logps.reference)
        assert torch.equal(logps.kl_policy, logps.kl_reference)


@pytest.mark.parametrize("precision", ["transformer-engine", "8-mixed"])
def test_a_precision_the_cache_cannot_match_names_the_key(tmp_path, precision) -> None:
    torch.manual_seed(0)
    policy = TinyLlama(hidden_size=32, num_layers=1).load_policy()
    tokenizer = byte_level_tokenizer()
    spec = ReferenceSpec(kind="cache", cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"trainer\.precision") as info:
        build_provider(
            spec, policy, tokenizer, _datamodule(tokenizer), 64, True, precision=precision
        )
    assert repr(precision) in str(info.value)


def test_bf16_mixed_copy_holds_linear_weights_in_bf16_and_scores_the_same(
    make_config, monkeypatch
) -> None:
    # Under bf16-mixed the frozen copy's linear layers hold bf16 weights: about half its memory,
    # and no cast of them in each forward. Embeddings and norms stay fp32, so under autocast it
    # scores bit for bit what an fp32 copy scores.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    run = build(make_config("trainer.precision=bf16-mixed", "trainer.accelerator=cpu"))
    model = run.module.reference.model
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
    others = [
        p for m in model.modules() if not isinstance(m, torch.nn.Linear)
        for p in m.parameters(recurse=False)
    ]  # fmt: skip
    assert others and all(p.dtype == torch.float32 for p in others)
    # The policy trains in fp32 master weights, untouched.
    assert all(p.dtype == torch.float32 for p in run.module.policy.parameters())
    fp32_copy = copy.deepcopy(run.module.policy).eval()
    batch = next(iter(run.datamodule.val_dataloader()))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        held = batch_logprobs(model, batch, 64, needs_kl_rows=True)
        full = batch_logprobs(fp32_copy, batch, 64, needs_kl_rows=True)
    assert torch.equal(held[0], full[0]) and torch.equal(held[1], full[1])


# ------------------------------------------------------------------- the default: reference=auto

LORA = "+model.lora={r: 4, lora_alpha: 8, target_modules: all-linear}"


def test_lora_with_no_reference_chosen_uses_the_disabled_adapters(make_config, caplog) -> None:
    cfg = make_config(LORA)
    assert cfg.reference.kind == "auto"
    with caplog.at_level(logging.INFO, logger="kto_lightning"):
        run = build(cfg)
    assert isinstance(run.module.reference, AdapterReference)
    # No second model: every weight the module holds is the policy's.
    assert list(run.module.parameters()) == list(run.module.policy.parameters())
    assert "reference: adapter (reference=auto: the policy has LoRA adapters)" in caplog.text
    assert run.module.run_config["resolved_reference"] == "adapter"  # for the model card


def test_no_lora_and_no_reference_chosen_is_the_copy_it_always_was(make_config, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="kto_lightning"):
        auto = build(make_config())
    assert "reference: copy (reference=auto: the policy has no LoRA adapters)" in caplog.text
    explicit = build(make_config("reference=copy"))
    assert isinstance(auto.module.reference, CopyReference)
    batch = next(iter(auto.datamodule.train_dataloader()))
    with torch.no_grad():
        a, b = (
            auto.module.forward_logps(batch, "train"),
            explicit.module.forward_logps(batch, "train"),
        )
    assert torch.equal(a.reference, b.reference) and torch.equal(a.kl_reference, b.kl_reference)


def test_an_explicit_copy_with_lora_is_honoured_and_says_what_it_costs(make_config, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="kto_lightning"):
        run = build(make_config(LORA, "reference=copy"))
    reference = run.module.reference
    assert isinstance(reference, CopyReference)
    count = sum(p.numel() for p in reference.model.parameters())
    size = sum(p.numel() * p.element_size() for p in reference.model.parameters())
    assert count > 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reference:")]
    assert lines == [
        f"reference: copy, a frozen copy of the initial policy: {count:,} parameters, "
        f"{size / 2**20:,.1f} MiB beside the policy; reference=adapter (the default with "
        "model.lora) gives the same log-probs from the policy with its adapters disabled, at no "
        "extra memory"
    ]


def test_a_run_config_that_says_auto_rebuilds_the_reference_it_trained_with() -> None:
    # evaluate and generate rebuild the reference from the run's config (kind: auto) and the
    # policy rebuilt from its model config: with LoRA the adapters, without them a copy.
    tokenizer = byte_level_tokenizer()
    spec = ReferenceSpec(kind="auto")
    plain = TinyLlama(hidden_size=32, num_layers=1).load_policy()
    lora = TinyLlama(hidden_size=32, num_layers=1, lora={"r": 4, "target_modules": "all-linear"})
    adapted = lora.load_policy()
    assert isinstance(build_provider(spec, plain, tokenizer, None, 64, True), CopyReference)
    assert isinstance(build_provider(spec, adapted, tokenizer, None, 64, True), AdapterReference)
    # The same answer from the config's values alone, for code that compares run configs.
    assert configured_kind("auto", {"r": 4}) == "adapter"
    assert configured_kind("auto", None) == configured_kind("copy", {"r": 4}) == "copy"
