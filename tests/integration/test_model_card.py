"""The model card (README.md) beside an exported policy: what it says, and that both exports,
at the end of training and from a checkpoint, write the same one."""

from __future__ import annotations

import json
import re
import shlex

import torch
import yaml

from conftest import FAST
from kto_lightning.cli.hf_export import export_checkpoint
from kto_lightning.cli.run_build import build
from kto_lightning.cli.run_fit import train
from kto_lightning.export import main as export_main
from kto_lightning.reporting.model_card import CARD_FILE, model_card

SECRET = "abc123xyz"


def _front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, card[:300]
    return yaml.safe_load(match.group(1))


def _table_value(card: str, name: str) -> float:
    """The value of `name`'s row in a `| name | value |` table of the card."""
    match = re.search(rf"^\| {re.escape(name)}[^|]* \| ([^|]+) \|$", card, re.MULTILINE)
    assert match, f"no row {name!r} in the card"
    return float(match.group(1).split()[0])


def test_a_trained_run_exports_a_card_with_its_settings_metrics_and_command(
    make_config, tmp_path
) -> None:
    overrides = ["loss.beta=0.2", f"+foo_token={SECRET}", "resume=null", "~callbacks.generations"]
    # What Hydra records for a launched run; train.train called from Python writes none.
    (tmp_path / ".hydra").mkdir()
    recorded = [*FAST, f"paths.output_dir={tmp_path}", *overrides]
    (tmp_path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(recorded))
    run = build(make_config(*overrides))
    train(make_config(*overrides), run=run)

    card = (tmp_path / "hf_model" / CARD_FILE).read_text()
    # The title names what the model is and what it learned, not one of our classes.
    title = re.search(r"^# (.*)$", card, re.MULTILINE)
    assert title and "TinyLlama" not in title.group(1), card[:500]
    assert title.group(1).startswith("A 2-layer Llama-architecture model")
    assert title.group(1).endswith("trained with KTO on kto_lightning's bundled toy task")
    # The run's health report, when the run writes one, is in the card.
    assert ("## Run health" in card) == (tmp_path / "health.json").is_file()
    header = _front_matter(card)
    assert header["library_name"] == "transformers"
    assert header["tags"][:2] == ["kto", "kto_lightning"]
    # A random-init model and the bundled toy task: no hub base model, no hub dataset.
    assert "base_model" not in header and "datasets" not in header and "license" not in header
    assert _table_value(card, "beta") == 0.2
    objective = json.loads((tmp_path / "objective.json").read_text())
    assert objective["objective"] == "val/rewards/auroc"
    # Shown to 6 significant digits.
    shown = _table_value(card, "val/rewards/auroc (the run's objective)")
    assert shown == float(f"{objective['value']:.6g}")
    last = run.trainer.callback_metrics
    assert _table_value(card, "val/kl") == float(f"{float(last['val/kl']):.6g}")
    desirable, undesirable = run.datamodule.label_counts
    assert f"train: {desirable + undesirable} rows ({desirable} desirable, {undesirable} " in card
    assert f"Trained for {run.trainer.global_step} optimizer steps" in card
    # The command: the run's overrides, `resume` left out, the secret's value never shown.
    command = re.search(r"^python -m kto_lightning.train .*$", card, re.MULTILINE)
    assert command, card
    assert shlex.split(command.group(0))[3:] == [
        *FAST, f"paths.output_dir={tmp_path}", "loss.beta=0.2", "+foo_token=***",
        "~callbacks.generations",
    ]  # fmt: skip
    assert SECRET not in card
    assert "AutoModelForCausalLM.from_pretrained(" in card

    # The export command on the run's checkpoint writes the same card.
    assert export_main([f"ckpt_path={tmp_path}", f"out={tmp_path / 'cli'}"]) == 0  # a run dir
    assert (tmp_path / "cli" / CARD_FILE).read_text() == card

    # A checkpoint away from its run directory: what only the run directory records is
    # "not recorded"; what the checkpoint holds is still there.
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["kto_lightning_config"]["paths"]["output_dir"] = str(tmp_path / "moved")
    torch.save(checkpoint, tmp_path / "alone.ckpt")
    alone = (export_checkpoint(tmp_path / "alone.ckpt", tmp_path / "alone") / CARD_FILE).read_text()
    assert "Metrics: not recorded" in alone and "## Reproduce\n\nnot recorded" in alone
    assert _table_value(alone, "beta") == 0.2


def test_card_front_matter_names_hub_models_and_datasets_and_adapters(tmp_path) -> None:
    config = {
        "model": {
            "_target_": "kto_lightning.models.Pretrained",
            "name_or_path": "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
            "lora": {"r": 16, "lora_alpha": 32},
        },
        "data": {"source": {"path": "trl-lib/kto-mix-14k", "split": "train"}},
        "resolved_loss": {"loss_type": "apo_zero_unpaired", "beta": 0.1},
        "reference": {"kind": "adapter"},
    }
    adapter = model_card(config, None, 10, {}, adapter=True)
    header = _front_matter(adapter)
    assert header["library_name"] == "peft"
    assert header["base_model"] == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert header["datasets"] == ["trl-lib/kto-mix-14k"]
    assert header["tags"] == ["kto", "kto_lightning", "apo_zero_unpaired", "lora"]
    assert 'PeftModel.from_pretrained(base, "path/to/this/folder")' in adapter
    assert "Metrics: not recorded" in adapter and "| reference model | adapter |" in adapter

    # A local base model and a local data file stay out of the header (the hub refuses them).
    config["model"]["name_or_path"] = str(tmp_path)
    config["data"]["source"]["path"] = "train.jsonl"
    local = model_card(config, None, 10, {"val/loss": 0.5}, adapter=False)
    header = _front_matter(local)
    assert header["library_name"] == "transformers"
    assert "base_model" not in header and "datasets" not in header
    assert f"the local model folder `{tmp_path}`" in local and "`train.jsonl`" in local
    assert _table_value(local, "val/loss") == 0.5


def _title(card: str) -> str:
    match = re.search(r"^# (.*)$", card, re.MULTILINE)
    assert match, card[:300]
    return match.group(1)


def test_card_title_names_the_base_model_and_the_task() -> None:
    tiny = {"_target_": "kto_lightning.models.TinyLlama", "num_layers": 1}
    cases = [
        (
            {"model": tiny, "data": {"source": {"path": "toy"}}},
            "A 1-layer Llama-architecture model initialised at random in kto_lightning, trained "
            "with KTO on kto_lightning's bundled toy task",
        ),
        (
            {"model": {**tiny, "weights": "bundled"}, "data": {"source": {"path": "toy"}}},
            "A 1-layer Llama-architecture model that kto_lightning ships, pretrained on its toy "
            "task, trained with KTO on kto_lightning's bundled toy task",
        ),
        (
            {
                "model": {"name_or_path": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"},
                "data": {"source": {"path": "trl-lib/kto-mix-14k"}},
                "resolved_loss": {"loss_type": "apo_zero_unpaired"},
            },
            "TinyLlama/TinyLlama-1.1B-Chat-v1.0 trained with APO-zero (unpaired) on "
            "trl-lib/kto-mix-14k",
        ),
        (
            {
                "model": {"name_or_path": "./models/my-llama"},
                "data": {"source": {"path": "data/feedback.jsonl"}},
            },
            "The local model `my-llama`, trained with KTO on `feedback.jsonl`",
        ),
        (
            {"model": {"run_dir": "outputs/sft/runs/t1"}},
            "The model of the kto_lightning run `t1`, trained with KTO",
        ),
    ]
    for config, expected in cases:
        assert _title(model_card(config, None, 1, {}, adapter=False)) == expected


def test_card_shows_the_run_health_report_when_the_run_wrote_one(tmp_path) -> None:
    config = {"model": {"_target_": "kto_lightning.models.TinyLlama"}}
    health = {
        "summary": "1 problem, 1 warning",
        "checks": [
            {"name": "KL clamped to 0", "value": "0% of steps", "status": "ok",
             "meaning": "unused", "try": "unused"},
            {"name": "saturated rows", "value": "40% | 90%", "status": "warn",
             "meaning": "the sigmoid is flat for many rows", "try": "lower loss.beta"},
            {"name": "class balance", "value": "9.0", "status": "bad",
             "meaning": "outside eq. 8's range", "try": "set the class weights to auto"},
        ],
    }  # fmt: skip
    (tmp_path / "health.json").write_text(json.dumps(health))
    card = model_card(config, tmp_path, 1, {}, adapter=False)
    section = card.split("## Run health\n\n", 1)[1].split("\n## ", 1)[0].strip().splitlines()
    assert section == [
        "1 problem, 1 warning",
        "",
        "| check | value | status |",
        "|---|---|---|",
        "| KL clamped to 0 | 0% of steps | ok |",
        "| saturated rows | 40% \\| 90% | warn |",
        "| class balance | 9.0 | bad |",
        "",
        "- saturated rows: the sigmoid is flat for many rows - lower loss.beta",
        "- class balance: outside eq. 8's range - set the class weights to auto",
    ]
    # Between the metrics and the command that reproduces the run.
    assert card.index("## Final metrics") < card.index("## Run health") < card.index("## Reproduce")
    (tmp_path / "health.json").unlink()
    assert "## Run health" not in model_card(config, tmp_path, 1, {}, adapter=False)
