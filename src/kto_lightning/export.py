"""Export a trained policy as a Hugging Face folder that `from_pretrained` loads without us.

python -m kto_lightning.export ckpt_path=outputs/kto/runs/<time> out=hf_model          # merged
python -m kto_lightning.export ckpt_path=RUN/checkpoints/last.ckpt out=hf_adapter keep_adapter=true

`ckpt_path` is a .ckpt file or a run (or sweep job) directory, whose checkpoints/last.ckpt is
exported (kto_lightning.runs.run_record). The folder holds safetensors weights, the model config,
the tokenizer (with its chat template), a generation_config.json whose pad/eos/bos ids match the
tokenizer, and a model card (README.md, reporting/model_card.py). A LoRA policy is merged into
plain weights (loadable by AutoModelForCausalLM) unless `keep_adapter=true`, which saves the
adapter alone (loadable by peft.PeftModel.from_pretrained on the base model).
`push_to_hub=user/name` then uploads the folder to that hub repo (private=true, revision=<branch>),
with the token of HF_TOKEN or `hf auth login` (kto_lightning.cli.hub_push).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from kto_lightning.cli.arguments import doc, read_options
from kto_lightning.errors import KTOError

COMMAND = "python -m kto_lightning.export"


@dataclass(frozen=True)
class ExportOptions:
    """What `python -m kto_lightning.export` takes."""

    ckpt_path: str = doc(
        "a .ckpt written by kto_lightning.train, or a run directory (its last.ckpt)"
    )
    out: str = doc("the folder to write: new or empty (created if needed)")
    keep_adapter: bool = doc(
        "for a LoRA policy, save the adapter alone (load it with peft.PeftModel.from_pretrained)",
        False,
    )
    overwrite: bool = doc(
        "export into a folder that holds files, replacing those of the same names", False
    )
    push_to_hub: str | None = doc(
        "a hub repo id (user/name) to upload the folder to; the token comes from HF_TOKEN or "
        "`hf auth login`, never from an option",
        None,
    )
    private: bool = doc("create the hub repo private (an existing repo keeps its own)", False)
    revision: str | None = doc("the hub branch to upload to (created if needed); null: main", None)
    commit_message: str | None = doc("the hub commit's message; null: a default one", None)


def _checkpoint(ckpt_path: str) -> Path:
    """The .ckpt that `ckpt_path` names: itself, or a run directory's checkpoints/last.ckpt."""
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        from kto_lightning.runs.run_record import resolve_run  # the one run-directory reader

        return resolve_run(path, "ckpt_path").named
    return path


def main(argv: list[str] | None = None) -> int:
    options = read_options(
        ExportOptions,
        argv,
        COMMAND,
        "Export the policy of a kto_lightning checkpoint as a Hugging Face folder (safetensors "
        "weights, config, tokenizer, generation_config.json, and a model card, README.md).",
        [
            f"{COMMAND} ckpt_path=outputs/kto/runs/<time> out=hf_model",
            f"{COMMAND} ckpt_path=outputs/kto/runs/<time> out=hf_model push_to_hub=me/my-kto "
            "private=true",
        ],
    )
    if isinstance(options, int):
        return options
    try:
        from kto_lightning.cli.hf_export import export_checkpoint  # torch: not for --help
        from kto_lightning.cli.hub_push import PUSH_KEYS, check_push, push_folder

        # The push checked (repo id, token, not offline) before the checkpoint is read.
        push = check_push({key: getattr(options, key) for key in PUSH_KEYS})
        checkpoint = _checkpoint(options.ckpt_path)
        out = export_checkpoint(
            checkpoint,
            options.out,
            merge_lora=not options.keep_adapter,
            overwrite=options.overwrite,
        )
        print(f"exported {checkpoint} -> {out}")
        if push is not None:
            print(f"pushed {out} -> {push_folder(out, push)}")
    except KTOError as error:
        # A problem the user can fix: one clear line, no traceback.
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
