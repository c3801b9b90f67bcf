"""kto_lightning against TRL 1.16's KTOTrainer on one large GPU: one command, under 8 minutes.

    python benchmarks/gpu.py                      # on the GPU machine (sized for an H200)
    python benchmarks/gpu.py --out $OUT/gpu.md    # the report (and its logs) where you want them
    python benchmarks/gpu.py --smoke              # the same code on CPU, tiny sizes (CI, ~1 min)
    python benchmarks/gpu.py --only live --only cache --ours-override logprob_chunk_size=1024

Packages needed beyond torch, transformers and lightning: hydra-core, omegaconf,
antlr4-python3-runtime, datasets, dill, multiprocess, torchdata and trl (1.16.0), plus peft,
accelerate, pyarrow, pandas, xxhash, requests and psutil (what kto_lightning, TRL and datasets
import; a machine with torch, transformers, lightning and peft usually has them). The script
checks them all before anything else and names any missing one in one line (exit status 2).
kto_lightning is imported from this checkout's src/ when it is not installed. Nothing is
downloaded: every child runs with the Hugging Face hub and datasets offline.

Fixture, built on the machine and cached in benchmarks/.fixture/gpu (git-ignored): the
TinyLlama-1.1B architecture at random initialisation (hidden 2048, 22 layers, 32 heads, 4 KV heads,
intermediate 5632, vocabulary 32000, max positions 2048, untied LM head), its weights drawn on the
GPU and saved in bf16 (both frameworks load them as float32 master weights); 512 unpaired rows of
~400 prompt + ~400 completion tokens from benchmarks/fixture.py's seeded generator, with a BPE
tokenizer trained on them; max_length 1024, max_prompt_length 512.

Rows, each in a fresh child process (its own CUDA context, so its peak memory is its own):
  live reference, batch 8     ours reference=copy (default)  vs TRL with a ref_model
  cached reference, batch 8   ours reference=cache           vs TRL precompute_ref_log_probs=True
                              (ours fills its cache in a first, separately timed run)
  FSDP2, one device, batch 8  ours strategy=fsdp trainer.devices=1 (the sharding path, on one GPU)
  packing, batch 8            ours data.batching.packing=true, packs of 2 x max_length tokens (sdpa:
                              a block mask keeps the rows of a pack apart)
  packing, varlen kernel      the same with model.attn_implementation=flash_attention_2 (or _3,
                              _4, --varlen-attn), only when one is installed; else one line says so
  live reference, batch 16    ours                           vs TRL
  compile, batch 8            ours compile.enabled=true
Rows run in that order (live, cache, FSDP2, packing, live 16, compile); past --budget the rest is
skipped, so what is cut is what matters least.
Both: AdamW lr 1e-6 (linear decay, no warmup), beta 0.1, KTO with mismatched KL rows, gradient
clipping 1.0, gradient checkpointing off, no evaluation, checkpoints, export or loggers. ours
trainer.accelerator=gpu trainer.precision=bf16-mixed (as trainer=gpu); TRL bf16=True.

Per row: s/step (the device synchronised at a batch's start and after its optimizer step; the
first --warmup steps dropped), tokens/s and MFU over the real tokens of the batch's own rows,
peak GPU memory (max_memory_allocated and max_memory_reserved), seconds from the child's launch
to its first step and from the end of its last step to its exit (Lightning's teardown included),
and host synchronisations per step (torch.cuda.set_sync_debug_mode("warn") on two warm-up steps),
the attention implementation transformers resolved for each row's model, and for packed rows how
they were kept apart: by the kernel (flash attention's variable-length path, row bounds read from
the position ids) or by the block mask transformers builds from them (counted in the child).
MFU = F x N x tokens/s / peak, N the model's matmul weights (every nn.Linear, LM head included,
embeddings not), F = 12 with a live reference (policy forward + backward 6N, policy forward on
the KL rows 2N, reference forward on both 4N) and 8 with a cached one; peak --peak-tflops.

The project's targets are printed PASS/FAIL and never adjusted. The exit status is 1 when a child
run failed, never because a target is missed; 2 when a package or the GPU is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import RESULT_TAG, SMOKE_FIXTURE, Job, child_main, versions
from fixture import FixtureSpec, build_fixture, describe, is_built
from runners import BETA, LEARNING_RATE, ChildSpec, child_env

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Import name of every package the children need beyond torch, transformers and lightning.
NEEDED = {
    "hydra-core": "hydra",
    "omegaconf": "omegaconf",
    "antlr4-python3-runtime": "antlr4",
    "datasets": "datasets",
    "dill": "dill",
    "multiprocess": "multiprocess",
    "torchdata": "torchdata",
    "trl": "trl",
    "peft": "peft",
    "accelerate": "accelerate",
    "pyarrow": "pyarrow",
    "pandas": "pandas",
    "xxhash": "xxhash",
    "requests": "requests",
    "psutil": "psutil",
    "torch": "torch",
    "transformers": "transformers",
    "lightning": "lightning",
}
EXTRA_PACKAGES = [d for d in NEEDED if d not in ("torch", "transformers", "lightning")]

GPU_FIXTURE = FixtureSpec(
    words=340,  # ~400 tokens per prompt and per completion with the trained tokenizer
    long_rows=0,
    long_lengths=(),
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    weights_dtype="bfloat16",  # half the bytes to write and read; loaded as float32 by both
)

# The product targets; printed with PASS/FAIL, never adjusted to the measurements.
TARGET_LIVE_SPEEDUP = 1.5  # our steps/s over TRL's, live reference, batch 8
TARGET_CACHE_SPEEDUP = 1.5  # our steps/s (reference=cache) over TRL's precompute_ref_log_probs
TARGET_MEMORY_RATIO = 0.8  # our peak GPU memory (max_memory_allocated) over TRL's, live, batch 8
TARGET_MFU = 0.35  # ours, live reference, batch 8
TARGET_TAIL_S = 5.0  # seconds from the end of the last step to the process's exit, every row
PEAK_TFLOPS = 790.0  # bf16 dense peak taken for an H200 (--peak-tflops)


@dataclass(frozen=True)
class Mode:
    """What differs between the GPU run and the CPU smoke run; the code is the same."""

    name: str
    fixture: FixtureSpec
    max_length: int
    max_prompt_length: int
    accelerator: str
    precision: str
    warmup: int
    steps: int
    budget_s: float | None  # the whole script's time; later rows are skipped past it
    compile_overrides: tuple[str, ...] = ()


# The budget, from the first H200 run's figures (benchmarks/RESULTS.md, GPU): a child's launch
# (imports, CUDA context, the 1.1B model loaded) ~30 s for ours, ~23 s for TRL; ~0.55 s a step,
# ~1.1 s at batch 16. With 3 + 8 steps: ~40 s an ours row, ~30 s a TRL row; the fixture ~40 s on a
# fresh machine (not measured). Live, cache, FSDP2 and both packing rows: ~355 s; live 16 ~80 s
# more; compile, last, is cut. Stopping at 450 s keeps the script under 8 minutes, report included.
GPU = Mode("gpu", GPU_FIXTURE, 1024, 512, "gpu", "bf16-mixed", 3, 8, budget_s=450.0)
# Inductor on CPU compiled the tiny model's layer (C++ codegen, forward, backward and no-grad
# graphs) took 46 s for the first step and ~20 s more for the dynamic-shape recompile of the
# second, on 2 cores: 76 s for that one row. The smoke row uses the eager backend, which still runs
# dynamo over every decoder layer (the path compile.enabled takes) and costs ~2 s. The GPU row
# uses the default backend, inductor.
SMOKE = Mode(
    "gpu-smoke",
    # bench.py's smoke fixture with a vocabulary of 4096, not 32000: at hidden size 64 the LM
    # head is nearly all of the model, and the smoke run checks plumbing, not the head's cost.
    replace(SMOKE_FIXTURE, vocab_size=4096),
    128,
    64,
    "cpu",
    "32-true",
    2,
    1,
    budget_s=None,
    compile_overrides=("compile.backend=eager",),
)


@dataclass
class Row(Job):
    """One child run: bench.Job's figures, plus what the GPU report adds."""

    flops_factor: int = 12  # F of MFU: 12 with a live reference, 8 with a cached one
    after: str | None = None  # the key of a run that must finish first (the cache fill)
    launched_wall: float | None = None  # time.time() just before the child was started
    exited_wall: float | None = None  # ... just after it exited
    skipped: str | None = None  # why it did not run, when that is no failure (the time budget)

    def _values(self, key: str) -> list[float]:
        return list((self.result or {}).get(key) or [])

    @property
    def ok(self) -> bool:
        return self.result is not None and not self.error

    @property
    def steps_per_s(self) -> float | None:
        return 1.0 / self.mean_s if self.ok and self.mean_s else None

    @property
    def tokens_per_s(self) -> float | None:
        seconds = sum(self.measured)
        tokens = self._values("row_tokens")[self.warmup :]
        return sum(tokens) / seconds if self.ok and tokens and seconds > 0 else None

    def mfu(self, peak_tflops: float) -> float | None:
        n, tokens_per_s = (self.result or {}).get("matmul_params"), self.tokens_per_s
        if not (self.cuda and n and tokens_per_s):
            return None
        return self.flops_factor * n * tokens_per_s / (peak_tflops * 1e12)

    @property
    def cuda(self) -> bool:
        return "cuda_peak_allocated_mib" in (self.result or {})

    @property
    def first_step_s(self) -> float | None:
        steps = self._values("step_s")
        return steps[0] if self.ok and steps else None

    @property
    def loop_s(self) -> float | None:
        """Wall seconds per measured step, from the first one's start to the last one's end:
        also what happens between steps (data loading, logging hooks)."""
        starts, steps = self._values("step_start_s"), self._values("step_s")
        count = len(steps) - self.warmup
        if not self.ok or count < 1 or len(starts) != len(steps):
            return None
        return (starts[-1] + steps[-1] - starts[self.warmup]) / count

    @property
    def memory_gib(self) -> float | None:
        """Peak GPU memory allocated (CUDA), else the child's peak RSS."""
        r = self.result or {}
        mib = r.get("cuda_peak_allocated_mib", r.get("peak_rss_mib"))
        return mib / 1024 if self.ok and mib is not None else None

    @property
    def reserved_gib(self) -> float | None:
        mib = (self.result or {}).get("cuda_peak_reserved_mib")
        return mib / 1024 if self.ok and mib is not None else None

    @property
    def launch_s(self) -> float | None:
        first = (self.result or {}).get("first_step_wall")
        if not self.ok or first is None or self.launched_wall is None:
            return None
        return first - self.launched_wall

    @property
    def tail_s(self) -> float | None:
        last = (self.result or {}).get("last_step_end_wall")
        if not self.ok or last is None or self.exited_wall is None:
            return None
        return self.exited_wall - last

    @property
    def syncs_per_step(self) -> float | None:
        counted = self._values("host_syncs")
        return statistics.fmean(counted) if self.ok and counted else None


@dataclass
class Plan:
    mode: Mode
    warmup: int
    steps: int
    only: set[str]
    skip_trl: bool
    ours_overrides: tuple[str, ...]
    compile_overrides: tuple[str, ...]
    peak_tflops: float
    budget_s: float | None
    timeout: int
    jobs: int
    threads: int | None  # OMP_NUM_THREADS of the children; None: torch's default
    command: str
    fixture_dir: Path
    out: Path
    log_dir: Path
    trl_note: str | None = None
    notes: list[str] = field(default_factory=list)
    varlen: str | None = None  # the packing-varlen row's model.attn_implementation; None: no row
    varlen_note: str = ""  # which variable-length kernel was found, or that none is installed


# transformers' names of the attention implementations with a variable-length kernel, each with
# the function of transformers.utils that says whether its package is installed (CUDA included).
VARLEN_KERNELS = {
    "flash_attention_2": "is_flash_attn_2_available",
    "flash_attention_3": "is_flash_attn_3_available",
    "flash_attention_4": "is_flash_attn_4_available",
}


def varlen_attention(chosen: str | None) -> tuple[str | None, str]:
    """(implementation for the packing-varlen row or None, one line for the report).

    `chosen` (--varlen-attn) wins; "none" runs no such row. Otherwise the first of VARLEN_KERNELS
    whose package transformers finds, never its hub-kernel fallback (that would download)."""
    if chosen == "none":
        return None, "variable-length attention: not run (--varlen-attn none)"
    if chosen:
        return chosen, f"variable-length attention: {chosen} (--varlen-attn)"
    import transformers.utils as hf_utils

    for name, check in VARLEN_KERNELS.items():
        if getattr(hf_utils, check, lambda: False)():
            return name, f"variable-length attention: {name}, installed (the packing-varlen row)"
    return None, (
        "variable-length attention: none installed (no flash-attn 2, 3 or 4 package with CUDA "
        "here): packed rows are kept apart by transformers' block mask only"
    )


# The --only names, in the order the rows run: what the budget cuts comes last.
ROW_GROUPS = ["live", "cache", "fsdp", "packing", "live16", "compile"]


# ------------------------------------------------------------------------------ checks
def missing_packages(skip_trl: bool) -> list[str]:
    """Distributions of NEEDED that cannot be imported here (trl not needed with skip_trl)."""
    return [
        dist
        for dist, module in NEEDED.items()
        if not (skip_trl and dist == "trl") and importlib.util.find_spec(module) is None
    ]


def kto_lightning_version() -> str:
    installed = versions().get("kto_lightning", "not installed")
    if installed != "not installed":
        return installed
    text = (REPO / "src" / "kto_lightning" / "__init__.py").read_text(encoding="utf-8")
    found = re.search(r'__version__ = "([^"]+)"', text)
    return f"{found.group(1) if found else '?'} (this checkout's src/)"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=10"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


# ------------------------------------------------------------------------------ fixture
def fixture_child(mode_name: str, folder: str) -> int:
    """Build the fixture in this (child) process: on the GPU for the GPU run."""
    import torch

    mode = GPU if mode_name == GPU.name else SMOKE
    start = time.perf_counter()
    device = "cuda" if mode.accelerator == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run with --smoke on a machine without a GPU", file=sys.stderr)
        return 2
    quiet = lambda _message: None  # noqa: E731 (the parent says what is being built)
    try:
        build_fixture(Path(folder), mode.fixture, log=quiet, init_device=device)
    except Exception as error:  # on the GPU it failed: the CPU is slower, not wrong
        if device == "cpu":
            raise
        print(f"building on the GPU failed ({error!r}); building on the CPU", flush=True)
        build_fixture(Path(folder), mode.fixture, log=quiet, init_device="cpu")
    print(f"fixture built on {device} in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


def ensure_fixture(plan: Plan) -> None:
    if is_built(plan.fixture_dir, plan.mode.fixture):
        return
    print(f"building the fixture in {plan.fixture_dir} (cached for later runs) ...", flush=True)
    start = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--build-fixture", plan.mode.name]
    cmd += ["--fixture-dir", str(plan.fixture_dir.parent)]  # the child adds the mode's name
    with tempfile.TemporaryDirectory(prefix="kto_gpu_datasets_") as datasets_cache:
        proc = subprocess.run(cmd, env=child_env(datasets_cache), cwd=REPO, text=True)
    if proc.returncode != 0 or not is_built(plan.fixture_dir, plan.mode.fixture):
        print(f"building the fixture failed (exit code {proc.returncode})", file=sys.stderr)
        raise SystemExit(proc.returncode or 1)
    print(f"fixture ready in {time.perf_counter() - start:.0f} s", flush=True)


# ------------------------------------------------------------------------------ planning
def plan_rows(plan: Plan, model_dir: Path, cache_dir: Path) -> list[Row]:
    mode, folder = plan.mode, plan.fixture_dir
    total = plan.warmup + plan.steps
    # Host syncs counted on the last two warm-up steps: past the first step's one-off work, and
    # out of the measured steps, which the counting (a Python warning per sync) would slow down.
    sync_steps = (plan.warmup - 2, plan.warmup - 1) if plan.warmup >= 3 else ()
    ours = ChildSpec(
        impl="ours",
        reference="live",
        model_dir=str(model_dir),
        rows=str(folder / "rows.jsonl"),
        val_rows=str(folder / "val.jsonl"),
        max_length=mode.max_length,
        max_prompt_length=mode.max_prompt_length,
        steps=total,
        # No Hugging Face export at the end of the fit (nor checkpoints: see runners.py).
        ours_overrides=("export.enabled=false", *plan.ours_overrides),
        accelerator=mode.accelerator,
        precision=mode.precision,
        sync_steps=sync_steps,
    )
    trl = replace(ours, impl="trl", ours_overrides=())
    with_trl = not plan.skip_trl
    rows: list[Row] = []

    def add(key: str, label: str, spec: ChildSpec, **kw: Any) -> None:
        rows.append(Row(key, label, spec, kw.pop("warmup", plan.warmup), **kw))

    if "live" in plan.only:
        add("live8/ours", "kto_lightning, live reference (copy), batch 8", ours)
        if with_trl:
            add("live8/trl", "TRL KTOTrainer, ref_model, batch 8", trl)
    if "cache" in plan.only:
        cached = replace(ours, reference="cache", cache_dir=str(cache_dir))
        # The first run fills the cache (timed apart); one step: only its setup matters.
        add("cache/fill", "kto_lightning, cache fill run", replace(cached, steps=1), warmup=0)
        add(
            "cache/ours",
            "kto_lightning, reference=cache, batch 8",
            cached,
            flops_factor=8,
            after="cache/fill",
        )
        if with_trl:
            label = "TRL KTOTrainer, precompute_ref_log_probs, batch 8"
            add("cache/trl", label, replace(trl, reference="cache"), flops_factor=8)
    if "fsdp" in plan.only:
        sharded = (*ours.ours_overrides, "strategy=fsdp", "trainer.devices=1")
        spec = replace(ours, ours_overrides=sharded)
        add("fsdp/ours", "kto_lightning, FSDP2 on one device, batch 8", spec)
    if "packing" in plan.only:
        # Packs of two rows' length: rows share packs, so how they are kept apart is exercised.
        packed = (
            *ours.ours_overrides,
            "data.batching.packing=true",
            f"data.batching.max_tokens_per_pack={2 * mode.max_length}",
        )
        spec = replace(ours, ours_overrides=packed, watch_packing=True)
        add("packing/ours", "kto_lightning, packing, batch 8", spec)
        if plan.varlen:
            varlen = (*packed, f"model.attn_implementation={plan.varlen}")
            label = f"kto_lightning, packing, {plan.varlen}, batch 8"
            add("varlen/ours", label, replace(spec, ours_overrides=varlen))
    if "live16" in plan.only:
        label = "kto_lightning, live reference (copy), batch 16"
        add("live16/ours", label, replace(ours, batch_size=16))
        if with_trl:
            add("live16/trl", "TRL KTOTrainer, ref_model, batch 16", replace(trl, batch_size=16))
    if "compile" in plan.only:
        compiled = (*ours.ours_overrides, "compile.enabled=true", *plan.compile_overrides)
        spec = replace(ours, ours_overrides=compiled)
        add("compile/ours", "kto_lightning, compile.enabled, batch 8", spec)
    return rows


# ------------------------------------------------------------------------------ running
_RUNNING: set[subprocess.Popen] = set()  # children alive now, each the leader of its own group


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # gone already
        os.killpg(proc.pid, signal.SIGKILL)


def _stop_children(signum: int, frame: Any) -> None:
    """On SIGTERM, SIGINT or SIGHUP, take the children (own sessions: they would outlive us,
    holding the GPU) down with this process."""
    for proc in list(_RUNNING):
        _kill(proc)
    raise SystemExit(128 + signum)


def run_row(row: Row, plan: Plan, timeout: float) -> None:
    """Run `row` in a fresh child process; fills row.result, or row.error / row.skipped."""
    log_path = plan.log_dir / (row.key.replace("/", "_") + ".log")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(asdict(row.spec))]
    with (
        tempfile.TemporaryDirectory(prefix="kto_gpu_datasets_") as datasets_cache,
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
    ):
        row.launched_wall = time.time()
        start = time.perf_counter()
        # Its own session: on a timeout the whole group goes (compile workers included).
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=err,
            text=True,
            env=child_env(datasets_cache, plan.threads),
            cwd=REPO,
            start_new_session=True,
        )
        _RUNNING.add(proc)
        try:
            code: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            proc.wait()
            code = None
        finally:
            _RUNNING.discard(proc)
        row.exited_wall = time.time()
        row.wall_s = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    log_path.write_text(f"$ {shlex.join(cmd)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    if code is None:
        if plan.budget_s is not None and timeout < plan.timeout:
            row.skipped = f"stopped at the time budget (--budget {plan.budget_s:.0f} s)"
        else:
            row.error = f"timed out after {timeout:.0f} s; log: {log_path}"
        return
    lines = [x for x in stdout.splitlines() if x.startswith(RESULT_TAG)]
    if code != 0 or not lines:
        tail = "\n".join((stderr or stdout).strip().splitlines()[-8:])
        row.error = f"exit code {code}; log: {log_path}\n{tail}"
        return
    row.result = json.loads(lines[-1][len(RESULT_TAG) :])
    done = len(row.result["step_s"])
    if done != row.spec.steps:
        row.error = f"ran {done} optimizer steps, {row.spec.steps} expected; log: {log_path}"


def run_all(plan: Plan, rows: list[Row], header: dict, facts: dict, started: float) -> None:
    """Run the rows (one at a time on a GPU), rewriting the report after each."""
    lock = threading.Lock()
    done: dict[str, threading.Event] = {row.key: threading.Event() for row in rows}
    by_key = {row.key: row for row in rows}
    finished = 0

    def work(row: Row) -> None:
        nonlocal finished
        try:
            if row.after is not None:
                done[row.after].wait()
                if not by_key[row.after].ok:
                    row.skipped = f"not run: {row.after} did not complete"
                    return
            timeout: float = plan.timeout
            if plan.budget_s is not None:
                left = plan.budget_s - (time.perf_counter() - started)
                if left < 20:
                    row.skipped = f"not run: the time budget (--budget {plan.budget_s:.0f} s)"
                    return
                timeout = min(timeout, left)
            run_row(row, plan, timeout)
        except Exception as error:  # a bug of this script: reported, the other rows still run
            row.error = f"benchmark error: {error!r}"
        finally:
            with lock:
                finished += 1
                print(f"[{finished}/{len(rows)}] {row.label}: {progress_line(row)}", flush=True)
                write_report(plan, rows, header, facts)
            done[row.key].set()

    with ThreadPoolExecutor(max_workers=plan.jobs) as pool:
        list(pool.map(work, rows))


def progress_line(row: Row) -> str:
    if row.skipped:
        return row.skipped
    if row.error:
        return f"FAILED after {row.wall_s:.0f} s\n{row.error}"
    memory = f"{_f(row.memory_gib, '.2f')} GiB"
    return (
        f"{row.wall_s:.0f} s (mean step {_f(row.mean_s, '.3f')} s, peak memory {memory}, "
        f"launch to first step {_f(row.launch_s, '.1f')} s, last step to exit "
        f"{_f(row.tail_s, '.1f')} s)"
    )


# ------------------------------------------------------------------------------ reporting
def _f(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


COLUMNS = (
    "configuration",
    "attention",
    "s/step",
    "median",
    "step 1 (s)",
    "loop s/step",
    "tokens/s",
    "MFU",
    "peak alloc (GiB)",
    "peak reserved (GiB)",
    "launch to step 1 (s)",
    "last step to exit (s)",
    "host syncs/step",
)


def _table_row(row: Row | None, label: str, peak_tflops: float) -> str:
    if row is None:
        return f"| {label} | not run |" + " |" * (len(COLUMNS) - 2)
    if row.skipped or row.error:
        why = row.skipped or "FAILED: " + (row.error or "").splitlines()[0]
        return f"| {label} | {why} |" + " |" * (len(COLUMNS) - 2)
    mfu = row.mfu(peak_tflops)
    cells = [
        label,
        str((row.result or {}).get("attn_implementation") or "n/a"),
        _f(row.mean_s, ".3f"),
        _f(row.median_s, ".3f"),
        _f(row.first_step_s, ".2f"),
        _f(row.loop_s, ".3f"),
        _f(row.tokens_per_s, ",.0f"),
        "n/a" if mfu is None else f"{100 * mfu:.1f}%",
        _f(row.memory_gib, ".2f"),
        _f(row.reserved_gib, ".2f"),
        _f(row.launch_s, ".1f"),
        _f(row.tail_s, ".1f"),
        _f(row.syncs_per_step, ".1f"),
    ]
    return "| " + " | ".join(cells) + " |"


def _ratio_row(ours: Row | None, theirs: Row | None) -> str:
    if not (ours and theirs and ours.ok and theirs.ok):
        return ""
    cells = [
        "**ours / TRL**",
        "",
        f"{_x(_ratio(ours.steps_per_s, theirs.steps_per_s))} steps/s",
        "",
        "",
        f"{_x(_ratio(theirs.loop_s, ours.loop_s))} steps/s",
        _x(_ratio(ours.tokens_per_s, theirs.tokens_per_s)),
        "",
        _x(_ratio(ours.memory_gib, theirs.memory_gib)),
        _x(_ratio(ours.reserved_gib, theirs.reserved_gib)),
        _x(_ratio(ours.launch_s, theirs.launch_s)),
        "",
        "",
    ]
    return "| " + " | ".join(cells) + " |"


def _target(name: str, value: float | None, relation: str, bound: float, fmt: str) -> str:
    passed = (
        {">=": value >= bound, "<=": value <= bound, "<": value < bound}
        if value is not None
        else {}
    )
    verdict = "NOT MEASURED" if value is None else ("PASS" if passed[relation] else "FAIL")
    shown = "n/a" if value is None else format(value, fmt)
    return f"- [{verdict}] {name}: {shown} (target {relation} {format(bound, fmt)})"


def targets(plan: Plan, get) -> list[str]:
    def pair(key: str, value) -> float | None:
        """value(ours, TRL) of the two rows of `key`, when both ran."""
        ours, theirs = get(f"{key}/ours"), get(f"{key}/trl")
        if not (ours and theirs and ours.ok and theirs.ok):
            return None
        return value(ours, theirs)

    def launch_gap(ours: Row, theirs: Row) -> float | None:
        if ours.launch_s is None or theirs.launch_s is None:
            return None
        return ours.launch_s - theirs.launch_s

    live = get("live8/ours")
    mfu = live.mfu(plan.peak_tflops) if live and live.ok else None
    memory = "peak GPU memory (max_memory_allocated)"
    if plan.mode.accelerator != "gpu":
        memory = "peak RSS (CPU smoke run)"
    ours_rows = [r for r in (get(k) for k in ROW_ORDER) if r and r.ok and r.spec.impl == "ours"]
    tails = [(r.tail_s, r.label) for r in ours_rows if r.tail_s is not None]
    worst = max(tails) if tails else None
    return [
        _target(
            "steps/s, live reference, batch 8, ours / TRL",
            pair("live8", lambda a, b: _ratio(a.steps_per_s, b.steps_per_s)),
            ">=",
            TARGET_LIVE_SPEEDUP,
            ".2f",
        ),
        _target(
            "steps/s, batch 8, our reference=cache / TRL precompute_ref_log_probs",
            pair("cache", lambda a, b: _ratio(a.steps_per_s, b.steps_per_s)),
            ">=",
            TARGET_CACHE_SPEEDUP,
            ".2f",
        ),
        _target(
            f"{memory}, live reference, batch 8, ours / TRL",
            pair("live8", lambda a, b: _ratio(a.memory_gib, b.memory_gib)),
            "<=",
            TARGET_MEMORY_RATIO,
            ".2f",
        ),
        _target(
            f"MFU, ours, live reference, batch 8 (peak {plan.peak_tflops:g} TFLOP/s)",
            mfu,
            ">=",
            TARGET_MFU,
            ".1%",
        ),
        _target(
            "seconds from launch to the first step, live reference, batch 8, ours - TRL",
            pair("live8", launch_gap),
            "<=",
            0.0,
            ".1f",
        ),
        _target(
            "seconds from the end of the last step to the exit, worst of our rows"
            + (f" ({worst[1]})" if worst else ""),
            worst[0] if worst else None,
            "<",
            TARGET_TAIL_S,
            ".1f",
        ),
    ]


ROW_ORDER = (
    "live8/ours",
    "live8/trl",
    "cache/ours",
    "cache/trl",
    "live16/ours",
    "live16/trl",
    "fsdp/ours",
    "packing/ours",
    "varlen/ours",
    "compile/ours",
)
LABELS = {
    "live8/ours": "ours, live reference (copy), batch 8",
    "live8/trl": "TRL, ref_model, batch 8",
    "cache/ours": "ours, reference=cache, batch 8",
    "cache/trl": "TRL, precompute_ref_log_probs, batch 8",
    "live16/ours": "ours, live reference (copy), batch 16",
    "live16/trl": "TRL, ref_model, batch 16",
    "fsdp/ours": "ours, strategy=fsdp trainer.devices=1, batch 8",
    "packing/ours": "ours, packing=true (packs of 2 rows' length), batch 8",
    "varlen/ours": "ours, packing=true, varlen kernel, batch 8",
    "compile/ours": "ours, compile.enabled=true, batch 8",
}


def report(plan: Plan, rows: list[Row], header: dict, facts: dict) -> str:
    by_key = {row.key: row for row in rows}
    get = by_key.get
    mode, spec = plan.mode, plan.mode.fixture
    results = [row.result for row in rows if row.ok and row.result]
    device = next((r["device_name"] for r in results if r.get("device_name")), None)
    cuda = next((r["cuda_version"] for r in results if r.get("cuda_version")), None)
    device_gib = next((r["device_memory_gib"] for r in results if r.get("device_memory_gib")), None)
    n = next((r["matmul_params"] for r in results if r.get("matmul_params")), None)
    dtypes = {
        impl: sorted(
            {
                r.result["param_dtype"]
                for r in rows
                if r.ok and r.spec.impl == impl and r.result and "param_dtype" in r.result
            }
        )
        for impl in ("ours", "trl")
    }
    optim = sorted({r.result["optim"] for r in rows if r.ok and r.result and "optim" in r.result})
    where = (
        f"{device or 'GPU (no run reported its name)'}"
        + (f", {device_gib:.0f} GiB" if device_gib else "")
        + (f", CUDA {cuda}" if cuda else "")
        if mode.accelerator == "gpu"
        else "CPU (smoke run: tiny sizes, the figures check the plumbing, not the speed)"
    )
    title = device or ("a GPU" if mode.accelerator == "gpu" else "CPU (smoke run)")
    v = header["versions"]
    commit = f" (commit {header['commit']})" if header["commit"] else ""
    memory_note = (
        "peak alloc / reserved: torch.cuda.max_memory_allocated / max_memory_reserved of the child"
        if mode.accelerator == "gpu"
        else "peak alloc: the child's peak RSS (CPU); reserved: n/a"
    )
    lines = [
        f"# kto_lightning vs TRL KTOTrainer: KTO training on {title}",
        "",
        f"- date: {header['date']}",
        f"- command: `{plan.command}`",
        f"- device: {where}; host: {os.cpu_count()} CPUs, {platform.platform()}",
        f"- versions: python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"lightning {v['lightning']}, trl {v['trl']}, datasets {v['datasets']}, kto_lightning "
        f"{header['kto_lightning']}{commit}",
        f"- model: random-init LlamaForCausalLM, hidden {spec.hidden_size}, intermediate "
        f"{spec.intermediate_size}, {spec.num_hidden_layers} layers, {spec.num_attention_heads} "
        f"heads ({spec.num_key_value_heads} KV heads), vocabulary {spec.vocab_size}, untied head; "
        f"saved in {spec.weights_dtype}; N = {_f(n, ',')} matmul weights (every nn.Linear, LM "
        f"head included, embeddings not); parameter dtype at the first step: ours "
        f"{', '.join(dtypes['ours']) or 'n/a'}, TRL {', '.join(dtypes['trl']) or 'n/a'}",
        f"- data: {facts['rows']} unpaired rows ({facts['desirable']} desirable), "
        f"~{facts['mean_prompt_tokens']:.0f} prompt + ~{facts['mean_completion_tokens']:.0f} "
        f"completion tokens per row (longest {facts['max_row_tokens']}), BPE tokenizer trained "
        f"locally ({facts['tokenizer_vocab']} tokens); max_length {mode.max_length}, "
        f"max_prompt_length {mode.max_prompt_length} (ours; TRL 1.16 has none)",
        f"- training: AdamW lr {LEARNING_RATE:g} (linear decay, no warmup), beta {BETA}, "
        "mismatched KL rows, gradient clipping 1.0, gradient checkpointing off; ours "
        f"trainer.accelerator={mode.accelerator} trainer.precision={mode.precision}; TRL "
        f"bf16={mode.precision.startswith('bf16')}, optim {', '.join(optim) or 'n/a'}",
        "- ours' overrides beyond benchmarks/runners.py's: "
        + " ".join(["export.enabled=false", *plan.ours_overrides])
        + (f"; compile row: {' '.join(plan.compile_overrides)}" if plan.compile_overrides else ""),
        f"- timing: {plan.warmup} warm-up + {plan.steps} measured optimizer steps per row; s/step "
        "from a batch's start to its optimizer step's end"
        + (", the device synchronised at both ends" if mode.accelerator == "gpu" else "")
        + "; step 1: the first step (compilation, allocator warm-up); loop s/step: wall time "
        "over the measured steps, data loading and hooks between steps included",
        "- tokens/s: real tokens of the batch's own rows (not its KL rows, not padding) per "
        "second of s/step",
        f"- MFU = F x N x tokens/s / {plan.peak_tflops:g} TFLOP/s; F = 12 with a live "
        "reference (policy forward + backward 6N, policy forward on the KL rows 2N, reference "
        "forward on both 4N), 8 with a cached or precomputed one (no reference forward); "
        "attention's own FLOPs are not counted",
        f"- {memory_note}; launch to step 1: from starting the child process to its first "
        "step; last step to exit: from the end of the last step to the child's exit (the rest "
        "of fit, Lightning's teardown, interpreter exit)",
        "- host syncs/step: warnings of torch.cuda.set_sync_debug_mode('warn') on warm-up steps "
        f"{', '.join(str(s + 1) for s in row_sync_steps(rows)) or 'none'} (CUDA only)",
        "- attention: the implementation transformers resolved for the row's model; "
        + plan.varlen_note,
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * (len(COLUMNS) - 1),
    ]
    for group in (("live8",), ("cache",), ("live16",), ("fsdp", "packing", "varlen", "compile")):
        for key in ROW_ORDER:
            if key.split("/")[0] in group and (get(key) or _wanted(plan, key)):
                lines.append(_table_row(get(key), LABELS[key], plan.peak_tflops))
        if group[0] in ("live8", "cache", "live16"):
            ratio = _ratio_row(get(f"{group[0]}/ours"), get(f"{group[0]}/trl"))
            if ratio:
                lines.append(ratio)
    lines.append("")
    fill, cache_ours, cache_trl = get("cache/fill"), get("cache/ours"), get("cache/trl")
    if fill is not None and fill.ok and fill.result:
        reused = cache_ours.result.get("build_s") if cache_ours and cache_ours.ok else None
        filled = fill.result.get("precompute_s")
        lines.append(
            f"- ours' cache fill (first run, fill_cache): {_f(filled, '.1f')} s; "
            f"build() + module.setup() {fill.result['build_s']:.1f} s on a miss vs "
            f"{_f(reused, '.1f')} s when the cache is reused"
        )
        if cache_ours and cache_ours.ok and cache_ours.result.get("precompute_s"):
            lines.append("- WARNING: the measured reference=cache run filled the cache again")
    if cache_trl is not None and cache_trl.ok and cache_trl.result:
        lines.append(
            "- TRL precompute_ref_log_probs (in KTOTrainer.__init__): "
            f"{cache_trl.result['precompute_s']:.1f} s"
        )
    base = get("live8/ours")
    for key, name in (
        ("fsdp/ours", "FSDP2 on one device"),
        ("packing/ours", "packing"),
        ("varlen/ours", f"packing with {plan.varlen}"),
        ("compile/ours", "compile.enabled"),
    ):
        row = get(key)
        if row and row.ok and base and base.ok:
            lines.append(
                f"- {name}: {_x(_ratio(row.steps_per_s, base.steps_per_s))} the steps/s and "
                f"{_x(_ratio(row.memory_gib, base.memory_gib))} the peak memory of ours, live "
                f"reference, batch 8; its first step {_f(row.first_step_s, '.1f')} s"
            )
        if row and row.ok and key == "fsdp/ours" and row.result:
            sharded = "sharded" if row.result.get("sharded") else "NOT sharded"
            lines.append(f"- {name}: strategy {row.result.get('strategy')}, policy {sharded}")
        if row and row.ok and row.spec.watch_packing:
            lines.append(f"- {name}, packed rows kept apart: {isolation(row)}")
    for row in rows:
        if row.ok and row.result and row.result.get("sync_error"):
            lines.append(f"- {row.key}: host syncs not counted ({row.result['sync_error']})")
    lines += ["", "## Targets (never adjusted)", "", *targets(plan, get)]
    if plan.trl_note:
        lines += ["", plan.trl_note]
    lines += [f"- {note}" for note in plan.notes]
    failures = [row for row in rows if row.error or row.skipped]
    if failures:
        lines += ["", "## Runs that failed or did not run", ""]
        lines += [f"- {r.key}: {r.error or r.skipped}" for r in failures]
    return "\n".join(lines) + "\n"


def isolation(row: Row) -> str:
    """How `row`'s packed rows were kept from attending to each other, from the child's counts
    (runners._watch_packing): by the kernel, by the block mask, or (a bug) not at all."""
    result = row.result or {}
    c, attn = result.get("packing") or {}, result.get("attn_implementation") or "?"
    if not c.get("forwards"):
        return "no packed forward counted"
    held = f"{c['rows']} rows in {c['packs']} packs over {c['forwards']} packed forwards"
    shared = c["rows"] > c["packs"]  # some pack held two rows or more
    flash = c["varlen_calls"] + c["plain_calls"]
    if flash and not c["plain_calls"]:
        return (
            f"by the kernel: {attn}'s variable-length path, row bounds from the position ids, "
            f"in all {flash} attention calls ({held})"
        )
    if flash and shared:
        return (
            f"NOT ISOLATED: {attn} ran its plain causal kernel in {c['plain_calls']} of {flash} "
            "attention calls over packs of several rows (transformers reads row bounds from the "
            f"position ids only for a batch of one sequence), so those rows' log-probs are wrong "
            f"({held})"
        )
    if flash:
        return f"one row per pack: {attn}'s plain causal kernel needs no bounds ({held})"
    if c["mask_packed"]:
        dense = "; dense, attention still costs T^2 per pack" if attn in ("sdpa", "eager") else ""
        return (
            f"by the block mask: {attn} with the block-diagonal mask transformers built from the "
            f"position ids in {c['mask_packed']} forwards{dense} ({held})"
        )
    what = "NOT ISOLATED: no block mask" if shared else "one row per pack: nothing to keep apart"
    return f"{what} ({held})"


def row_sync_steps(rows: list[Row]) -> list[int]:
    return sorted({s for row in rows if row.spec.cuda for s in row.spec.sync_steps})


def _wanted(plan: Plan, key: str) -> bool:
    group, impl = key.split("/")
    if group == "varlen" and not plan.varlen:
        return False
    only = {"live8": "live", "varlen": "packing"}.get(group, group)  # the row's --only name
    return only in plan.only and not (impl == "trl" and plan.skip_trl)


def write_report(plan: Plan, rows: list[Row], header: dict, facts: dict) -> str:
    text = report(plan, rows, header, facts)
    plan.out.parent.mkdir(parents=True, exist_ok=True)
    plan.out.write_text(text, encoding="utf-8")
    raw = {
        "header": header,
        "fixture": {**asdict(plan.mode.fixture), **facts},
        "rows": {r.key: {**asdict(r), "mean_s": r.mean_s, "median_s": r.median_s} for r in rows},
    }
    plan.out.with_suffix(".json").write_text(json.dumps(raw, indent=1), encoding="utf-8")
    return text


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, 2 + 1 steps (CI)")
    parser.add_argument("--steps", type=int, help="measured steps per row (GPU 10, smoke 1)")
    parser.add_argument("--warmup", type=int, help="warm-up steps dropped (GPU 3, smoke 2)")
    parser.add_argument(
        "--only",
        action="append",
        choices=ROW_GROUPS,
        help="run only these rows (repeatable); default: all",
    )
    parser.add_argument("--skip-trl", action="store_true", help="run kto_lightning only")
    parser.add_argument(
        "--varlen-attn",
        metavar="IMPL",
        help="model.attn_implementation of the packing-varlen row (default: the first installed "
        "of flash_attention_2, _3, _4; e.g. flex_attention; none: no such row)",
    )
    parser.add_argument(
        "--ours-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra Hydra override for every kto_lightning row (repeatable), e.g. "
        "logprob_chunk_size=1024",
    )
    parser.add_argument(
        "--compile-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra Hydra override for the compile row only, e.g. compile.dynamic=true",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=PEAK_TFLOPS,
        help=f"the GPU's bf16 dense peak for MFU (default {PEAK_TFLOPS:g}, taken for an H200)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds for the whole script: rows that would start later are skipped and a row "
        "running past it is stopped (default: 450 on a GPU, none for --smoke; 0: none)",
    )
    parser.add_argument("--timeout", type=int, default=600, help="seconds per child run")
    parser.add_argument(
        "--jobs",
        type=int,
        help="child runs at a time: 1 on a GPU (always); --smoke: 2 (timings mean nothing there)",
    )
    parser.add_argument(
        "--fixture-dir",
        type=Path,
        default=HERE / ".fixture",
        help="where fixtures are built and cached (default benchmarks/.fixture; git-ignored)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="the Markdown report; its raw figures go beside it as .json, child logs into "
        "logs/ beside it (default benchmarks/.gpu/gpu.md, smoke.md with --smoke; git-ignored)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--build-fixture", choices=[GPU.name, SMOKE.name], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0
    if args.build_fixture:
        folder = args.fixture_dir.resolve() / args.build_fixture
        return fixture_child(args.build_fixture, str(folder))
    mode = SMOKE if args.smoke else GPU
    trl_note = None
    skip_trl = args.skip_trl
    if args.smoke and not skip_trl and importlib.util.find_spec("trl") is None:
        skip_trl = True
        trl_note = "TRL is not installed: its rows were skipped (pip install -e '.[bench]')."
    missing = missing_packages(skip_trl)
    if missing:
        print(
            f"missing packages: {', '.join(missing)} (beyond torch, transformers and "
            f"lightning, this benchmark needs {', '.join(EXTRA_PACKAGES)})",
            file=sys.stderr,
        )
        return 2
    if mode.accelerator == "gpu":
        import torch

        if not torch.cuda.is_available():
            print("no CUDA device: on a machine without a GPU, run with --smoke", file=sys.stderr)
            return 2
    jobs = args.jobs or (2 if args.smoke else 1)
    if jobs > 1 and not args.smoke:
        print("--jobs > 1 only with --smoke: on one GPU the runs would share it", file=sys.stderr)
        return 2
    budget = mode.budget_s if args.budget is None else (args.budget or None)
    varlen, varlen_note = varlen_attention(args.varlen_attn)
    out = (args.out or HERE / ".gpu" / f"{'smoke' if args.smoke else 'gpu'}.md").resolve()
    plan = Plan(
        mode=mode,
        warmup=mode.warmup if args.warmup is None else args.warmup,
        steps=mode.steps if args.steps is None else args.steps,
        only=set(args.only or ROW_GROUPS),
        skip_trl=skip_trl,
        ours_overrides=tuple(args.ours_override),
        compile_overrides=(*mode.compile_overrides, *args.compile_override),
        peak_tflops=args.peak_tflops,
        budget_s=budget,
        timeout=args.timeout,
        jobs=jobs,
        threads=max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None,
        command=shlex.join(["python", *sys.argv]),
        fixture_dir=args.fixture_dir.resolve() / mode.name,
        out=out,
        log_dir=out.parent / "logs",
        trl_note=trl_note,
        varlen=varlen,
        varlen_note=varlen_note,
    )
    if plan.steps < 1 or plan.warmup < 0:
        print("--steps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    plan.log_dir.mkdir(parents=True, exist_ok=True)
    ensure_fixture(plan)
    model_dir = plan.fixture_dir / "model"
    facts = describe(plan.fixture_dir)
    header = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "versions": versions(),
        "kto_lightning": kto_lightning_version(),
        "commit": git_commit(),
    }
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _stop_children)
    cache_dir = Path(tempfile.mkdtemp(prefix="kto_gpu_refcache_"))
    try:
        rows = plan_rows(plan, model_dir, cache_dir)
        run_all(plan, rows, header, facts, started)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    text = write_report(plan, rows, header, facts)
    print()
    print(text)
    print(f"total wall time {time.perf_counter() - started:.0f} s; report {plan.out}; child logs")
    print(f"in {plan.log_dir}")
    return 1 if any(row.error for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
