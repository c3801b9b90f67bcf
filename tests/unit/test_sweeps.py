"""How a sweep names its jobs' folders."""

from __future__ import annotations

from kto_lightning.runs.sweeps import MAX_DIRNAME, job_dirname, shown_overrides


def test_a_job_folder_is_named_by_its_overrides_without_secrets_seed_or_slashes() -> None:
    overrides = ["loss.beta=0.1", "+hf_token=abc123", "seed=3", "data.source.path=/d/x.jsonl"]
    assert job_dirname(overrides) == "data.source.path=_d_x.jsonl,loss.beta=0.1"
    assert shown_overrides(overrides)[1] == "+hf_token=***"


def test_a_long_job_folder_name_is_cut_and_kept_unique() -> None:
    many = [f"trainer.option_{n}=value_{n}" for n in range(20)]
    other = [*many[:-1], "trainer.option_19=other"]
    name, other_name = job_dirname(many), job_dirname(other)
    assert len(name.encode()) <= MAX_DIRNAME and len(other_name.encode()) <= MAX_DIRNAME
    assert name != other_name and name.startswith("trainer.option_0=value_0,")
