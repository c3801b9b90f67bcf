"""Completions of a trained policy for your prompts, optionally beside its reference model's.

python -m kto_lightning.generate ckpt_path=outputs/kto/runs/<time> prompt="Tell me about bees."
python -m kto_lightning.generate ckpt_path=outputs/kto/runs/<time> prompts=p.jsonl compare=true
python -m kto_lightning.generate ckpt_path=my_model prompts=p.txt temperature=0.7 num_samples=4

`ckpt_path` is a run or sweep job directory (its hf_model/), a training checkpoint (.ckpt), a
Hugging Face folder or a hub name; what each gives, how prompts are rendered and what
`compare=true` rebuilds is in kto_lightning.cli.generation. One JSON line per prompt and sample
(prompt, rendered_prompt, sample, completion, settings) goes to `out` (default: the run
directory's generations.jsonl, else stdout).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kto_lightning.cli.arguments import read_options
from kto_lightning.cli.generate_options import GenerateOptions
from kto_lightning.errors import KTOError

COMMAND = "python -m kto_lightning.generate"
SUMMARY = (
    "Generate completions for prompts with a trained policy: one JSON line per prompt and "
    "sample (prompt, rendered_prompt, sample, completion, settings); with compare=true, the "
    "policy's and the reference model's completions side by side."
)
EXAMPLES = (
    f'{COMMAND} ckpt_path=outputs/kto/runs/<time> prompt="Tell me about bees."',
    f"{COMMAND} ckpt_path=outputs/kto/runs/<time> prompts=prompts.jsonl compare=true",
)


def main(argv: list[str] | None = None) -> int:
    options = read_options(GenerateOptions, argv, COMMAND, SUMMARY, EXAMPLES)
    if isinstance(options, int):
        return options
    try:
        # Imported here: torch and transformers are slow to import, and --help needs neither.
        from kto_lightning.cli.generation import output_file, run

        output = output_file(options)
        rows = run(options)
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
        with Path(output).open("w" if options.overwrite else "x", encoding="utf-8") as handle:
            handle.write(lines)
    except OSError as error:
        print(f"error: cannot write out={output!r}: {error.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {len(rows)} rows to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
