"""One command line: the five entry points take key=value arguments, print a --help generated
from the schemas and conf/ (quickly: no torch import), refuse an unknown key or an old --flag
with one line, and are reachable through one console script (`kto-lightning <command>`)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli import command_in_process
from kto_lightning import __main__ as console
from kto_lightning import export, generate, plot
from kto_lightning.cli.app_help import app_help, schema_docs

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = ("train", "evaluate", "generate", "export", "plot")


def _run(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if cwd is not None:
        env["HF_HOME"] = str(cwd / "hf_home")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_of_each_entry_point_lists_its_keys_without_importing_torch(name: str) -> None:
    code = (
        "import runpy, sys, time\n"
        f"sys.argv = ['kto_lightning.{name}', '--help']\n"
        "start = time.perf_counter()\n"
        "try:\n"
        f"    runpy.run_module('kto_lightning.{name}', run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    assert not stop.code, stop.code\n"
        "heavy = sorted({'torch', 'lightning', 'transformers'} & set(sys.modules))\n"
        "print('HEAVY', heavy, 'SECONDS', round(time.perf_counter() - start, 3))\n"
    )
    start = time.perf_counter()
    result = _run("-c", code)
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-2000:]
    print(f"benchmark: python -m kto_lightning.{name} --help: {wall:.2f} s wall, cold")
    assert "HEAVY []" in result.stdout, result.stdout.splitlines()[-1]
    text = result.stdout
    assert text.startswith(f"usage: python -m kto_lightning.{name}")
    if name in ("train", "evaluate"):
        # Groups with their options (the default in brackets), keys with defaults and docs.
        assert "  model: from_run, llama1b, local, scratch, [tiny]" in text
        assert "  loss: apo_zero_unpaired, [kto], sft" in text
        assert "  loss.beta=0.1  # strength of the pull towards the reference model" in text
        # A nested group's key documented by its dataclass's docstring (data/config.py).
        assert "  data.batching.batch_size=16  # rows per device per step" in text
        assert "--hydra-help" in text
    if name == "train":
        assert "  seed=42" in text and "  trainer: cpu, [default], gpu" in text
    if name == "evaluate":
        assert "  ckpt_path=???  # Required" in text and "  reference_model=null" in text
    if name == "generate":
        assert "  max_new_tokens=int  (default: 128)" in text and "  compare=bool" in text
    if name in ("export", "plot"):
        assert "  ckpt_path=str  (default: required)" in text


def test_help_into_a_reader_that_stops_early_ends_quietly() -> None:
    # `--help | head`: the reader closes the pipe while the help is still being written.
    for name in ("train", "generate"):
        read, write = os.pipe()
        os.close(read)  # closed before the command writes: every write gets EPIPE
        with os.fdopen(write, "wb") as stdout:
            result = subprocess.run(
                [sys.executable, "-m", f"kto_lightning.{name}", "--help"],
                stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120,
            )  # fmt: skip
        assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, (
            result.stderr[-2000:]
        )
        assert result.returncode == 0


def test_schema_docs_are_read_from_the_source_not_imported() -> None:
    docs = schema_docs("kto_lightning.data.datamodule.KTODataModule")
    assert docs["data.source.val_fraction".removeprefix("data.")].startswith("share of rows")
    tiny = schema_docs("kto_lightning.models.TinyLlama")
    assert tiny["disable_dropout"].startswith("set every dropout probability to 0")
    # A `_global_` model file's keys (model.*) take their docs from the schema too.
    text = app_help("cmd", "train", "summary", [])
    assert "  model.disable_dropout=true  # set every dropout probability to 0" in text
    # A group whose option is its default shows in brackets; one without a default does not.
    assert "  debug: fast\n" in text and "  hparams_search: optuna\n" in text


def test_unknown_keys_and_old_flags_are_one_line_errors(capsys, tmp_path) -> None:
    def error(main, *args: str) -> str:
        capsys.readouterr()
        assert main(list(args)) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    message = error(generate.main, "ckpt_path=x", "max_new_token=4")
    assert "max_new_token: python -m kto_lightning.generate has no such key" in message
    assert "did you mean max_new_tokens?" in message and "valid keys: ckpt_path, prompt" in message
    assert "(here: prompt=Hi)" in error(generate.main, "ckpt_path=x", "--prompt=Hi")
    assert "(here: compare=true)" in error(generate.main, "ckpt_path=x", "--compare")
    assert "(here: keep_adapter=true)" in error(export.main, "ckpt_path=x", "--keep-adapter")
    assert "(here: out=...)" in error(plot.main, "--out")
    # A positional argument of the old style: the key it now goes under.
    assert "did you mean ckpt_path=" in error(plot.main, str(tmp_path))
    assert "max_new_tokens=abc: expected a number (int)" in error(
        generate.main, "ckpt_path=x", "max_new_tokens=abc"
    )
    assert "compare=maybe: expected true or false" in error(
        generate.main, "ckpt_path=x", "compare=maybe"
    )
    assert error(export.main, "out=x").startswith("error: ckpt_path must be set")
    # No output folder for a command refused before it ran.
    assert not (tmp_path / "x").exists()


def test_console_script_lists_and_dispatches_the_commands(capsys) -> None:
    assert console.main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: kto-lightning <command> key=value ...")
    for name in ENTRY_POINTS:
        assert f"\n  {name} " in text
    assert console.main(["fit"]) == 2
    assert "'fit' is no command of kto-lightning" in capsys.readouterr().err
    # In this process: the command's own --help and one-line errors.
    kept = sys.argv
    try:
        assert console.main(["plot", "--help"]) == 0
        assert capsys.readouterr().out.startswith("usage: python -m kto_lightning.plot")
        assert console.main(["export", "ckpt=x"]) == 1
        assert "did you mean ckpt_path?" in capsys.readouterr().err
    finally:
        sys.argv = kept


def test_python_dash_m_of_the_package_dispatches_in_a_process_of_its_own(tmp_path) -> None:
    # `python -m kto_lightning <command>` (kto_lightning/__main__.py run as a program): the
    # command's one-line refusal, and its exit status, reach the shell. The console script's
    # Hydra path (a sweep) runs in test_the_documented_example_of_each_command_runs_as_written.
    refused = _run("-m", "kto_lightning", "plot", "ckpt_pth=x", cwd=tmp_path)
    assert refused.returncode == 1
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "ckpt_pth" in lines[0], lines
    assert "did you mean ckpt_path?" in lines[0]
    assert not list(tmp_path.iterdir()), "a refused command writes nothing"


def _documented_examples() -> list[list[str]]:
    """docs/cli.md's "One example each" block, one argument list per line (comments dropped)."""
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    block = text.split("## One example each", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_the_documented_example_of_each_command_runs_as_written(tmp_path: Path) -> None:
    # Each line of the page, run as the console script runs it, in a fresh folder. Training is
    # cut to two steps (the only additions); `outputs/kto/runs/<time>` is the folder the first
    # line's run made.
    quick = [
        "data.source.toy_rows=64", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "callbacks.generations.max_new_tokens=4", "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    examples = _documented_examples()
    assert [args[:2] for args in examples] == [["kto-lightning", name] for name in (
        "train", "train", "evaluate", "generate", "export", "plot")]  # fmt: skip
    run_dir = None
    for program, command, *args in examples:
        if command == "train":
            args += quick
        else:
            assert run_dir is not None
            args = [arg.replace("outputs/kto/runs/<time>", str(run_dir)) for arg in args]
        result = command_in_process(command, *args, cwd=tmp_path)
        assert result.returncode == 0, (program, command, args, result.stderr[-3000:])
        if command == "train" and run_dir is None:
            (run_dir,) = (tmp_path / "outputs" / "kto" / "runs").iterdir()
            run_dir = run_dir.relative_to(tmp_path)
    # The sweep: one job per value, named by its number and override, each a whole run whose log
    # Hydra names as `python -m kto_lightning.train` does.
    (sweep,) = (tmp_path / "outputs" / "kto" / "multiruns").iterdir()
    jobs = sorted(path for path in sweep.iterdir() if path.is_dir())
    assert [job.name[:2] for job in jobs] == ["0_", "1_"], jobs
    assert "loss.beta=0.05" in jobs[0].name and "loss.beta=0.1" in jobs[1].name, jobs
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file() and (job / "train.log").is_file()
    run = tmp_path / run_dir
    assert (run / "checkpoints" / "last.ckpt").is_file()
    (evaluation,) = (tmp_path / "outputs" / "eval" / "runs").iterdir()
    assert json.loads((evaluation / "eval.json").read_text())["data"]["split"] == "validation"
    [row] = [json.loads(line) for line in (run / "generations.jsonl").read_text().splitlines()]
    assert row["prompt"] == "Tell me about bees." and "reference" in row
    assert (tmp_path / "my_model" / "model.safetensors").is_file()
    assert (run / "training_curves.png").is_file()
