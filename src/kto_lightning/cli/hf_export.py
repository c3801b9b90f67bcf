"""A trained policy as a Hugging Face folder that `from_pretrained` loads without us: the library
of the export command, also called at the end of training and by evaluate and generate.

The folder holds safetensors weights, the model config, the tokenizer (with its chat template),
a generation_config.json whose pad/eos/bos ids match the tokenizer, and a model card (README.md,
reporting/model_card.py) that says how the run was made and how it scored. A LoRA policy is
either merged into plain weights (`merge_lora=True`, loadable by AutoModelForCausalLM) or saved
as the adapter alone (`merge_lora=False`, loadable by peft.PeftModel.from_pretrained on the base
model).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from hydra.utils import instantiate
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from kto_lightning.cli.rebuilding import seeded_policy
from kto_lightning.core.logprobs import CausalLM
from kto_lightning.errors import ConfigError, ModelLoadError, user_error
from kto_lightning.models import ModelSource
from kto_lightning.models.quantizing import is_quantized
from kto_lightning.reporting.model_card import write_model_card
from kto_lightning.runs.run_record import CHECKPOINTS, RunRecord, resolve_run
from kto_lightning.runs.run_records import final_metrics

POLICY_PREFIX = "policy."


log = logging.getLogger("kto_lightning")


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft not installed: no model can be a PeftModel
        return False
    return isinstance(model, PeftModel)


def _generation_config(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """The model's generation config, with the special-token ids the tokenizer actually uses."""
    base = getattr(model, "generation_config", None)
    config = copy.deepcopy(base) if base is not None else GenerationConfig()
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, name)
        if value is not None:
            setattr(config, name, value)
    return config


def merges(policy: CausalLM, merge_lora: bool) -> bool:
    """Whether exporting `policy` merges its adapters: asked for, and the base not quantized. A
    quantized (QLoRA) base is saved as its adapter: merged into 4-bit weights the adapters would
    be rounded away, and the folder would need bitsandbytes to load."""
    if not (_is_peft(policy) and merge_lora):
        return False
    if is_quantized(policy):
        log.warning(
            "export: the policy's base is quantized (model.quantization); its LoRA adapter is "
            "saved alone (merging would round it into 4-/8-bit weights): load it with "
            "peft.PeftModel.from_pretrained on the base model"
        )
        return False
    return True


def export_policy(
    policy: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    merge_lora: bool = True,
) -> Path:
    """Write `policy` and `tokenizer` to `out_dir` as a Hugging Face folder; returns the folder.

    Args:
        policy: a transformers causal LM, or a peft PeftModel wrapping one.
        tokenizer: saved beside the weights, chat template included.
        out_dir: created if needed; existing files of the same names are overwritten.
        merge_lora: for a PeftModel, merge the adapters into a copy of the base weights and save a
            plain model (True), or save the adapter alone (False). Ignored for plain models.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = policy
    if _is_peft(policy) and merge_lora:
        # Merge on a copy: the training policy keeps its adapters (and stays trainable).
        model = copy.deepcopy(policy).merge_and_unload()
    generation_config = _generation_config(model, tokenizer)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # Written last so that it wins over any copy save_pretrained wrote with other token ids.
    generation_config.save_pretrained(out)
    return out


def read_checkpoint(ckpt_path: Path) -> RunRecord:
    """The run record of a training checkpoint, read by runs/run_record.py (the one reader
    of checkpoints and run directories); ModelLoadError naming the file when it cannot be read."""
    if not ckpt_path.is_file():
        raise ModelLoadError(f"no checkpoint file at {str(ckpt_path)!r}")
    key = "checkpoint"
    try:
        return resolve_run(ckpt_path, key)
    except ConfigError as error:
        # The reader names the file as `checkpoint='<path>': ...`; say it as export always has.
        reason = str(error).removeprefix(f"{key}={str(ckpt_path)!r}: ")
        # Unreadable bytes: a load error; a readable file that is no training checkpoint (no run
        # config to rebuild its model from): a config error, as before the one reader.
        kind = ModelLoadError if reason.startswith("not a readable") else ConfigError
        raise kind(f"could not read the checkpoint {str(ckpt_path)!r}: {reason}") from None


def _build_source(model_config: dict, ckpt_path: Path) -> ModelSource:
    try:
        return instantiate(model_config)
    except Exception as error:
        # Hydra wraps what the constructor raised; surface the user's problem (a KTOError) alone.
        problem = user_error(error)
        if problem is not None:
            raise problem from None
        raise ConfigError(
            f"the model config stored in {str(ckpt_path)!r} could not be built: {error}"
        ) from error


def load_policy_weights(policy: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load checkpoint weights (keys without `policy.`) into `policy`, rebuilt from the config.

    A full checkpoint holds every key of the policy and loads strictly. A trainable-only one (e.g.
    LoRA adapters) holds a subset: each of its keys must belong to the policy, and every key it
    lacks must be a frozen weight, which the rebuilt model already has (the base weights).
    """
    expected = policy.state_dict()
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ConfigError(
            f"{source} holds {len(unexpected)} weight(s) that the model rebuilt from its stored "
            f"config does not have, e.g. {unexpected[:3]}; was the checkpoint written by another "
            "model config?"
        )
    missing = set(expected) - set(state)
    if not missing:
        policy.load_state_dict(state, strict=True)
        return
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    missing_trainable = sorted(missing & trainable)
    if missing_trainable:
        raise ConfigError(
            f"{source} lacks {len(missing_trainable)} trainable weight(s) of the policy, e.g. "
            f"{missing_trainable[:3]}; it is neither a full checkpoint nor a trainable-only one"
        )
    result = policy.load_state_dict(state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # checked above


def run_dir_of(record: RunRecord) -> Path | None:
    """The run directory a checkpoint belongs to: the one its record found around it
    (`<run dir>/checkpoints/<file>.ckpt`), else the one its config names (paths.output_dir), if
    that still exists; None otherwise."""
    if record.run_dir is not None:
        return record.run_dir
    if record.named.resolve().parent.name == CHECKPOINTS:
        return record.named.resolve().parent.parent
    named = ((record.config or {}).get("paths") or {}).get("output_dir")
    return Path(named) if named and Path(named).is_dir() else None


def refuse_non_empty(out_dir: Path, overwrite: bool) -> None:
    """ConfigError when `out_dir` holds files and `overwrite` is off: an export writes config.json,
    weights and tokenizer files over those of the same names, so another model's folder (or an
    earlier export) would be replaced without a word, or left half one model, half another."""
    if overwrite or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConfigError(f"out={str(out_dir)!r} is a file; name a folder to export into")
    held = sorted(path.name for path in out_dir.iterdir())
    if held:
        shown = ", ".join(held[:4]) + (f", ... ({len(held)} entries)" if len(held) > 4 else "")
        raise ConfigError(
            f"out={str(out_dir)!r} is not empty (it holds {shown}); export into a new or "
            "empty folder, or set overwrite=true to replace the files of the same names"
        )


def export_checkpoint(
    ckpt_path: str | Path, out_dir: str | Path, merge_lora: bool = True, overwrite: bool = False
) -> Path:
    """Rebuild the policy of a kto_lightning checkpoint and export it with `export_policy`, with
    a model card (README.md) from its run config and its run directory's records.

    The model and tokenizer are rebuilt from the run config stored in the checkpoint, then the
    checkpoint's policy weights are loaded. For a trainable-only checkpoint (LoRA adapters) the
    base weights come from the model config: the pretrained folder, or, for TinyLlama, the random
    init under the run's seed.

    Args:
        ckpt_path: a `.ckpt` file written by the trainer (not a sharded FSDP/DeepSpeed folder).
        out_dir: where the Hugging Face folder goes.
        merge_lora: see `export_policy`.
        overwrite: export into a folder that holds files (refused otherwise, before anything is
            read: `refuse_non_empty`).
    """
    ckpt_path = Path(ckpt_path)
    refuse_non_empty(Path(out_dir), overwrite)
    return export_record(read_checkpoint(ckpt_path), out_dir, merge_lora=merge_lora)


def export_record(record: RunRecord, out_dir: str | Path, merge_lora: bool = True) -> Path:
    """`export_checkpoint` of a checkpoint already read (`read_checkpoint`, or
    run_record.resolve_run of a .ckpt): its policy, tokenizer and model card into `out_dir`."""
    checkpoint, config, ckpt_path = record.checkpoint, record.config, record.named
    assert checkpoint is not None and config is not None, "a checkpoint's record"
    source = _build_source(config["model"], ckpt_path)
    tokenizer = source.load_tokenizer()
    # The seed only matters for weights the checkpoint does not hold (a TinyLlama's frozen base
    # under LoRA); run_build.build seeds the same way before building the policy.
    policy = seeded_policy(source, config.get("seed"))
    state = {
        key[len(POLICY_PREFIX) :]: value
        for key, value in checkpoint.get("state_dict", {}).items()
        if key.startswith(POLICY_PREFIX)
    }
    if not state:
        raise ConfigError(f"the checkpoint {str(ckpt_path)!r} holds no 'policy.*' weights")
    load_policy_weights(policy, state, f"the checkpoint {str(ckpt_path)!r}")
    policy.eval()
    merge_lora = merges(policy, merge_lora)
    out = export_policy(policy, tokenizer, out_dir, merge_lora=merge_lora)
    step = checkpoint.get("global_step")
    run_dir = run_dir_of(record)
    metrics = final_metrics(run_dir, step) if run_dir is not None else {}
    write_model_card(out, config, run_dir, step, metrics, merge_lora=merge_lora)
    return out
