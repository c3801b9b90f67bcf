"""kto_lightning against TRL 1.16's KTOTrainer: the same KTO work, side by side, on this machine.

    python benchmarks/bench.py            # everything (about 10 minutes on 2 CPU cores)
    python benchmarks/bench.py --smoke    # tiny sizes, 1 + 1 steps: checks the plumbing
    python benchmarks/bench.py --only live --skip-trl

Work measured: a random-init Llama (hidden 256, intermediate 1024, 4 layers, 4 heads, vocab
32000), batch 8, fp32, AdamW, KTO with mismatched KL rows, no evaluation, no checkpoints, no
loggers, dataloader workers 0. Every configuration runs in a fresh child process (this script
with --child), so its peak RSS is its own. Step time runs from the start of a batch to the end of
its optimizer step (data loading excluded); the first --warmup steps are dropped.

Comparisons, each against TRL:
  (a) live reference: a separate frozen copy of the initial model, scored every step;
  (b) cached reference: kto_lightning `reference=cache` (its cache filled in a first, separately
      timed run, then reused) against TRL `precompute_ref_log_probs=True`;
  (c) peak RSS at max_length 256, 512 and 1024 on rows that fill max_length.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from fixture import FixtureSpec, build_fixture, describe
from runners import BATCH_SIZE, BETA, LEARNING_RATE, ChildSpec, child_env, run_child

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULT_TAG = "BENCH_RESULT "
OTHER_LOAD_WARNING = 0.2  # cores busy with other processes before a run is called unclean
MAX_LENGTH = 256  # of (a) and (b); max_prompt_length is half of it
# The product targets; printed with PASS/FAIL, never adjusted to the measurements.
TARGET_LIVE_SPEEDUP = 2.5  # our examples/s over TRL's, live reference
TARGET_CACHE_SPEEDUP = 1.7  # our examples/s (cache) over TRL's (precompute_ref_log_probs)
TARGET_RSS_RATIO = 0.6  # our peak RSS over TRL's, max_length 256, live reference
SMOKE_FIXTURE = FixtureSpec(
    rows=48,
    val_rows=8,
    words=20,
    long_rows=24,
    long_lengths=(64, 128),
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
)


@dataclass
class Job:
    """One child run and where its figures go in the report."""

    key: str  # e.g. "live/ours"
    label: str
    spec: ChildSpec
    warmup: int
    result: dict[str, Any] | None = None
    error: str | None = None
    wall_s: float = 0.0
    other_cores: float | None = None  # CPU cores that other processes kept busy meanwhile

    @property
    def measured(self) -> list[float]:
        return (self.result or {}).get("step_s", [])[self.warmup :]

    @property
    def mean_s(self) -> float | None:
        return statistics.fmean(self.measured) if self.measured else None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.measured) if self.measured else None

    @property
    def examples_per_s(self) -> float | None:
        return BATCH_SIZE / self.mean_s if self.mean_s else None

    @property
    def rss_mib(self) -> float | None:
        return (self.result or {}).get("peak_rss_mib")

    def per_step(self, key: str) -> float | None:
        values = (self.result or {}).get(key, [])[self.warmup :]
        return statistics.fmean(values) if values else None


@dataclass
class Plan:
    fixture_dir: Path
    fixture: FixtureSpec
    warmup: int
    steps: int
    memory_steps: int
    lengths: tuple[int, ...]
    only: set[str]
    skip_trl: bool
    gradient_checkpointing: bool
    timeout: int
    ours_overrides: tuple[str, ...] = ()
    jobs: list[Job] = field(default_factory=list)


# ------------------------------------------------------------------------------ facts
def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "lightning", "trl", "datasets", "kto_lightning"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine() -> dict[str, str]:
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "nproc": str(os.cpu_count()),
        "ram": f"{mem_kib / 1024**2:.1f} GiB",
        "cpu": cpu,
        "os": platform.platform(),
    }


def cache_config_available() -> bool:
    """Whether this checkout has `reference=cache` (conf/reference/cache.yaml)."""
    from kto_lightning.cli.config_files import config_dir

    return (config_dir() / "reference" / "cache.yaml").is_file()


# ------------------------------------------------------------------------------ planning
def plan_jobs(plan: Plan, model_dir: Path, cache_dir: Path) -> list[Job]:
    folder = plan.fixture_dir
    base = ChildSpec(
        impl="ours",
        reference="live",
        model_dir=str(model_dir),
        rows=str(folder / "rows.jsonl"),
        val_rows=str(folder / "val.jsonl"),
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_LENGTH // 2,
        steps=plan.warmup + plan.steps,
        gradient_checkpointing=plan.gradient_checkpointing,
        ours_overrides=plan.ours_overrides,
    )
    impls = ["ours"] if plan.skip_trl else ["ours", "trl"]
    names = {"ours": "kto_lightning", "trl": "TRL KTOTrainer"}
    jobs: list[Job] = []
    if "live" in plan.only:
        for impl in impls:
            spec = replace(base, impl=impl)
            jobs.append(Job(f"live/{impl}", f"{names[impl]}, live reference", spec, plan.warmup))
    if "cache" in plan.only:
        cached = replace(base, reference="cache", cache_dir=str(cache_dir))
        # First run: fills the cache (timed); one step, only its setup matters.
        jobs.append(Job("cache/fill", "kto_lightning, cache fill run", replace(cached, steps=1), 0))
        jobs.append(Job("cache/ours", "kto_lightning, cached reference", cached, plan.warmup))
        if not plan.skip_trl:
            spec = replace(base, impl="trl", reference="cache")
            label = "TRL KTOTrainer, precompute_ref_log_probs"
            jobs.append(Job("cache/trl", label, spec, plan.warmup))
    if "memory" in plan.only:
        for length in plan.lengths:
            for impl in impls:
                spec = replace(
                    base,
                    impl=impl,
                    rows=str(folder / f"long_{length}.jsonl"),
                    max_length=length,
                    max_prompt_length=length // 2,
                    steps=plan.warmup + plan.memory_steps,
                )
                label = f"{names[impl]}, live reference, max_length {length}"
                jobs.append(Job(f"memory/{length}/{impl}", label, spec, plan.warmup))
    return jobs


# ------------------------------------------------------------------------------ running
def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all processes, all cores)."""
    with open("/proc/stat", encoding="utf-8") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_job(job: Job, log_dir: Path, timeout: int) -> None:
    """Run `job` in a fresh child process; fills job.result or job.error."""
    log_path = log_dir / (job.key.replace("/", "_") + ".log")
    with tempfile.TemporaryDirectory(prefix="kto_bench_datasets_") as datasets_cache:
        env = child_env(datasets_cache)
        script = str(Path(__file__).resolve())
        cmd = [sys.executable, script, "--child", json.dumps(asdict(job.spec))]
        start, busy, ours = time.perf_counter(), _busy_cpu_s(), _children_cpu_s()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout
            )
        except subprocess.TimeoutExpired as error:
            job.error = f"timed out after {timeout} s"
            log_path.write_text(f"{error.stdout or ''}\n{error.stderr or ''}")
            return
        finally:
            job.wall_s = time.perf_counter() - start
            # Whatever the machine did beyond our child: other processes competing for the cores.
            others = (_busy_cpu_s() - busy) - (_children_cpu_s() - ours)
            job.other_cores = max(0.0, others / job.wall_s)
    log_path.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    lines = [x for x in proc.stdout.splitlines() if x.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        job.error = f"exit code {proc.returncode}; log: {log_path}\n{tail}"
        return
    job.result = json.loads(lines[-1][len(RESULT_TAG) :])
    done = len(job.result["step_s"])
    if done != job.spec.steps:
        job.error = f"ran {done} optimizer steps, {job.spec.steps} expected; log: {log_path}"


def child_main(spec_json: str) -> None:
    spec = ChildSpec(**json.loads(spec_json))
    result = run_child(spec)
    print(RESULT_TAG + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------ reporting
def _f(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def _row(label: str, job: Job | None) -> str:
    if job is None:
        return f"  {label:<44} not run"
    if job.result is None or job.error:
        return f"  {label:<44} FAILED ({(job.error or '').splitlines()[0]})"
    tokens, padded = job.per_step("tokens"), job.per_step("padded")
    return (
        f"  {label:<44} {_f(job.mean_s, '7.3f')} {_f(job.median_s, '7.3f')} "
        f"{_f(job.examples_per_s, '7.2f')} {_f(job.rss_mib, '9.0f')} "
        f"{_f(tokens, '8.0f')} {_f(padded, '8.0f')}"
    )


HEADER = (
    f"  {'':<44} {'s/step':>7} {'median':>7} {'ex/s':>7} {'peak RSS':>9} "
    f"{'tokens':>8} {'padded':>8}\n"
    f"  {'':<44} {'(mean)':>7} {'':>7} {'':>7} {'(MiB)':>9} {'/step':>8} {'/step':>8}"
)


def _ratio_row(ours: Job | None, theirs: Job | None) -> str:
    if ours is None or theirs is None:
        return f"  {'ratio ours / TRL':<44} n/a"
    speed = _ratio(ours.examples_per_s, theirs.examples_per_s)
    rss = _ratio(ours.rss_mib, theirs.rss_mib)
    return f"  {'ratio ours / TRL':<44} {'':>7} {'':>7} {_f(speed, '6.2f')}x {_f(rss, '8.2f')}x"


def _target(name: str, value: float | None, bound: float, at_least: bool) -> tuple[str, str]:
    if value is None:
        verdict = "NOT RUN"
    else:
        verdict = "PASS" if (value >= bound if at_least else value <= bound) else "FAIL"
    relation = ">=" if at_least else "<="
    return verdict, f"  [{verdict}] {name}: {_f(value, '.2f')}x (target {relation} {bound}x)"


def report(plan: Plan, jobs: dict[str, Job], fixture_facts: dict, header: dict) -> str:
    get = jobs.get
    spec = plan.fixture
    trl_optims = {(j.result or {}).get("optim") for j in jobs.values() if j.spec.impl == "trl"}
    trl_optim = ", ".join(sorted(o for o in trl_optims if o)) or "n/a"
    lines = [
        "kto_lightning vs TRL KTOTrainer: KTO training throughput and peak memory on CPU",
        f"  date {header['date']}; python {header['versions']['python']}, "
        + ", ".join(f"{k} {v}" for k, v in header["versions"].items() if k != "python"),
        f"  machine: {header['machine']['nproc']} CPUs ({header['machine']['cpu']}), "
        f"{header['machine']['ram']} RAM; torch threads per run: {header['threads']}",
        f"  model: random-init LlamaForCausalLM, vocab {spec.vocab_size}, hidden "
        f"{spec.hidden_size}, intermediate {spec.intermediate_size}, {spec.num_hidden_layers} "
        f"layers, {spec.num_attention_heads} heads ({spec.num_key_value_heads} KV heads), fp32",
        f"  data: {fixture_facts['rows']} unpaired rows ({fixture_facts['desirable']} desirable), "
        f"~{fixture_facts['mean_words']:.0f} words per prompt and per completion, "
        f"~{fixture_facts['mean_prompt_tokens']:.0f} + "
        f"~{fixture_facts['mean_completion_tokens']:.0f} tokens per row (BPE tokenizer trained "
        f"locally, {fixture_facts['tokenizer_vocab']} tokens learned of a {spec.vocab_size} "
        "target)",
        f"  training: batch {BATCH_SIZE}, AdamW lr {LEARNING_RATE:g} (linear decay, no warmup), "
        f"beta {BETA}, mismatched KL rows, gradient clipping 1.0, gradient checkpointing "
        f"{'on' if plan.gradient_checkpointing else 'off'} (both); TRL optim={trl_optim}",
        f"  kto_lightning overrides beyond the benchmark's: {' '.join(plan.ours_overrides)}"
        if plan.ours_overrides
        else "  kto_lightning: the benchmark's overrides only (see benchmarks/runners.py)",
        f"  timing: {plan.warmup} warm-up + {plan.steps} measured optimizer steps "
        f"((c): {plan.warmup} + {plan.memory_steps}); examples/s = {BATCH_SIZE} / mean s/step; "
        "tokens and padded positions count main + KL rows",
        "",
        f"(a) live reference (a separate frozen copy), max_length {MAX_LENGTH}",
        HEADER,
        _row("kto_lightning", get("live/ours")),
        _row("TRL KTOTrainer", get("live/trl")),
        _ratio_row(get("live/ours"), get("live/trl")),
        "",
        "(b) cached reference log-probs",
        HEADER,
        _row("kto_lightning reference=cache", get("cache/ours")),
        _row("TRL precompute_ref_log_probs=True", get("cache/trl")),
        _ratio_row(get("cache/ours"), get("cache/trl")),
    ]
    fill, ours_cached, trl_cached = get("cache/fill"), get("cache/ours"), get("cache/trl")
    if fill is not None and fill.result is not None:
        lines.append(
            f"  kto_lightning cache fill (first run, fill_cache): "
            f"{_f(fill.result.get('precompute_s'), '.1f')} s; build() + module.setup() "
            f"{fill.result['build_s']:.1f} s on a miss vs "
            f"{_f((ours_cached.result or {}).get('build_s') if ours_cached else None, '.1f')} s "
            "when the cache is reused"
        )
        if ours_cached and ours_cached.result and ours_cached.result.get("precompute_s"):
            lines.append("  WARNING: the measured cached run filled the cache again (a miss)")
    if trl_cached is not None and trl_cached.result is not None:
        lines.append(
            f"  TRL precompute_ref_log_probs (in KTOTrainer.__init__): "
            f"{trl_cached.result['precompute_s']:.1f} s"
        )
    lines += [
        "",
        "(c) peak RSS on rows that fill max_length (prompt max_length/2 incl. BOS, completion "
        "cut at max_length), live reference",
        HEADER,
    ]
    for length in plan.lengths if "memory" in plan.only else []:
        ours, trl = get(f"memory/{length}/ours"), get(f"memory/{length}/trl")
        lines += [
            _row(f"kto_lightning, max_length {length}", ours),
            _row(f"TRL KTOTrainer, max_length {length}", trl),
            _ratio_row(ours, trl),
        ]
    live_ours, live_trl = get("live/ours"), get("live/trl")
    targets = [
        _target(
            "examples/s, live reference, ours / TRL",
            _ratio(live_ours.examples_per_s, live_trl.examples_per_s)
            if live_ours and live_trl
            else None,
            TARGET_LIVE_SPEEDUP,
            at_least=True,
        ),
        _target(
            "examples/s, our cache / TRL precompute_ref_log_probs",
            _ratio(ours_cached.examples_per_s, trl_cached.examples_per_s)
            if ours_cached and trl_cached
            else None,
            TARGET_CACHE_SPEEDUP,
            at_least=True,
        ),
        _target(
            "peak RSS, live reference, max_length 256, ours / TRL",
            _ratio(live_ours.rss_mib, live_trl.rss_mib) if live_ours and live_trl else None,
            TARGET_RSS_RATIO,
            at_least=False,
        ),
    ]
    lines += ["", "targets"] + [line for _, line in targets]
    busy = [job for job in jobs.values() if job.other_cores is not None]
    worst = max(busy, key=lambda job: job.other_cores) if busy else None
    if worst is not None:
        mean_other = statistics.fmean(job.other_cores for job in busy)
        lines += [
            "",
            f"machine load from other processes during the runs: ~{mean_other:.2f} cores on "
            f"average, ~{worst.other_cores:.2f} at most ({worst.key})",
        ]
        if worst.other_cores > OTHER_LOAD_WARNING:
            lines.append(
                "  WARNING: other processes competed for the CPUs; these figures are not clean"
            )
    failures = [job for job in jobs.values() if job.error]
    if failures:
        lines += ["", "failed runs"]
        for job in failures:
            lines += [f"  {job.key}: {job.error}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=8, help="measured steps, (a) and (b)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps dropped per run")
    parser.add_argument("--memory-steps", type=int, default=2, help="measured steps in (c)")
    parser.add_argument(
        "--memory-lengths", default="256,512,1024", help="max_length values of (c), comma-separated"
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=["live", "cache", "memory"],
        help="run only these comparisons (repeatable); default: all three",
    )
    parser.add_argument("--skip-trl", action="store_true", help="run kto_lightning only")
    parser.add_argument(
        "--ours-override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra Hydra override for kto_lightning's runs (repeatable), to try a setting, "
        "e.g. logprob_chunk_size=256; the report names them",
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="turn gradient checkpointing on in both (off by default in both; TRL's default is on)",
    )
    parser.add_argument(
        "--fixture-dir",
        type=Path,
        default=HERE / ".fixture",
        help="where the fixture is built and cached (default: benchmarks/.fixture)",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 + 1 steps: plumbing")
    parser.add_argument("--json", type=Path, help="also write every raw figure to this file")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per child run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0
    fixture = SMOKE_FIXTURE if args.smoke else FixtureSpec()
    lengths = tuple(int(x) for x in args.memory_lengths.split(","))
    if args.smoke:
        lengths = fixture.long_lengths
        args.steps, args.warmup, args.memory_steps = 1, 1, 1
    missing = [n for n in lengths if n not in fixture.long_lengths]
    if missing:
        raise SystemExit(
            f"--memory-lengths: no long rows for {missing}; the fixture has "
            f"{list(fixture.long_lengths)}"
        )
    fixture_dir = args.fixture_dir.resolve() / ("smoke" if args.smoke else "full")
    plan = Plan(
        fixture_dir=fixture_dir,
        fixture=fixture,
        warmup=args.warmup,
        steps=args.steps,
        memory_steps=args.memory_steps,
        lengths=lengths,
        only=set(args.only or ["live", "cache", "memory"]),
        skip_trl=args.skip_trl,
        gradient_checkpointing=args.gradient_checkpointing,
        timeout=args.timeout,
        ours_overrides=tuple(args.ours_override),
    )
    if not args.skip_trl:
        try:
            metadata.version("trl")
        except metadata.PackageNotFoundError:
            raise SystemExit(
                "TRL is not installed: pip install -e '.[bench]' (or pass --skip-trl)"
            ) from None
    started = time.perf_counter()
    model_dir = build_fixture(fixture_dir, fixture)
    facts = describe(fixture_dir)
    notes = []
    if "cache" in plan.only and not cache_config_available():
        plan.only.discard("cache")
        notes.append(
            "(b) not yet runnable: this checkout has no conf/reference/cache.yaml "
            "(reference=cache reference.cache_dir=...)"
        )
    log_dir = fixture_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    cache_dir = Path(tempfile.mkdtemp(prefix="kto_bench_refcache_"))
    jobs = plan_jobs(plan, model_dir, cache_dir)
    try:
        for i, job in enumerate(jobs, 1):
            print(f"[{i}/{len(jobs)}] {job.label} ...", end=" ", flush=True)
            run_job(job, log_dir, plan.timeout)
            if job.result is None:
                print(f"FAILED after {job.wall_s:.0f} s\n{job.error}", flush=True)
            else:
                print(
                    f"{job.wall_s:.0f} s (mean step {_f(job.mean_s, '.3f')} s, "
                    f"peak RSS {job.rss_mib:.0f} MiB, other processes ~{job.other_cores:.2f} "
                    "cores)",
                    flush=True,
                )
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    threads = sorted({str(j.result["threads"]) for j in jobs if j.result})
    header = {
        "date": time.strftime("%Y-%m-%d"),
        "versions": versions(),
        "machine": machine(),
        "threads": ", ".join(threads) or "n/a",
    }
    text = report(plan, {job.key: job for job in jobs}, facts, header)
    print()
    print(text)
    for note in notes:
        print(note)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s; child logs in {log_dir}")
    if args.json:
        raw = {
            "header": header,
            "fixture": {**asdict(fixture), **facts},
            "jobs": {
                j.key: {**asdict(j), "mean_s": j.mean_s, "median_s": j.median_s} for j in jobs
            },
        }
        args.json.write_text(json.dumps(raw, indent=2))
    return 1 if any(job.error for job in jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
