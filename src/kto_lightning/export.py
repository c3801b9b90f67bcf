"""Export a trained policy as a Hugging Face folder that `from_pretrained` loads without us.

python -m kto_lightning.export outputs/run/checkpoints/last.ckpt hf_model            # merged
python -m kto_lightning.export outputs/run/checkpoints/last.ckpt hf_adapter --keep-adapter

The folder holds safetensors weights, the model config, the tokenizer (with its chat template),
a generation_config.json whose pad/eos/bos ids match the tokenizer, and a model card (README.md,
reporting/model_card.py) that says how the run was made and how it scored. A LoRA policy is
either merged into plain weights (`merge_lora=True`, loadable by AutoModelForCausalLM) or saved
as the adapter alone (`merge_lora=False`, loadable by peft.PeftModel.from_pretrained on the base
model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kto_lightning.cli.hf_export import export_checkpoint
from kto_lightning.errors import KTOError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kto_lightning.export",
        description=(
            "Export the policy of a kto_lightning checkpoint as a Hugging Face folder "
            "(safetensors weights, config, tokenizer, generation_config.json, and a model card, "
            "README.md). A LoRA policy is merged into plain weights unless --keep-adapter is "
            "given."
        ),
    )
    parser.add_argument("checkpoint", type=Path, help="a .ckpt file written by kto_lightning.train")
    parser.add_argument(
        "out_dir", type=Path, help="the folder to write: new or empty (created if needed)"
    )
    parser.add_argument(
        "--keep-adapter",
        action="store_true",
        help="for a LoRA policy, save the adapter alone (adapter_config.json + "
        "adapter_model.safetensors) instead of merged weights; load it with "
        "peft.PeftModel.from_pretrained(base_model, OUT_DIR)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="export into OUT_DIR although it holds files, replacing those of the same names "
        "(config.json, weights, tokenizer files, README.md); without it, a folder that is not "
        "empty is refused",
    )
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(
            args.checkpoint,
            args.out_dir,
            merge_lora=not args.keep_adapter,
            overwrite=args.overwrite,
        )
    except KTOError as error:
        # A problem the user can fix: one clear line, no traceback.
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
