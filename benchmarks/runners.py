"""One benchmark configuration, run inside its own child process (see bench.py).

Each runner trains for `warmup + measured` optimizer steps and returns a dict: the seconds of every
step (batch start -> optimizer step done, data loading excluded), the tokens of every step, the
setup and reference-precompute seconds, and the process's peak RSS. The parent prints the table.
"""

from __future__ import annotations

import os
import resource
import subprocess
import tempfile
import time
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


class _Clock:
    """Step seconds and tokens, filled by a framework callback."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.tokens: list[int] = []  # real (unpadded) tokens of main + KL rows per step
        self.padded: list[int] = []  # padded positions of main + KL rows per step
        self.first_step_at: float | None = None
        self._start = 0.0

    def start(self) -> None:
        self._start = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at = self._start

    def stop(self) -> None:
        self.steps.append(time.perf_counter() - self._start)

    def count(self, batch: dict[str, Any], prefixes: tuple[str, ...]) -> None:
        real = padded = 0
        for prefix in prefixes:
            mask = batch.get(f"{prefix}attention_mask")
            if mask is not None:
                real += int(mask.sum())
                padded += mask.numel()
        self.tokens.append(real)
        self.padded.append(padded)


def _result(clock: _Clock, t0: float, **extra: Any) -> dict[str, Any]:
    import torch

    return {
        "step_s": clock.steps,
        "tokens": clock.tokens,
        "padded": clock.padded,
        "setup_s": (clock.first_step_at or time.perf_counter()) - t0,
        "threads": torch.get_num_threads(),
        "peak_rss_mib": peak_rss_mib(),
        **extra,
    }


# ------------------------------------------------------------------------------ kto_lightning
def ours_overrides(spec: ChildSpec, workdir: Path) -> list[str]:
    """The Hydra overrides that make kto_lightning do the same work as the TRL run."""
    overrides = [
        "model=local",
        f"model.name_or_path={spec.model_dir}",
        "data=local",
        f"data.source.path={spec.rows}",
        f"data.source.val_path={spec.val_rows}",
        f"data.batching.batch_size={BATCH_SIZE}",
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
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
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

    from kto_lightning import train as kto_train

    clock = _Clock()

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.count(batch, ("", "kl_"))
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.stop()

    overrides = ours_overrides(spec, workdir)
    fill_s = _time_cache_fill()
    with initialize_config_dir(config_dir=str(kto_train.config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    build_start = time.perf_counter()
    run = kto_train.build(cfg)
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
    )


def _time_cache_fill() -> dict[str, float]:
    """Time kto_lightning.reference_cache.fill_cache (the scoring of a cache miss), if any."""
    from kto_lightning import reference_cache

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

    clock = _Clock()
    precompute = {"seconds": 0.0}

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
        def on_step_begin(self, args, state, control, **kwargs):
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
    rows = read_jsonl(Path(spec.rows))
    train_dataset = datasets.Dataset.from_list(
        [{"prompt": r["prompt"], "completion": r["completion"], "label": r["label"]} for r in rows]
    )
    args = KTOConfig(
        output_dir=str(workdir / "trl"),
        per_device_train_batch_size=BATCH_SIZE,
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
        use_cpu=True,
        bf16=False,  # KTOConfig turns bf16 on unless told otherwise
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
