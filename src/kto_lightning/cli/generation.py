"""What generate does: resolve the model, render the prompts, sample, and lay out the rows.

`ckpt_path` resolves to the one `Target` evaluate uses (runs/run_record.py reads it); a .ckpt is
exported to a temporary folder. Prompts are rendered as training renders them (data/prompts.py);
`compare=true` also samples the reference: the run's base, rebuilt and seeded as training built
it (cli/rebuilding.py), or `reference_model`.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from kto_lightning.cli.evaluation_target import Target
from kto_lightning.cli.generate_options import GenerateOptions
from kto_lightning.cli.hf_export import export_record
from kto_lightning.cli.rebuilding import seeded_policy
from kto_lightning.cli.sampling import Sampling
from kto_lightning.common.hub import looks_local
from kto_lightning.core.logprobs import CausalLM
from kto_lightning.data.collate import left_padded
from kto_lightning.data.prompts import gather_prompts, prompt_ids
from kto_lightning.errors import ConfigError, ModelLoadError, user_error
from kto_lightning.models import Pretrained, learned_positions
from kto_lightning.runs.run_record import (
    CHECKPOINTS,
    RunRecord,
    export_folder,
    is_run_dir,
    newest_checkpoint,
    resolve_run,
)


def _run_config(record: RunRecord) -> dict[str, Any] | None:
    """The run config a record holds, when it says how the model was built (a `model` key)."""
    return record.config if record.config is not None and "model" in record.config else None


def resolve(name: str, stack: contextlib.ExitStack, key: str = "ckpt_path") -> Target:
    """What `name` names, as the one `Target` evaluate uses, read by runs/run_record.py (the
    named checkpoint's run config, else the run's last.ckpt's, else its .hydra/config.yaml); a
    checkpoint is exported into a folder that `stack` removes (`Target.weights`)."""
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".ckpt":
        record = resolve_run(path, key)
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kto_generate_")))
        export_record(record, folder)
        config = _run_config(record)
        return Target(record.kind, record.named, config, record.checkpoint, record, str(folder))
    if path.is_file():
        raise ConfigError(
            f"{key}={name!r} is a file; give a model folder, a run directory or a .ckpt checkpoint"
        )
    if path.is_dir():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{key}={name!r} holds a LoRA adapter alone (export keep_adapter=true); pass the "
                "checkpoint it was exported from, or export it merged"
            )
        folder = path if (path / "config.json").is_file() else export_folder(path)
        if folder.is_dir():
            if not (folder / "config.json").is_file():  # Pretrained says what is missing
                return Target("hf_model", folder, None)
            # A run's hf_model/: its run directory still says which base model it started from.
            record = resolve_run(folder, key)
            return Target("hf_model", folder, _run_config(record), None, record)
        if is_run_dir(path) or (path / CHECKPOINTS).is_dir():
            newest = newest_checkpoint(path)
            hint = "it has no checkpoint either"
            if newest is not None:
                hint = f"pass one of its checkpoints instead, e.g. {key}={str(newest)!r}"
            raise ModelLoadError(
                f"the run directory {name!r} has no hf_model/ (the run did not finish, or it ran "
                f"with export.enabled=false); {hint}"
            )
        raise ModelLoadError(
            f"{name!r} is neither a Hugging Face model folder (no config.json) nor a run "
            "directory (no hf_model/)"
        )
    if looks_local(name):
        raise ModelLoadError(f"no model folder, run directory or checkpoint at {name!r}")
    return Target("hub", Path(name), None, model=name)  # Pretrained says if it can be reached


def load_model(name: str, dtype: str) -> tuple[CausalLM, PreTrainedTokenizerBase]:
    """A Hugging Face folder or hub name, loaded as `model=local` loads a model for training."""
    source = Pretrained(name_or_path=name, dtype=dtype)
    return source.load_policy(), source.load_tokenizer()


def load_base(config: dict[str, Any], where: str) -> CausalLM:
    """The model a run started from, which its reference is: rebuilt from the run's `model`
    config as `run_build.build` built it (after seeding with the run's seed), LoRA left off."""
    from hydra.utils import instantiate  # slow to import; only compare=true needs it

    model_config = dict(config["model"])
    if model_config.get("lora"):
        model_config["lora"] = None  # adapters start at zero: the base alone computes the same
    try:
        source = instantiate(model_config)
        # A from-scratch TinyLlama's weights are the random init under the run's seed.
        return seeded_policy(source, config.get("seed"))
    except Exception as error:
        problem = user_error(error) or f"its model config could not be built: {error}"
        raise ModelLoadError(
            f"compare=true: the base model of {where} cannot be loaded: {problem}; name the "
            "reference with reference_model=<folder or hub name>"
        ) from None


def base_name(config: dict[str, Any]) -> str:
    """How the output names a run's base model: a hub id or folder (model=from_run: the earlier
    run), else the class that built it and where its weights came from: a weights file
    (`TinyLlama (weights: bundled)`) or the seed of its random init (`TinyLlama (seed 42)`)."""
    model = config["model"]
    name = model.get("name_or_path") or model.get("run_dir")
    if name:
        return str(name)
    kind = str(model.get("_target_")).rsplit(".", 1)[-1]
    if model.get("weights"):
        return f"{kind} (weights: {model['weights']})"
    return f"{kind} (seed {config.get('seed') or 0})"


@torch.no_grad()
def generate(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    sampling: Sampling,
    batch_size: int,
) -> list[list[str]]:
    """`sampling.num_samples` completions of each prompt (token ids), in batches of prompts.

    Prompts are padded on the left, so that every row's completion starts at the same column.
    """
    model.eval()
    config = sampling.generation_config(model, tokenizer)
    stops = set(config.eos_token_id or [])
    device = next(model.parameters()).device
    torch.manual_seed(sampling.seed)  # before each model: compare=true samples both alike
    completions: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        input_ids, attention_mask = left_padded(batch, tokenizer.pad_token_id)
        width = input_ids.shape[1]
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=config,
        )  # (len(batch) * num_samples, width + new tokens), each prompt's samples together
        for row in range(len(batch)):
            samples: list[str] = []
            for sample in range(sampling.num_samples):
                new = output[row * sampling.num_samples + sample, width:].tolist()
                end = next((i for i, token in enumerate(new) if token in stops), len(new))
                samples.append(str(tokenizer.decode(new[:end], skip_special_tokens=True)))
            completions.append(samples)
    return completions


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name}: not a device name (auto, cpu, cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name}: no CUDA device is available here; use device=cpu")
    return device


def _check_length(model: CausalLM, ids: Sequence[list[int]], sampling: Sampling) -> None:
    """A model with learned positions (GPT-2) fails with an IndexError past its window."""
    limit = learned_positions(model)
    longest = max(len(i) for i in ids) + sampling.max_new_tokens
    if limit is not None and longest > limit:
        raise ConfigError(
            f"the longest prompt ({longest - sampling.max_new_tokens} tokens) plus "
            f"max_new_tokens={sampling.max_new_tokens} exceeds the model's {limit} positions; "
            "lower max_new_tokens or shorten the prompt"
        )


def _complete(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    ids: list[list[int]],
    args: GenerateOptions,
    sampling: Sampling,
    name: str,
) -> list[list[str]]:
    """Completions of one model, on the device and in the dtype the command line asks for."""
    device = _device(args.device)
    if args.dtype != "auto":
        model = model.to(getattr(torch, args.dtype))
    model = model.to(device)
    _check_length(model, ids, sampling)
    print(f"generating with {name} on {device}", file=sys.stderr)
    return generate(model, tokenizer, ids, sampling, args.batch_size)


def run(args: GenerateOptions) -> list[dict[str, Any]]:
    """Generate as the command line asks; returns the rows."""
    sampling = Sampling(
        args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.num_samples, args.seed
    )
    if args.batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {args.batch_size}")
    _device(args.device)  # a device that is not there fails before any model loads
    prompts, where = zip(
        *gather_prompts(args.prompt, Path(args.prompts) if args.prompts else None), strict=True
    )
    chat = args.chat_template
    with contextlib.ExitStack() as stack:
        target = resolve(args.ckpt_path, stack)
        compare = args.compare or args.reference_model is not None
        named = resolve(args.reference_model, stack) if args.reference_model is not None else None
        if compare and named is None and target.run_config is None:
            raise ConfigError(
                f"compare=true: {args.ckpt_path!r} carries no run config (.hydra/config.yaml or a "
                "checkpoint's), so its base model is unknown; name it with reference_model=<model>"
            )
        policy, tokenizer = load_model(target.weights, args.dtype)
        ids = [prompt_ids(p, tokenizer, chat, w) for p, w in zip(prompts, where, strict=True)]
        columns = {"completion": _complete(policy, tokenizer, ids, args, sampling, target.weights)}
        reference_name = None
        if compare:
            del policy  # one model in memory at a time
            gc.collect()
            torch.cuda.empty_cache()
            if named is not None:
                reference, reference_tokenizer = load_model(named.weights, args.dtype)
                reference_name = args.reference_model
                reference_ids = [
                    prompt_ids(p, reference_tokenizer, chat, w)
                    for p, w in zip(prompts, where, strict=True)
                ]
            else:
                assert target.run_config is not None  # checked above
                reference = load_base(target.run_config, repr(args.ckpt_path))
                reference_name = base_name(target.run_config)
                # Training scored the reference on the policy's tokens: same tokenizer, same ids.
                reference_tokenizer, reference_ids = tokenizer, ids
            columns = {
                "policy": columns["completion"],
                "reference": _complete(
                    reference,
                    reference_tokenizer,
                    reference_ids,
                    args,
                    sampling,
                    str(reference_name),
                ),
            }
    settings = {"model": args.ckpt_path, "reference": reference_name, **asdict(sampling)}
    settings["chat_template"] = chat
    rows = [
        {
            "prompt": prompt,
            "rendered_prompt": tokenizer.decode(prompt_tokens),
            "sample": sample,
            **{name: column[index][sample] for name, column in columns.items()},
            "settings": settings,
        }
        for index, (prompt, prompt_tokens) in enumerate(zip(prompts, ids, strict=True))
        for sample in range(sampling.num_samples)
    ]
    return rows


def default_output(model_or_run: str) -> Path | None:
    """Where rows go without out=: `<run dir>/generations.jsonl` for a run directory (a
    folder with hf_model/ that is not itself a model folder, as `resolve` reads it), else None
    (stdout)."""
    path = Path(model_or_run).expanduser()
    is_model = (path / "config.json").is_file() or (path / "adapter_config.json").is_file()
    if path.is_dir() and not is_model and export_folder(path).is_dir():
        return path / "generations.jsonl"
    return None


def output_file(args: GenerateOptions) -> str:
    """The file rows are written to ('-': stdout), refused before any model loads when it exists
    and overwrite=true is not given: an earlier run's generations are not replaced silently."""
    default = default_output(args.ckpt_path)
    output = args.out or (str(default) if default else "-")
    if output != "-" and Path(output).exists() and not args.overwrite:
        flag = f"out={output!r}" if args.out else f"the default output {output!r}"
        raise ConfigError(
            f"{flag} already exists; set overwrite=true to replace it, or name another file with "
            "out="
        )
    return output
