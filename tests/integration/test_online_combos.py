"""Online KTO through the command line with the options users combine it with: LoRA with the
adapter reference, bf16-mixed, gradient accumulation and W&B offline in one run, of the step loop
and of the round loop (with the refreshed reference); and a multirun sweep that scores each job
by the held-out greedy reward. Both on a prompts file
of the user's (sums) with a reward function of the user's (vowel_share, by import path)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_online_cli import ONLINE, sums
from test_wandb import _records

from cli import command_in_process, train_in_process
from kto_lightning.cli.rebuilding import seeded_policy
from kto_lightning.runs.checkpointing import RUN_CONFIG_KEY
from kto_lightning.training.online_round import ROUND_KEY

USERS_DATA = ["data=local", "reward=function", "reward.path=test_online_cli:vowel_share"]
LORA = ["reference=adapter", "+model.lora={r: 4, lora_alpha: 8, target_modules: all-linear}"]


class LinearDtypes(Callback):
    """Writes to `path` (JSON) the dtypes the policy's linear layers computed in during the
    training steps' forward passes with gradients: the precision a step actually ran in, not the
    one the config names. A user's callback, as `+callbacks.<name>` adds one."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.seen: set[str] = set()
        self.handles: list[Any] = []

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        linears = [m for m in pl_module.policy.modules() if isinstance(m, torch.nn.Linear)]
        self.handles = [m.register_forward_hook(self._record) for m in linears]

    def _record(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if module.training and torch.is_grad_enabled():  # the loss's forward, not sampling
            self.seen.add(str(output.dtype))

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.path.write_text(json.dumps(sorted(self.seen)))


def metrics(run: Path) -> list[dict[str, str]]:
    with (run / "csv" / "metrics.csv").open(newline="") as file:
        return list(csv.DictReader(file))


def last_checkpoint(run: Path) -> dict[str, Any]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(row[name]) for row in rows if row.get(name)]


def wandb_history(run: Path) -> dict[str, list[float]]:
    """Every numeric value the offline W&B run in `run` logged, by metric name, in order."""
    (found,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    history: dict[str, list[float]] = {}
    for record in _records(found):
        if record.HasField("history"):
            for item in record.history.item:
                name = item.key or "/".join(item.nested_key)
                value = json.loads(item.value_json)
                if isinstance(value, (int, float)):
                    history.setdefault(name, []).append(float(value))
    return history


LOOPS = {
    "step": [],
    # 8 prompts a round, k = 2, 4 rows a step: a round is the 4 batches.
    "round_refresh": ["online=round", "online.round.prompts=8", "online.round.reference=refresh"],
}


@pytest.mark.parametrize("loop", list(LOOPS))
def test_online_lora_bf16_accumulation_and_wandb_offline_in_one_run(
    tmp_path: Path, loop: str
) -> None:
    sums(tmp_path)
    run = tmp_path / "run"
    wandb_env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
    }
    probe = "{_target_: test_online_combos.LinearDtypes, path: " + f"{tmp_path}/dtypes.json}}"
    result = command_in_process(
        "train", *ONLINE, *USERS_DATA, f"data.source.path={tmp_path}/sums.jsonl", *LORA,
        "trainer.precision=bf16-mixed", "trainer.accumulate_grad_batches=2",
        "trainer.limit_train_batches=4", "logger=wandb", "logger.wandb.offline=true",
        f"+callbacks.linear_dtypes={probe}", *LOOPS[loop], f"hydra.run.dir={run}",
        cwd=tmp_path, env=wandb_env, unset=["WANDB_API_KEY"],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    # Accumulation: 4 training batches, one optimizer step every 2 of them.
    checkpoint = last_checkpoint(run)
    assert checkpoint["global_step"] == 2
    assert (ROUND_KEY in checkpoint) == (loop != "step")
    rows = metrics(run)
    trained = [row for row in rows if row.get("train/loss")]
    assert [int(row["step"]) for row in trained] == [1, 2]
    assert column(rows, "train/health/run/batches")[-1] == 4.0

    # bf16-mixed ran: the run records it, and the training forward's linears computed in bf16.
    config = checkpoint[RUN_CONFIG_KEY]
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert json.loads((tmp_path / "dtypes.json").read_text()) == ["torch.bfloat16"]

    # Only the adapters trained: the checkpoint holds them alone, the optimizer steps them alone.
    state = checkpoint["state_dict"]
    assert state and all(".lora_A." in k or ".lora_B." in k for k in state), sorted(state)[:5]
    (optimizer,) = checkpoint["optimizer_states"]
    assert sum(len(group["params"]) for group in optimizer["param_groups"]) == len(state)
    still = [k for k, v in state.items() if ".lora_B." in k and not v.any()]
    assert not still, f"adapters still at their zero init: {still}"
    # The reference, the base without its adapters, is the start weights to the bit: the merged
    # export is the base rebuilt under the run's seed plus each adapter's product, nothing else.
    source = instantiate(OmegaConf.merge(OmegaConf.create(config["model"]), {"lora": None}))
    base = seeded_policy(source, config["seed"]).state_dict()
    merged = load_file(run / "hf_model" / "model.safetensors")
    assert set(merged) == set(base)
    scale = config["model"]["lora"]["lora_alpha"] / config["model"]["lora"]["r"]
    adapted = 0
    for name, weight in merged.items():
        prefix = "policy.base_model.model." + name.removesuffix(".weight")
        if f"{prefix}.lora_A.default.weight" not in state:  # embeddings, norms, lm_head
            assert torch.equal(weight, base[name]), name
            continue
        delta = state[f"{prefix}.lora_B.default.weight"] @ state[f"{prefix}.lora_A.default.weight"]
        torch.testing.assert_close(weight - scale * delta, base[name], rtol=0, atol=1e-6, msg=name)
        adapted += 1
    assert adapted == len(state) // 2

    # The online metrics reached W&B's offline run as they reached the csv, value for value.
    history = wandb_history(run)
    for name in ("train/online/reward_mean", "train/online/kept_share", "val/online/reward_greedy"):
        assert history.get(name) == column(rows, name), name
    assert len(history["train/online/reward_mean"]) == 2
    (wandb_file,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    exit_codes = [r.exit.exit_code for r in _records(wandb_file) if r.HasField("exit")]
    assert exit_codes == [0]


def test_a_sweep_of_online_runs_records_each_jobs_greedy_reward(tmp_path: Path) -> None:
    sums(tmp_path)
    sweep = tmp_path / "sweep"
    result = train_in_process(
        "-m", "loss.beta=0.05,0.2", *ONLINE, *USERS_DATA, f"data.source.path={tmp_path}/sums.jsonl",
        "export.enabled=false", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with (sweep / "sweep_results.csv").open(newline="") as file:
        jobs = list(csv.DictReader(file))
    assert [job["job"] for job in jobs] == ["0", "1"]
    betas = []
    for job in jobs:
        assert job["status"] == "completed", job
        assert job["objective"] == "val/online/reward_greedy"
        value = float(job["value"])
        assert math.isfinite(value) and 0.0 <= value <= 1.0, job  # a share of vowels
        run = Path(job["run_dir"])
        assert run.parent == sweep
        objective = json.loads((run / "objective.json").read_text())
        assert objective == {"objective": "val/online/reward_greedy", "value": value}
        assert column(metrics(run), "val/online/reward_greedy")[-1] == value
        betas.append(last_checkpoint(run)[RUN_CONFIG_KEY]["loss"]["beta"])
    assert betas == [0.05, 0.2]
