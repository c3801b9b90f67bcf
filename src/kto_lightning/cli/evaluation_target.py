"""What `kto_lightning.evaluate`'s `ckpt_path` names, and the policy and reference it gives.

- A checkpoint (.ckpt), or a run directory (its checkpoints/last.ckpt): the model, loss, reference
  and seed come from the run config stored in the checkpoint. The model is rebuilt and seeded as
  training built it; its initial weights make the reference (a frozen copy, or the policy with its
  LoRA adapters disabled; a `cache` reference becomes a copy, since a cache holds only the run's
  own rows), then the checkpoint's weights are loaded into the policy.
- A Hugging Face folder (`<run dir>/hf_model`, or any `save_pretrained` folder): the policy is
  that model. The reference is the base model of the run whose directory holds the folder (the
  config of its last.ckpt, else of its .hydra/config.yaml), else the `model` group's model; a
  folder of no run must then name its reference and rows (`refuse_guessed_run`).
- `reference_model` (a Hugging Face folder or hub id) replaces the reference in every case.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from transformers import PreTrainedTokenizerBase

from kto_lightning.cli.hf_export import POLICY_PREFIX, load_policy_weights
from kto_lightning.cli.rebuilding import seeded_policy
from kto_lightning.core.logprobs import CausalLM
from kto_lightning.data.config import Source
from kto_lightning.errors import ConfigError, user_error
from kto_lightning.models import ModelSource, Pretrained
from kto_lightning.models.reference import (
    CopyReference,
    ReferenceProvider,
    ReferenceSpec,
    build_provider,
    resolved_kind,
)
from kto_lightning.runs.run_record import RunRecord, resolve_run


@dataclasses.dataclass(frozen=True)
class Target:
    """What `ckpt_path` names, resolved.

    Attributes:
        kind: "checkpoint" (a .ckpt file, or a run directory's last.ckpt), "hf_model", or "hub"
            (a hub name, which generate loads; evaluate reads local runs only).
        path: the .ckpt file or the Hugging Face folder.
        run_config: the training run's resolved config (the checkpoint's, or, for a Hugging Face
            folder inside a run directory, that run's); None for a folder of no run.
        checkpoint: the checkpoint's contents (kind "checkpoint"), its tensors memory-mapped.
        record: the run `ckpt_path` belongs to, as kto_lightning.runs.run_record read it.
        model: what generate loads when it is not `path`: a checkpoint exported to a temporary
            Hugging Face folder, or a hub name (kind "hub").
    """

    kind: str
    path: Path
    run_config: dict[str, Any] | None
    checkpoint: dict[str, Any] | None = None
    record: RunRecord | None = None
    model: str | None = None

    @property
    def weights(self) -> str:
        """The Hugging Face folder or hub name to load the policy from (`model`, else `path`)."""
        return self.model if self.model is not None else str(self.path)


def resolve_target(ckpt_path: str) -> Target:
    """The checkpoint or Hugging Face folder that `ckpt_path` names (see the module docstring),
    read by kto_lightning.runs.run_record, the one reader of what a run directory holds."""
    record = resolve_run(ckpt_path, "ckpt_path")
    return Target(record.kind, record.named, record.config, record.checkpoint, record)


def override_keys(overrides: Sequence[str]) -> set[str]:
    """The top-level keys a command line sets (`model.lora.r=4` and `model=local`: `model`)."""
    return {o.split("=", 1)[0].lstrip("+~").split(".")[0].split("@")[0] for o in overrides}


def refuse_guessed_run(
    target: Target,
    reference_model: str | None,
    model: Mapping[str, Any],
    source: Source,
    seed: int,
    overridden: set[str],
) -> None:
    """ConfigError for a Hugging Face folder of no run when evaluation would guess the run.

    Inside its run directory, a folder brings the run's base model and seed; copied out of it,
    nothing says which model was the reference or which rows were held out for validation, and
    the `model` group (a random init under seed 42 by default) and a hold-out under the default
    seed would stand in for them without a word. Each must then be named on the command line:
    the reference (`reference_model`, or `model` with `seed` for a random-init model), and the
    rows (test or validation rows, or `seed` for the hold-out).
    """
    if target.kind != "hf_model" or target.run_config is not None:
        return
    random_init = not (model.get("name_or_path") or model.get("run_dir"))
    guessed = []
    named_model = "model" in overridden and (not random_init or "seed" in overridden)
    if reference_model is None and not named_model:
        under = f" under seed={seed}" if random_init else ""
        guessed.append(
            f"the reference would be model={model_name(model)}{under} (set "
            "reference_model=<the base model's folder or hub id>, or model=... and seed=<the "
            "run's seed>)"
        )
    if source.holds_out and not source.names_test and "seed" not in overridden:
        guessed.append(
            f"the rows would be held out of data.source.path={source.path!r} under seed={seed} "
            "(set data.source.test_path=<file> or data.source.test_split=<split>, or seed=<the "
            "run's seed> to hold out the run's validation rows)"
        )
    if guessed:
        raise ConfigError(
            f"ckpt_path={str(target.path)!r} is a Hugging Face folder outside its run directory "
            f"(no checkpoints/last.ckpt or .hydra/config.yaml in {str(target.path.parent)!r}), "
            f"so its run's reference and rows are unknown: {'; and '.join(guessed)}. Or evaluate "
            "the run directory itself"
        )


def build_source(model_config: Mapping[str, Any], where: str) -> ModelSource:
    """The model config `model_config` built; errors name `where` it came from."""
    try:
        return instantiate(model_config)
    except Exception as error:
        problem = user_error(error)  # Hydra wraps what the constructor raised
        if problem is not None:
            raise problem from None
        raise ConfigError(f"the model config of {where} could not be built: {error}") from error


def load_tokenizer(target: Target) -> PreTrainedTokenizerBase:
    """The policy's tokenizer: the run's, or the one saved in the Hugging Face folder."""
    if target.kind == "hf_model":
        return Pretrained(str(target.path)).load_tokenizer()
    assert target.run_config is not None
    return build_source(target.run_config["model"], f"ckpt_path={target.path}").load_tokenizer()


def _check_tokenizer(policy: PreTrainedTokenizerBase, source: ModelSource, where: str) -> None:
    """ConfigError naming `where` unless the reference reads the policy's token ids."""
    if source.load_tokenizer().get_vocab() != policy.get_vocab():
        raise ConfigError(
            f"the reference model ({where}) has another tokenizer than the policy, so their "
            "log-probs of the same token ids cannot be compared; set reference_model= to the "
            "policy's base model"
        )


def model_name(model_config: Mapping[str, Any]) -> str:
    """A hub id or folder (model=from_run: the run's); for a model built from sizes, its class
    (`TinyLlama`)."""
    name = model_config.get("name_or_path") or model_config.get("run_dir")
    return str(name) if name else str(model_config["_target_"]).rsplit(".", 1)[-1]


def build_models(
    target: Target,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    reference_model: str | None,
    model: Mapping[str, Any],
    chunk_size: int,
    needs_kl_rows: bool,
) -> tuple[CausalLM, ReferenceProvider, dict[str, Any]]:
    """The policy, its reference, and their identity for eval.json (see the module docstring).

    Args:
        target: what `ckpt_path` names.
        tokenizer: the policy's (`load_tokenizer`); a reference model must share it.
        seed: the run's seed, which a random-init base model needs.
        reference_model: `reference_model`: a Hugging Face folder or hub id, or None.
        model: the `model` group, the reference of a Hugging Face folder of no run.
        chunk_size, needs_kl_rows: as KTOModule uses them (for the reference provider).
    """
    run = target.run_config
    identity: dict[str, Any] = {"kind": target.kind, "weights": str(target.path.resolve())}
    reference: ReferenceProvider | None = None
    if reference_model:
        named = Pretrained(reference_model, dtype="auto")
        _check_tokenizer(tokenizer, named, f"reference_model={reference_model}")
        reference = CopyReference(named.load_policy())
        identity |= {"base_model": reference_model, "reference": "reference_model"}
    if target.kind == "checkpoint":
        assert run is not None and target.checkpoint is not None
        policy = seeded_policy(build_source(run["model"], f"ckpt_path={target.path}"), seed)
        if reference is None:  # from the initial weights, before the checkpoint's are loaded
            spec: ReferenceSpec = instantiate(run["reference"])
            # A cached run is scored live: by what `auto` picks (the adapters under LoRA, which a
            # quantized policy needs), as the cache was filled.
            kind = "auto" if spec.kind == "cache" else spec.kind
            spec = dataclasses.replace(spec, kind=kind)
            reference = build_provider(spec, policy, tokenizer, None, chunk_size, needs_kl_rows)
            resolved = resolved_kind(kind, policy)
            identity |= {"base_model": model_name(run["model"]), "reference": resolved}
        state = {
            key[len(POLICY_PREFIX) :]: value
            for key, value in target.checkpoint.get("state_dict", {}).items()
            if key.startswith(POLICY_PREFIX)
        }
        load_policy_weights(policy, state, f"ckpt_path={str(target.path)!r}")
        identity["global_step"] = int(target.checkpoint.get("global_step", 0))
    else:
        policy = Pretrained(str(target.path), dtype="auto").load_policy()
        if reference is None:
            base = run["model"] if run is not None else model
            where = f"the run of {target.path}" if run is not None else "model="
            source = build_source(base, where)
            _check_tokenizer(tokenizer, source, where)
            reference = CopyReference(seeded_policy(source, seed))
            identity |= {"base_model": model_name(base), "reference": "copy"}
    identity["model_config"] = dict(run["model"] if run is not None else model)
    return policy, reference, identity
