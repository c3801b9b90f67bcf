"""What `python -m kto_lightning.generate` takes: one typed key per option, each with its doc.

Light on purpose (no torch): `--help` is generated from this schema (cli/arguments.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kto_lightning.cli.arguments import doc

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class GenerateOptions:
    """The options of generate; the sampling ones are checked by `sampling.Sampling`."""

    ckpt_path: str = doc(
        "a run or sweep job directory (its hf_model/), a .ckpt, a Hugging Face folder or hub name"
    )
    prompt: list[str] = field(
        default_factory=list,
        metadata={"doc": "a prompt; prompt=[a,b] or the key repeated for several"},
    )
    prompts: str | None = doc(
        'a .jsonl file with a "prompt" field per line (text or a list of {role, content}), or '
        "a .txt file with one prompt per line",
        None,
    )
    out: str | None = doc(
        "the JSONL file to write; '-' for stdout (default: <run dir>/generations.jsonl for a "
        "run directory, else stdout)",
        None,
    )
    overwrite: bool = doc("replace the output file if it exists (else refused at once)", False)
    max_new_tokens: int = doc("tokens generated per completion at most", 128)
    temperature: float = doc("sampling temperature; 0: greedy", 0.0)
    top_p: float = doc("nucleus sampling share; 1: off", 1.0)
    top_k: int = doc("sample among the k likeliest tokens; 0: off", 0)
    num_samples: int = doc("completions per prompt (above 1 needs temperature > 0)", 1)
    seed: int = doc("the sampling seed (set before each model, so compare samples alike)", 0)
    batch_size: int = doc("prompts per generate call", 8)
    device: str = doc("auto, cpu, cuda, cuda:1, ...", "auto")
    dtype: str = doc(f"one of {', '.join(DTYPES)}; auto: the weights' own dtype", "auto")
    chat_template: bool = doc(
        "render text prompts as a user turn of the tokenizer's chat template; false: BOS + text, "
        "as training encodes text rows",
        True,
    )
    compare: bool = doc(
        "also generate with the reference model: the base the run started from", False
    )
    reference_model: str | None = doc(
        "the reference model (folder, hub name, run or .ckpt); implies compare=true", None
    )
