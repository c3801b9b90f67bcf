"""Reference providers: the cache equals the live reference, is reused, and misses on any change."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from kto_lightning import reference as reference_module
from kto_lightning.data import KTODataModule
from kto_lightning.models import TinyLlama, byte_level_tokenizer
from kto_lightning.reference import CachedReference, CopyReference, cache_key
from kto_lightning.train import build, train


def _cache(tmp_path: Path) -> list[str]:
    return ["reference=cache", f"reference.cache_dir={tmp_path / 'cache'}"]


def _cache_files(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "cache").glob("*.safetensors")}


def _train_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [float(r["train/loss"]) for r in csv.DictReader(handle) if r.get("train/loss")]


def test_cached_log_probs_equal_the_live_reference(make_config, tmp_path) -> None:
    live = build(make_config())
    cached = build(make_config(*_cache(tmp_path)))
    assert isinstance(live.module.reference, CopyReference)
    assert isinstance(cached.module.reference, CachedReference)
    for split, loader in (
        ("train", live.datamodule.train_dataloader()),
        ("validation", live.datamodule.val_dataloader()),
    ):
        for batch in loader:
            a = live.module.forward_logps(batch, split)
            b = cached.module.forward_logps(batch, split)
            torch.testing.assert_close(b["reference"], a["reference"], rtol=0, atol=1e-5)
            torch.testing.assert_close(b["kl_reference"], a["kl_reference"], rtol=0, atol=1e-5)


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
    build(make_config(*_cache(tmp_path)))
    files = _cache_files(tmp_path)
    assert len(files) == 1

    def must_not_score(*args, **kwargs):
        raise AssertionError("the reference log-probs were computed again")

    def must_not_copy(*args, **kwargs):
        raise AssertionError("a reference model was built")

    monkeypatch.setattr(reference_module, "fill_cache", must_not_score)
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
        "data.max_length=160",
        "data.max_prompt_length=48",
        "loss.estimator=batch",  # no KL rows any more
        "model.hidden_size=32",
    ],
)
def test_a_change_to_any_hashed_input_misses_the_cache(make_config, tmp_path, change) -> None:
    build(make_config(*_cache(tmp_path)))
    first = _cache_files(tmp_path)
    build(make_config(*_cache(tmp_path), change))
    assert len(_cache_files(tmp_path) - first) == 1, f"{change} should have missed the cache"


def _datamodule(tokenizer, **kwargs) -> KTODataModule:
    dm = KTODataModule(tokenizer, source="toy", toy_rows=60, batch_size=4, **kwargs)
    dm.setup()
    return dm


def test_cache_key_follows_weights_tokenizer_and_data() -> None:
    torch.manual_seed(0)
    model = TinyLlama(hidden_size=32, num_layers=1).load_policy()
    tokenizer = byte_level_tokenizer()
    dm = _datamodule(tokenizer)
    splits = {"train": dm.train_set, "validation": dm.val_set}

    def key(model=model, tokenizer=tokenizer, splits=splits, max_length=256, with_kl=True):
        return cache_key(model, tokenizer, splits, max_length, 128, with_kl)

    base = key()
    assert key() == base, "the key must be reproducible"
    rebuilt = _datamodule(byte_level_tokenizer())
    same_data = {"train": rebuilt.train_set, "validation": rebuilt.val_set}
    assert key(splits=same_data) == base, "the same data built again gives the same key"

    other_tokenizer = byte_level_tokenizer()
    other_tokenizer.chat_template = "{{ messages }}"
    assert key(tokenizer=other_tokenizer) != base
    assert key(max_length=200) != base
    assert key(with_kl=False) != base
    reseeded = _datamodule(tokenizer, seed=1)
    assert key(splits={"train": reseeded.train_set, "validation": reseeded.val_set}) != base
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-3
    assert key() != base, "a change to one weight must miss"
