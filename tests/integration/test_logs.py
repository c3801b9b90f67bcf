"""What a run prints when its output goes to a file or a pipe (SLURM, nohup, `| tee`).

One run of the entry point, its stdout and stderr piped as on a cluster, shared by every test:
plain step and validation lines instead of the progress bar, the config once with its secrets
hidden, and none of the library noise that used to surround them.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from cli import train_cli
from conftest import FAST

SECRET = "abc123xyz"
# The defaults that FAST turns off: the progress bar (replaced by plain lines when piped) and
# Lightning's model summary (shown without its FLOPs column).
SHOWN = ["trainer.enable_progress_bar=true", "trainer.enable_model_summary=true"]
NUMBER = r"[+-]?\d+\.\d+"
STEP_LINE = re.compile(
    rf"\[kto_lightning\]\[INFO\] - step (\d+)/6 \| epoch 1/1 \| loss {NUMBER} \| kl {NUMBER} \| "
    rf"margin {NUMBER} \| {NUMBER} examples/s \| ETA \d+:\d\d:\d\d$",
    re.MULTILINE,
)
VALIDATION_FIELDS = (
    rf"loss {NUMBER} \| reward accuracy {NUMBER} \| AUROC {NUMBER} \| margin {NUMBER} \| "
    rf"kl {NUMBER}$"
)
# What libraries printed that told a user nothing, each as it read.
NOISE = [
    "💡 Tip",  # Lightning's advertisement for litlogger
    "LeafSpec",  # torch's _pytree deprecation, raised inside Lightning
    "FLOPs",  # a column of zeros in the model summary,
    "Total Flops",  # and their total
    "Reading toy",  # `datasets` progress bars, one per map and filter
    "Tokenizing toy",
    "Filtering toy",
    "Writing model shards",  # transformers' bar while saving the export
    "Setting accelerator to CPU",  # DeepSpeed, imported by transformers for the export
    "ds_accelerator",
    "Seed set to",  # the config shows the seed
    "TPU available",
    "was configured so validation will run at the end of the training epoch",
    "to estimate number of stepping batches",
    "━",  # Lightning's progress bar, drawn once at the end when not on a terminal
]


@pytest.fixture(scope="module")
def piped(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """(the finished process, its run directory) of one short run with its output piped."""
    cwd = tmp_path_factory.mktemp("logs")
    fast = [o for o in FAST if o.split("=")[0] not in {s.split("=")[0] for s in SHOWN}]
    result = train_cli(*fast, *SHOWN, f"+my_api_key={SECRET}", f"hydra.run.dir={cwd}/run", cwd=cwd)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result, cwd / "run"


def test_steps_and_validations_print_plain_lines(piped) -> None:
    result, run_dir = piped
    # FAST logs every step: one line each, with every field, and no second copy of any.
    steps = [int(step) for step in STEP_LINE.findall(result.stdout)]
    assert steps == [1, 2, 3, 4, 5, 6], result.stdout[-3000:]
    assert re.search(rf"- validation before training: {VALIDATION_FIELDS}", result.stdout, re.M)
    assert re.search(rf"- validation at step 6: {VALIDATION_FIELDS}", result.stdout, re.M)
    # Through logging: Hydra's log file of the run holds the same lines.
    log_file = (run_dir / "train.log").read_text()
    assert [int(step) for step in STEP_LINE.findall(log_file)] == steps
    assert "validation at step 6: loss" in log_file


def test_config_is_printed_once_resolved_with_secrets_hidden(piped) -> None:
    result, run_dir = piped
    output = result.stdout + result.stderr
    assert output.count("[kto_lightning][INFO] - config:\n") == 1
    config = output.split("config:\n", 1)[1]
    assert "\n  my_api_key: '***'\n" in config
    # Resolved: interpolations show their values, not ${...}.
    assert "\n    every_n_steps: 1\n" in config
    assert f"output_dir: {run_dir}" in config
    assert SECRET not in output
    assert SECRET not in (run_dir / "train.log").read_text()


def test_library_noise_is_gone_and_the_model_summary_stays(piped) -> None:
    result, _ = piped
    output = result.stdout + result.stderr
    assert [noise for noise in NOISE if noise in output] == []
    assert re.search(
        r"model summary:\n.*Name +Type +Params +Mode\n.*policy +LlamaForCausalLM", output
    )
    # What the user needs is still there.
    assert "KTO training finished" in output
    assert "GPU available: False, used: False" in output
    assert "Hugging Face model:" in output
