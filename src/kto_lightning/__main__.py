"""`kto-lightning <command> key=value ...`: the five entry points under one console script.

    kto-lightning train loss.beta=0.2              # = python -m kto_lightning.train loss.beta=0.2
    kto-lightning train -m loss.beta=0.1,0.2       # a sweep, as Hydra runs it
    python -m kto_lightning evaluate ckpt_path=outputs/kto/runs/<time>

Each command is run as `python -m kto_lightning.<command>` runs it: the arguments after the
command's name become `sys.argv[1:]`, and `sys.argv[0]` is the command's module file, so that
Hydra (train, evaluate) parses the same command line and names the job as it does then.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

# Command -> what it does (the first line of --help).
COMMANDS = {
    "train": "fit a policy with KTO (a Hydra app: key=value overrides, -m for a sweep)",
    "evaluate": "score a run's policy against its reference (eval.json, reward histograms)",
    "generate": "completions of a run's policy for prompts, beside its reference's",
    "export": "a checkpoint as a Hugging Face folder with a model card",
    "plot": "the curves of a run or a sweep as one PNG",
}
PROGRAM = "kto-lightning"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        f"usage: {PROGRAM} <command> key=value ...",
        "",
        "KTO alignment of language models from binary feedback. Every command takes key=value",
        "arguments; `<command> --help` lists its keys (and config groups) with their defaults.",
        "",
        "commands:",
        *(f"  {name:<{width}}  {summary}" for name, summary in COMMANDS.items()),
        "",
        "also: python -m kto_lightning <command> ..., or python -m kto_lightning.<command> ...",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to the command's entry point; returns its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("--help", "-h", "help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(
            f"error: {name!r} is no command of {PROGRAM}; commands: {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(f"kto_lightning.{name}")
    # As `python -m kto_lightning.<name>` sets it: Hydra reads sys.argv itself.
    sys.argv = [str(Path(str(module.__file__))), *rest]
    result = module.cli() if hasattr(module, "cli") else module.main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
