"""One benchmark configuration, run inside its own child process (see bench.py).

Each runner trains for `warmup + measured` optimizer steps and returns a dict: the seconds of every
step (batch start -> optimizer step done, data loading excluded), the tokens of every step, the
setup and reference-precompute seconds, and the process's peak RSS. The parent prints the table.
On CUDA (`accelerator="gpu"`, benchmarks/gpu.py) the device is synchronised at both ends of every
step, and the dict also holds the peak GPU memory, the wall-clock moments of the first step's start
and the last step's end, and the host synchronisations counted on `sync_steps`.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fixture import read_jsonl

SEED = 42
LEARNING_RATE = 1e-6
BETA = 0.1
BATCH_SIZE = 8


@dataclass
class ChildSpec:
    """What one child runs. `impl` is "ours" or "trl"; `reference` is "live" or "cache"."""

    impl: str
    reference: str
    model_dir: str
    rows: str
    val_rows: str
    max_length: int
    max_prompt_length: int
    steps: int
    cache_dir: str | None = None
    gradient_checkpointing: bool = False
    ours_overrides: tuple[str, ...] = ()  # extra Hydra overrides for kto_lightning (experiments)
    batch_size: int = BATCH_SIZE
    accelerator: str = "cpu"  # Lightning's trainer.accelerator: "cpu" or "gpu" (TRL: use_cpu)
    precision: str = "32-true"  # Lightning's trainer.precision; TRL runs bf16=True for "bf16-*"
    sync_steps: tuple[int, ...] = ()  # steps (from 0) whose host syncs are counted (CUDA only)
    watch_packing: bool = False  # count how packed rows were kept apart (`_watch_packing`)

    @property
    def cuda(self) -> bool:
        return self.accelerator in ("gpu", "cuda")


def child_env(datasets_cache: str, threads: int | None = None) -> dict[str, str]:
    """The children's environment: offline, no progress bars, a datasets cache of their own;
    `threads`: torch's CPU threads (several smoke children share the cores)."""
    env = dict(
        os.environ,
        HF_DATASETS_CACHE=datasets_cache,  # nothing reused from an earlier run
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TQDM_DISABLE="1",
        WANDB_MODE="disabled",
    )
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    if importlib.util.find_spec("kto_lightning") is None:  # not installed: this checkout's src/
        paths = [
            str(Path(__file__).resolve().parents[1] / "src"),
            *filter(None, [os.environ.get("PYTHONPATH")]),
        ]
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[str, float]:
    """(stdout, peak RSS in MiB) of `cmd` run to its end; SystemExit with its stderr if it fails.

    os.wait4 gives this child's own rusage: its ru_maxrss is the process itself, not the
    processes it starts (RUSAGE_CHILDREN would mix all children). Output goes to files, so a
    chatty child never blocks on a full pipe.
    """
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen(cmd, stdout=out_file, stderr=err_file, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child failed: {' '.join(cmd[:4])} ...\n{err[-4000:]}")
    return out, usage.ru_maxrss / 1024


def peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux: the high-water mark of this process alone.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


SYNC_WARNING = "synchronizing CUDA operation"  # what torch.cuda.set_sync_debug_mode("warn") says


class _Clock:
    """Step seconds and tokens, filled by a framework callback.

    With `cuda`, the device is synchronised before a step's start is read and before its end is
    read, so a step's seconds are its own GPU work, not the previous step's queue. Steps listed in
    `sync_steps` run under torch.cuda.set_sync_debug_mode("warn"), whose warnings count the host
    synchronisations of the step (the clock's own synchronize calls are outside that window).
    """

    def __init__(self, cuda: bool = False, sync_steps: tuple[int, ...] = ()) -> None:
        self.steps: list[float] = []
        self.tokens: list[int] = []  # real (unpadded) tokens of main + KL rows per step
        self.padded: list[int] = []  # padded positions of main + KL rows per step
        self.row_tokens: list[int] = []  # real tokens of the batch's own rows (not KL) per step
        self._sums: list[list[Any]] = []  # per step, the masks' sums (tensors) of `count`
        self.starts: list[float] = []  # perf_counter() at each step's start
        self.first_step_at: float | None = None
        self.first_step_wall: float | None = None  # time.time() at the first step's start
        self.last_step_end_wall: float | None = None  # time.time() at the last step's end
        self.cuda = cuda
        self.sync_steps = set(sync_steps) if cuda else set()
        self.host_syncs: list[int] = []  # synchronisations counted, one entry per counted step
        self.sync_error: str | None = None
        self._watch: Any = None
        self._caught: list[warnings.WarningMessage] = []
        self._start = 0.0

    def _synchronize(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def start(self) -> None:
        self._synchronize()
        self._start = time.perf_counter()
        self.starts.append(self._start)
        if self.first_step_at is None:
            self.first_step_at = self._start
            self.first_step_wall = time.time()
        if len(self.steps) in self.sync_steps and self.sync_error is None:
            self._watch_syncs()

    def stop(self) -> None:
        if self._watch is not None:
            self._count_syncs()
        self._synchronize()
        self.steps.append(time.perf_counter() - self._start)
        self.last_step_end_wall = time.time()

    def _watch_syncs(self) -> None:
        import torch

        try:
            self._watch = warnings.catch_warnings(record=True)
            self._caught = self._watch.__enter__()
            warnings.simplefilter("always")  # every occurrence, not once per code location
            torch.cuda.set_sync_debug_mode("warn")
        except Exception as error:  # counting is optional: never fail a run for it
            self.sync_error = repr(error)
            self._close_watch()

    def _count_syncs(self) -> None:
        import torch

        try:
            torch.cuda.set_sync_debug_mode("default")
        except Exception as error:
            self.sync_error = repr(error)
        caught = self._caught
        self._close_watch()
        if self.sync_error is None:
            self.host_syncs.append(sum(SYNC_WARNING in str(w.message) for w in caught))

    def _close_watch(self) -> None:
        watch, self._watch, self._caught = self._watch, None, []
        if watch is not None:
            watch.__exit__(None, None, None)

    def count(self, batch: dict[str, Any], prefixes: tuple[str, ...]) -> None:
        """Count a batch's tokens; `prefixes[0]` names its own rows. The sums stay where the
        masks are until `totals`: read on the host inside a step, they would synchronise it."""
        sums, padded = [], 0
        for prefix in prefixes:
            mask = batch.get(f"{prefix}attention_mask")
            if mask is not None:
                sums.append(mask.sum())
                padded += mask.numel()
        self._sums.append(sums)
        self.padded.append(padded)

    def totals(self) -> None:
        """Fill `tokens` and `row_tokens` from the sums `count` kept (after the run)."""
        self.tokens = [sum(int(x) for x in sums) for sums in self._sums]
        self.row_tokens = [int(sums[0]) if sums else 0 for sums in self._sums]


def matmul_params(model: Any) -> int:
    """Weights of every nn.Linear of `model`, the LM head included, embeddings not: the N of the
    6N FLOPs per token of a forward and backward pass."""
    from torch import nn

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def first_param_dtype(model: Any) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def attn_implementation(model: Any) -> str | None:
    """The attention implementation transformers resolved for `model` (sdpa, flash_attention_2,
    ...), read from its config: what ran, not what was asked for."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def _watch_packing() -> dict[str, int]:
    """Count, in this process, how packed rows were kept apart (kto_lightning.core.packing).

    forwards / rows / packs: packed forwards and the rows and packs (sequences) they held (shapes
    only: no device read). mask_packed: attention masks transformers built with a block per row
    (find_packed_sequence_indices found row boundaries in the position ids; sdpa, eager and flex
    apply it, flash attention ignores it). varlen_calls / plain_calls: flash attention calls that
    took the variable-length kernel with bounds from the position ids, and calls that ran the plain
    causal kernel across the whole sequence instead (transformers reads bounds from position ids
    only for a batch of one sequence).
    """
    from transformers import masking_utils
    from transformers import modeling_flash_attention_utils as flash_utils

    from kto_lightning.core import logprobs

    counts = dict(forwards=0, rows=0, packs=0, mask_packed=0, varlen_calls=0, plain_calls=0)
    pack_rows, find_packed = logprobs.pack_rows, masking_utils.find_packed_sequence_indices
    is_packed = flash_utils._is_packed_sequence

    def counted_pack_rows(input_ids, *args, **kwargs):
        packed = pack_rows(input_ids, *args, **kwargs)
        counts["forwards"] += 1
        counts["rows"] += input_ids.shape[0]
        counts["packs"] += packed.input_ids.shape[0]
        return packed

    def counted_find_packed(*args, **kwargs):
        found = find_packed(*args, **kwargs)
        counts["mask_packed"] += found is not None
        return found

    def counted_is_packed(position_ids, batch_size):
        # Its caller branches on the answer (a device read there); read here instead, once.
        varlen = bool(is_packed(position_ids, batch_size))
        counts["varlen_calls" if varlen else "plain_calls"] += position_ids is not None
        return varlen

    logprobs.pack_rows = counted_pack_rows
    masking_utils.find_packed_sequence_indices = counted_find_packed
    flash_utils._is_packed_sequence = counted_is_packed
    return counts


def _result(clock: _Clock, t0: float, **extra: Any) -> dict[str, Any]:
    import torch

    clock.totals()
    result = {
        "step_s": clock.steps,
        "tokens": clock.tokens,
        "padded": clock.padded,
        "setup_s": (clock.first_step_at or time.perf_counter()) - t0,
        "threads": torch.get_num_threads(),
        "peak_rss_mib": peak_rss_mib(),
        "row_tokens": clock.row_tokens,
        "step_start_s": [s - t0 for s in clock.starts],
        "first_step_wall": clock.first_step_wall,
        "last_step_end_wall": clock.last_step_end_wall,
        "host_syncs": clock.host_syncs,
        "sync_error": clock.sync_error,
        **extra,
    }
    if clock.cuda:
        result.update(
            cuda_peak_allocated_mib=torch.cuda.max_memory_allocated() / 2**20,
            cuda_peak_reserved_mib=torch.cuda.max_memory_reserved() / 2**20,
            device_name=torch.cuda.get_device_name(),
            device_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
            cuda_version=torch.version.cuda,
        )
    return result


# ------------------------------------------------------------------------------ kto_lightning
def ours_overrides(spec: ChildSpec, workdir: Path) -> list[str]:
    """The Hydra overrides that make kto_lightning do the same work as the TRL run."""
    overrides = [
        "model=local",
        f"model.name_or_path={spec.model_dir}",
        "data=local",
        f"data.source.path={spec.rows}",
        f"data.source.val_path={spec.val_rows}",
        f"data.batching.batch_size={spec.batch_size}",
        f"data.lengths.max_length={spec.max_length}",
        f"data.lengths.max_prompt_length={spec.max_prompt_length}",
        "data.batching.num_workers=0",
        f"seed={SEED}",
        f"optimizer.lr={LEARNING_RATE}",
        f"loss.beta={BETA}",
        "loss.estimator=mismatched",
        # TRL's default schedule: linear decay, no warmup.
        "scheduler=warmup_linear",
        "scheduler.warmup_ratio=0.0",
        f"trainer.accelerator={spec.accelerator}",
        f"trainer.precision={spec.precision}",
        f"trainer.max_steps={spec.steps}",
        "trainer.max_epochs=-1",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "+trainer.enable_checkpointing=false",
        "callbacks=none",
        "~logger",  # no logger at all
        "validate_before_training=false",
        "objective=null",
        f"paths.output_dir={workdir / 'run'}",
    ]
    if spec.gradient_checkpointing:
        overrides.append("gradient_checkpointing=true")
    if spec.reference == "cache":
        overrides += ["reference=cache", f"reference.cache_dir={spec.cache_dir}"]
    overrides += list(spec.ours_overrides)
    return overrides


def run_ours(spec: ChildSpec, workdir: Path) -> dict[str, Any]:
    """kto_lightning: compose the real config, build(), then Trainer.fit with a timing callback."""
    t0 = time.perf_counter()
    import lightning as L
    from hydra import compose, initialize_config_dir
    from torch.distributed.fsdp import FSDPModule

    from kto_lightning.cli.config_files import config_dir
    from kto_lightning.cli.run_build import build

    clock = _Clock(spec.cuda, tuple(spec.sync_steps))
    dtypes: dict[str, str] = {}

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            dtypes.setdefault("param_dtype", first_param_dtype(pl_module.policy))
            clock.count(batch, ("", "kl_"))
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.stop()

    overrides = ours_overrides(spec, workdir)
    fill_s = _time_cache_fill()
    packing = _watch_packing() if spec.watch_packing else None
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    build_start = time.perf_counter()
    run = build(cfg)
    # What fit's setup would do first: a cached reference reads or fills its table (then a no-op).
    run.module.setup("fit")
    build_s = time.perf_counter() - build_start
    run.trainer.callbacks.append(StepTimer())
    run.trainer.fit(run.module, datamodule=run.datamodule)
    return _result(
        clock,
        t0,
        build_s=build_s,
        precompute_s=fill_s["seconds"] if fill_s["calls"] else None,
        global_step=run.trainer.global_step,
        matmul_params=matmul_params(run.module.policy),
        attn_implementation=attn_implementation(run.module.policy),
        packing=packing,
        strategy=type(run.trainer.strategy).__name__,
        # fully_shard makes each module it shards an FSDPModule: proof the sharding path ran.
        sharded=any(isinstance(m, FSDPModule) for m in run.module.policy.modules()),
        **dtypes,
    )


def _time_cache_fill() -> dict[str, float]:
    """Time models.reference_cache.fill_cache (the scoring of a cache miss), if any."""
    from kto_lightning.models import reference_cache

    timing = {"seconds": 0.0, "calls": 0}
    original = reference_cache.fill_cache

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            timing["seconds"] += time.perf_counter() - start
            timing["calls"] += 1

    reference_cache.fill_cache = timed
    return timing


# ------------------------------------------------------------------------------ TRL
def run_trl(spec: ChildSpec, workdir: Path) -> dict[str, Any]:
    """TRL 1.16 KTOTrainer with the same data, model, optimizer and loss settings."""
    t0 = time.perf_counter()
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import KTOConfig, KTOTrainer

    clock = _Clock(spec.cuda, tuple(spec.sync_steps))
    precompute = {"seconds": 0.0}
    dtypes: dict[str, str] = {}

    class TimedKTOTrainer(KTOTrainer):
        def _precompute_ref_logps(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*args, **kwargs)
            finally:
                precompute["seconds"] += time.perf_counter() - start

        def training_step(self, model, inputs, *args, **kwargs):
            clock.count(inputs, ("", "KL_"))
            return super().training_step(model, inputs, *args, **kwargs)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if model is not None:
                dtypes.setdefault("param_dtype", first_param_dtype(model))
            clock.start()

        def on_step_end(self, args, state, control, **kwargs):
            clock.stop()

    tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
    policy = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32)
    live = spec.reference == "live"
    reference = None
    if live:  # a separate frozen copy, loaded from the same folder
        reference = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32)
        reference.eval().requires_grad_(False)
    n_params = matmul_params(policy)  # before KTOTrainer patches the LM head
    rows = read_jsonl(Path(spec.rows))
    train_dataset = datasets.Dataset.from_list(
        [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"]} for r in rows]
    )
    args = KTOConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=spec.batch_size,
        max_length=spec.max_length,  # TRL 1.16 has no max_prompt_length (see fixture.py)
        max_steps=spec.steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=BETA,
        loss_type="kto",
        precompute_ref_log_probs=not live,
        use_cpu=not spec.cuda,
        bf16=spec.precision.startswith("bf16"),  # KTOConfig turns bf16 on unless told otherwise
        fp16=False,
        gradient_checkpointing=spec.gradient_checkpointing,  # KTOConfig's default is True
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10**9,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=SEED,
        data_seed=SEED,
    )
    trainer = TimedKTOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=[StepTimer()],
    )
    trainer.train()
    return _result(
        clock,
        t0,
        precompute_s=precompute["seconds"] if not live else None,
        global_step=trainer.state.global_step,
        optim=getattr(args.optim, "value", str(args.optim)),
        matmul_params=n_params,
        attn_implementation=attn_implementation(policy),
        **dtypes,
    )


def run_child(spec: ChildSpec) -> dict[str, Any]:
    """Run `spec` in this process, inside a temporary working folder that is removed afterwards.

    The parent gives every child its own empty HF_DATASETS_CACHE, so no tokenization or TRL
    precompute is reused from an earlier run.
    """
    runners = {"ours": run_ours, "trl": run_trl}
    if spec.impl not in runners:
        raise ValueError(f"unknown impl {spec.impl!r}")
    home = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="kto_bench_") as tmp:
        os.chdir(tmp)  # stray relative outputs land in the temporary folder
        try:
            return runners[spec.impl](spec, Path(tmp))
        finally:
            os.chdir(home)
