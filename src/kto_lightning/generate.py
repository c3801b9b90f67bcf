"""Completions of a trained policy for your prompts, optionally beside its reference model's.

python -m kto_lightning.generate outputs/kto/runs/<date> --prompt "Tell me about bees."
python -m kto_lightning.generate outputs/kto/runs/<date> --prompts prompts.jsonl --compare
python -m kto_lightning.generate my_model --prompts prompts.txt --temperature 0.7 --num-samples 4

MODEL_OR_RUN is a Hugging Face folder (a run's hf_model/, any `save_pretrained` folder) or hub
name, loaded as `model=local` loads one (`models.Pretrained`); a run directory (its hf_model/); or
a training checkpoint (.ckpt), exported to a temporary folder by `export.export_checkpoint`.

Prompts (`--prompt`, `--prompts FILE`) are rendered as training renders them (`prompts.py`): a
conversation through the tokenizer's chat template; a text prompt as one user turn of it when the
tokenizer has one (`--no-chat-template`: BOS + text, as training encodes text rows).

`--compare` generates with the reference model too: the base the run started from, rebuilt from
the run's config as `train.build` built it, or `--reference MODEL`. The run config is read by
`kto_lightning.runs.run_record`, with evaluate's precedence: the named checkpoint's, else the run's
checkpoints/last.ckpt's, else its .hydra/config.yaml.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from kto_lightning.common.hub import looks_local
from kto_lightning.core.logprobs import CausalLM
from kto_lightning.data.prompts import gather_prompts, prompt_ids
from kto_lightning.errors import ConfigError, KTOError, ModelLoadError, user_error
from kto_lightning.models import Pretrained, learned_positions

if TYPE_CHECKING:
    from kto_lightning.runs.run_record import RunRecord

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Sampling:
    """How to generate; each field is the command-line flag of the same name."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    num_samples: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ConfigError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"--top-k must be >= 0 (0: off), got {self.top_k}")
        if self.num_samples < 1:
            raise ConfigError(f"--num-samples must be >= 1, got {self.num_samples}")
        if self.num_samples > 1 and self.temperature == 0:
            raise ConfigError(
                f"--num-samples {self.num_samples} with --temperature 0 would repeat one greedy "
                "completion; set --temperature above 0 to sample"
            )

    def generation_config(
        self, model: CausalLM, tokenizer: PreTrainedTokenizerBase
    ) -> GenerationConfig:
        """The model's own generation config (e.g. a repetition penalty it ships) with these
        settings and the tokenizer's pad and end-of-sequence ids."""
        base = getattr(model, "generation_config", None)
        config = copy.deepcopy(base) if base is not None else GenerationConfig()
        # A chat model may end its turn with a token other than the tokenizer's EOS; keep both.
        eos = config.eos_token_id
        eos_ids = {*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id} - {None}
        sample = self.temperature > 0
        config.update(
            max_new_tokens=self.max_new_tokens,
            do_sample=sample,
            num_return_sequences=self.num_samples,
            # Unset when greedy: transformers warns about sampling settings it will not use.
            temperature=self.temperature if sample else None,
            top_p=self.top_p if sample else None,
            top_k=self.top_k if sample else None,  # 0 turns top-k off; None means 50
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=sorted(eos_ids) or None,
        )
        return config


@dataclass(frozen=True)
class Target:
    """What MODEL_OR_RUN names: the weights to load, and what is known of the run behind them.

    Args:
        model: a Hugging Face folder or hub name.
        run_config: the run's config (at least `model` and `seed`), when there is one.
    """

    model: str
    run_config: dict[str, Any] | None = None


def _run_config(record: RunRecord) -> dict[str, Any] | None:
    """The run config a record holds, when it says how the model was built (a `model` key)."""
    return record.config if record.config is not None and "model" in record.config else None


def resolve(name: str, stack: contextlib.ExitStack) -> Target:
    """What MODEL_OR_RUN names; a checkpoint is exported into a folder that `stack` removes.

    The run config comes from kto_lightning.runs.run_record, as evaluate reads it: the named
    checkpoint's, else the run's checkpoints/last.ckpt's, else its .hydra/config.yaml.
    """
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".ckpt":
        # Imported here: Lightning is slow to import, and a hub name needs neither module.
        from kto_lightning.cli.hf_export import export_record
        from kto_lightning.runs.run_record import resolve_run

        record = resolve_run(path, "MODEL_OR_RUN")
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kto_generate_")))
        export_record(record, folder)
        return Target(str(folder), run_config=_run_config(record))
    if path.is_file():
        raise ConfigError(
            f"{name!r} is a file; give a model folder, a run directory or a .ckpt checkpoint"
        )
    if path.is_dir():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{name!r} holds a LoRA adapter alone (export --keep-adapter); pass the "
                "checkpoint it was exported from, or export it merged"
            )
        folder = path if (path / "config.json").is_file() else path / "hf_model"
        if folder.is_dir():
            if not (folder / "config.json").is_file():  # Pretrained says what is missing
                return Target(str(folder))
            from kto_lightning.runs.run_record import resolve_run

            # A run's hf_model/: its run directory still says which base model it started from.
            record = resolve_run(folder, "MODEL_OR_RUN")
            return Target(str(folder), run_config=_run_config(record))
        if (path / ".hydra").is_dir() or (path / "checkpoints").is_dir():
            newest = sorted((path / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
            hint = "it has no checkpoint either"
            if newest:
                hint = f"pass one of its checkpoints instead, e.g. {str(newest[-1])!r}"
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
    return Target(name)  # a hub name: Pretrained says whether it can be reached


def load_model(name: str, dtype: str) -> tuple[CausalLM, PreTrainedTokenizerBase]:
    """A Hugging Face folder or hub name, loaded as `model=local` loads a model for training."""
    source = Pretrained(name_or_path=name, dtype=dtype)
    return source.load_policy(), source.load_tokenizer()


def load_base(config: dict[str, Any], where: str) -> CausalLM:
    """The model a run started from, which its reference is: rebuilt from the run's `model`
    config as `train.build` built it (after seeding with the run's seed), LoRA left off."""
    from hydra.utils import instantiate  # slow to import; only --compare needs it

    model_config = dict(config["model"])
    if model_config.get("lora"):
        model_config["lora"] = None  # adapters start at zero: the base alone computes the same
    try:
        source = instantiate(model_config)
        # A from-scratch TinyLlama's weights are the random init under the run's seed.
        torch.manual_seed(int(config.get("seed") or 0))
        return source.load_policy()
    except Exception as error:
        problem = user_error(error) or f"its model config could not be built: {error}"
        raise ModelLoadError(
            f"--compare: the base model of {where} cannot be loaded: {problem}; name the "
            "reference with --reference MODEL"
        ) from None


def base_name(config: dict[str, Any]) -> str:
    """How the output names a run's base model: a hub id or folder (model=from_run: the earlier
    run), else the class that built it at random and the seed (`TinyLlama (seed 42)`)."""
    model = config["model"]
    name = model.get("name_or_path") or model.get("run_dir")
    if name:
        return str(name)
    return f"{str(model.get('_target_')).rsplit('.', 1)[-1]} (seed {config.get('seed') or 0})"


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
    torch.manual_seed(sampling.seed)  # before each model: --compare samples both alike
    completions: list[list[str]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
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
        raise ConfigError(f"--device: not a device name: {name!r} (auto, cpu, cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


def _check_length(model: CausalLM, ids: Sequence[list[int]], sampling: Sampling) -> None:
    """A model with learned positions (GPT-2) fails with an IndexError past its window."""
    limit = learned_positions(model)
    longest = max(len(i) for i in ids) + sampling.max_new_tokens
    if limit is not None and longest > limit:
        raise ConfigError(
            f"the longest prompt ({longest - sampling.max_new_tokens} tokens) plus "
            f"--max-new-tokens {sampling.max_new_tokens} exceeds the model's {limit} positions; "
            "lower --max-new-tokens or shorten the prompt"
        )


def _complete(
    model: CausalLM,
    tokenizer: PreTrainedTokenizerBase,
    ids: list[list[int]],
    args: argparse.Namespace,
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


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Generate as the command line asks; returns the rows."""
    sampling = Sampling(
        args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.num_samples, args.seed
    )
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    _device(args.device)  # a device that is not there fails before any model loads
    prompts, where = zip(*gather_prompts(args.prompt, args.prompts), strict=True)
    chat = not args.no_chat_template
    with contextlib.ExitStack() as stack:
        target = resolve(args.model_or_run, stack)
        compare = args.compare or args.reference is not None
        named = resolve(args.reference, stack) if args.reference is not None else None
        if compare and named is None and target.run_config is None:
            raise ConfigError(
                f"--compare: {args.model_or_run!r} carries no run config (.hydra/config.yaml or a "
                "checkpoint's), so its base model is unknown; name it with --reference MODEL"
            )
        policy, tokenizer = load_model(target.model, args.dtype)
        ids = [prompt_ids(p, tokenizer, chat, w) for p, w in zip(prompts, where, strict=True)]
        columns = {"completion": _complete(policy, tokenizer, ids, args, sampling, target.model)}
        reference_name = None
        if compare:
            del policy  # one model in memory at a time
            gc.collect()
            torch.cuda.empty_cache()
            if named is not None:
                reference, reference_tokenizer = load_model(named.model, args.dtype)
                reference_name = args.reference
                reference_ids = [
                    prompt_ids(p, reference_tokenizer, chat, w)
                    for p, w in zip(prompts, where, strict=True)
                ]
            else:
                assert target.run_config is not None  # checked above
                reference = load_base(target.run_config, repr(args.model_or_run))
                reference_name = base_name(target.run_config)
                # Training scored the reference on the policy's tokens: same tokenizer, same ids.
                reference_tokenizer, reference_ids = tokenizer, ids
            columns = {
                "policy": columns["completion"],
                "reference": _complete(
                    reference, reference_tokenizer, reference_ids, args, sampling, reference_name
                ),
            }
    settings = {"model": args.model_or_run, "reference": reference_name, **asdict(sampling)}
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
    """Where rows go without --output: `<run dir>/generations.jsonl` for a run directory (a
    folder with hf_model/ that is not itself a model folder, as `resolve` reads it), else None
    (stdout)."""
    path = Path(model_or_run).expanduser()
    is_model = (path / "config.json").is_file() or (path / "adapter_config.json").is_file()
    if path.is_dir() and not is_model and (path / "hf_model").is_dir():
        return path / "generations.jsonl"
    return None


def output_file(args: argparse.Namespace) -> str:
    """The file rows are written to ('-': stdout), refused before any model loads when it exists
    and --overwrite is not given: an earlier run's generations are not replaced silently."""
    default = default_output(args.model_or_run)
    output = args.output or (str(default) if default else "-")
    if output != "-" and Path(output).exists() and not args.overwrite:
        flag = f"--output {output!r}" if args.output else f"the default output {output!r}"
        raise ConfigError(
            f"{flag} already exists; pass --overwrite to replace it, or name another file with "
            "--output"
        )
    return output


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kto_lightning.generate",
        description=(
            "Generate completions for prompts with a trained policy: one JSON line per prompt "
            "and sample (prompt, rendered_prompt, sample, completion, settings); with --compare, "
            "the policy's and the reference model's completions side by side."
        ),
    )
    parser.add_argument(
        "model_or_run",
        metavar="MODEL_OR_RUN",
        help="a run directory (uses its hf_model/), a Hugging Face model folder or hub name, or "
        "a .ckpt checkpoint written by kto_lightning.train",
    )
    parser.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeatable)")
    parser.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        help='a .jsonl file with a "prompt" field per line (text, or a conversation: a list of '
        "{role, content} messages), or a .txt file with one prompt per line",
    )
    parser.add_argument(
        "--output",
        metavar="FILE",
        help="the JSONL file to write; '-' for stdout. Default: <run dir>/generations.jsonl "
        "for a run directory, else stdout. An existing file is refused unless --overwrite",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the output file if it exists (without it, an existing file is refused "
        "before any model loads)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=Sampling.max_new_tokens, help="default: %(default)s"
    )
    parser.add_argument(
        "--temperature", type=float, default=Sampling.temperature, help="0 (default): greedy"
    )
    parser.add_argument("--top-p", type=float, default=Sampling.top_p, help="default: 1 (off)")
    parser.add_argument("--top-k", type=int, default=Sampling.top_k, help="0 (default): off")
    parser.add_argument(
        "--num-samples", type=int, default=Sampling.num_samples, help="completions per prompt"
    )
    parser.add_argument("--seed", type=int, default=Sampling.seed)
    parser.add_argument(
        "--batch-size", type=int, default=8, help="prompts per generate call (default: 8)"
    )
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="auto (default): the weights' own dtype"
    )
    parser.add_argument(
        "--no-chat-template",
        action="store_true",
        help="encode text prompts as training encodes text rows (BOS + text) instead of as a "
        "user turn of the chat template; use it for a model trained on text prompts",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also generate with the reference model: the base model the run started from (read "
        "from the run's config), or --reference",
    )
    parser.add_argument(
        "--reference",
        metavar="MODEL",
        help="the reference model (folder, hub name, run or .ckpt); implies --compare",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        output = output_file(args)
        rows = run(args)
    except KTOError as error:
        # A problem the user can fix: one clear line, no traceback.
        print(f"error: {error}", file=sys.stderr)
        return 1
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if output == "-":
        sys.stdout.write(lines)
        return 0
    try:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        # "x": a file made while the models generated is not replaced either.
        with Path(output).open("w" if args.overwrite else "x", encoding="utf-8") as handle:
            handle.write(lines)
    except OSError as error:
        print(f"error: cannot write --output {output!r}: {error.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {len(rows)} rows to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
