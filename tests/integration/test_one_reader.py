"""One reader of a run directory: generate, export and evaluate take a run's config from the same
place (kto_lightning.runs.run_record: the named checkpoint's, else last.ckpt's, else .hydra's), so a
.hydra/config.yaml edited after the run cannot make one tool rebuild another model than the rest."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kto_lightning.cli import generation as generate
from kto_lightning.cli import hf_export
from kto_lightning.cli.evaluation_target import build_models, load_tokenizer, resolve_target
from kto_lightning.cli.run_build import build
from kto_lightning.runs.checkpointing import RUN_CONFIG_KEY


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_generate_export_and_evaluate_follow_the_checkpoint_not_an_edited_hydra_file(
    make_config, tmp_path: Path
) -> None:
    # A run directory as training leaves it, without training: build() seeds and builds as a run
    # does; its last.ckpt stores the run config.
    cfg = make_config()
    run = build(cfg)
    trained = run.module.run_config
    policy = run.module.policy
    hf_export.export_policy(policy, run.datamodule.tokenizer, tmp_path / "hf_model")
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    state = {f"policy.{key}": value for key, value in policy.state_dict().items()}
    torch.save({"state_dict": state, RUN_CONFIG_KEY: trained, "global_step": 3}, ckpt)
    # Then someone edits .hydra/config.yaml: another seed and another model size.
    edited = OmegaConf.merge(cfg, {"seed": cfg.seed + 1, "model": {"hidden_size": 32}})
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(edited, tmp_path / ".hydra" / "config.yaml")

    # generate: the run directory (its hf_model/) and the checkpoint both give the run's config.
    with contextlib.ExitStack() as stack:
        for name in (tmp_path, tmp_path / "hf_model", ckpt):
            config = generate.resolve(str(name), stack).run_config
            assert config is not None, name
            assert (config["seed"], config["model"]) == (trained["seed"], trained["model"]), name
        # compare=true's base model is the run's step-0 policy, not a model of the edited size.
        target = generate.resolve(str(tmp_path), stack)
        assert target.run_config is not None
        base = generate.load_base(target.run_config, "the run")
        assert _params(base) == _params(run.module.reference.model)
        for ours, theirs in zip(
            base.parameters(), run.module.reference.model.parameters(), strict=True
        ):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)

    # export: the checkpoint's config, which rebuilds the checkpoint's model size.
    assert hf_export.read_checkpoint(ckpt).config == trained
    out = hf_export.export_checkpoint(ckpt, tmp_path / "exported")
    assert (out / "config.json").is_file()

    # evaluate: the same record.
    for name in (tmp_path, tmp_path / "hf_model", ckpt):
        assert resolve_target(str(name)).run_config == trained, name

    # One seeding rule: evaluate's rebuilt reference and generate's compare=true base are the
    # same weights, and both are the run's step-0 policy.
    target = resolve_target(str(ckpt))
    assert target.run_config is not None
    tokenizer = load_tokenizer(target)
    _, reference, _ = build_models(
        target, tokenizer, int(target.run_config["seed"]), None, cfg.model, 64, True
    )
    torch.manual_seed(12345)  # a generator state of another command: the rule resets it
    base = generate.load_base(target.run_config, "the run")
    evaluated = list(reference.model.parameters())  # a copy reference: the step-0 model
    assert len(evaluated) == len(list(base.parameters()))
    for ours, theirs in zip(base.parameters(), evaluated, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
