"""Generation from the command line: each row is what the model itself generates for the prompt
as training renders it, and `compare=true` puts the run's reference (its step-0 policy)
beside it."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from cli import command_in_process
from kto_lightning.cli.hf_export import export_policy
from kto_lightning.cli.run_build import build
from kto_lightning.generate import main
from kto_lightning.models import TinyLlama
from kto_lightning.models.byte_tokenizer import BOS, byte_level_tokenizer
from kto_lightning.runs.checkpointing import RUN_CONFIG_KEY

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama folder, as save_pretrained writes one, with the byte-level tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_model")
    torch.manual_seed(0)
    config = TinyLlama(hidden_size=32, num_layers=1).config()
    # Large random weights: with the default 0.02 init every prompt gets the same greedy text,
    # which would not tell a prompt rendered wrongly, or padded wrongly, from a right one.
    config.initializer_range = 0.5
    LlamaForCausalLM(config).save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder


def _direct(model: torch.nn.Module, rendered: str, max_new_tokens: int) -> str:
    """Greedy text of `model` for one prompt, unpadded, its ids written by hand: the byte-level
    tokenizer's ids are the UTF-8 bytes, and BOS is the text '<|bos|>' at the start."""
    tokenizer = byte_level_tokenizer()
    head = [tokenizer.bos_token_id] if rendered.startswith(BOS) else []
    ids = torch.tensor([head + list(rendered.removeprefix(BOS).encode())])
    with torch.no_grad():
        output = model.eval().generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)


def _cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m kto_lightning.generate ARGS`, offline, run in this process."""
    return command_in_process("generate", *map(str, args), cwd=cwd)


def _rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def _main(capsys: pytest.CaptureFixture[str], *args: str | Path) -> list[dict]:
    """The command in this process (an interpreter start costs seconds): its rows, from stdout."""
    capsys.readouterr()
    assert main([*map(str, args), "out=-"]) == 0
    return _rows(capsys.readouterr().out)


def test_greedy_rows_equal_direct_generation(model_dir, tmp_path, capsys) -> None:
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "Tell me about bees."}, {"prompt": CONVERSATION, "id": 7}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out" / "generations.jsonl"
    # Batches of two prompts of different lengths: the shorter one is padded.
    args = ["prompt=Hi", f"prompts={prompts}", "max_new_tokens=12", "batch_size=2"]
    assert main([f"ckpt_path={model_dir}", *args, f"out={out}"]) == 0
    rows = _rows(out.read_text())

    assert [row["prompt"] for row in rows] == ["Hi", "Tell me about bees.", CONVERSATION]
    # The tokenizer has a chat template: text prompts are one user turn, as in chat training data.
    assert [row["rendered_prompt"] for row in rows] == [
        "<user>\nHi\n<assistant>\n",
        "<user>\nTell me about bees.\n<assistant>\n",
        "<system>\nBe brief.\n<user>\nHi there\n<assistant>\n",
    ]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    completions = [row["completion"] for row in rows]
    assert completions == [_direct(model, row["rendered_prompt"], 12) for row in rows]
    assert len(set(completions)) == 3, "the prompts must lead to different texts to tell them apart"
    assert rows[0]["settings"] == {
        "model": str(model_dir), "reference": None, "max_new_tokens": 12, "temperature": 0.0,
        "top_p": 1.0, "top_k": 0, "num_samples": 1, "seed": 0, "chat_template": True,
    }  # fmt: skip

    # chat_template=false: a text prompt as training encodes a text row (BOS + text); a
    # conversation still goes through the template.
    plain = _main(capsys, f"ckpt_path={model_dir}", *args, "chat_template=false")
    rendered = [f"{BOS}Hi", f"{BOS}Tell me about bees.", rows[2]["rendered_prompt"]]
    assert [row["rendered_prompt"] for row in plain] == rendered
    assert [row["completion"] for row in plain] == [_direct(model, r, 12) for r in rendered]
    assert plain[2]["completion"] == completions[2], "greedy: the same text, run after run"


def test_the_validation_table_generates_its_prompts_as_one_batch_with_their_own_text(
    model_dir, tmp_path
) -> None:
    # The table's prompts, of different lengths, left-padded into one generate call: each row's
    # text is what the model generates for that prompt alone, unpadded.
    from types import SimpleNamespace

    from kto_lightning.training.callbacks import GenerationsTable

    policy = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = byte_level_tokenizer()
    texts = ["Hi", "Tell me about the moon, please.", "Why is the sky blue?"]
    dataset = [SimpleNamespace(prompt_ids=tokenizer(t)["input_ids"]) for t in texts] * 2
    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(tokenizer=tokenizer, val_set=dataset), callbacks=[],
        received_sigterm=False, world_size=1, global_step=3,
    )  # fmt: skip
    module = SimpleNamespace(policy=policy, device=torch.device("cpu"))
    calls = []
    generate = policy.generate
    policy.generate = lambda **kwargs: calls.append(kwargs) or generate(**kwargs)
    rows = GenerationsTable(num_prompts=3, max_new_tokens=12).generate(trainer, module)
    assert len(calls) == 1 and calls[0]["input_ids"].shape[0] == 3, "one batch of 3 prompts"
    assert [row["prompt"] for row in rows] == texts and {row["step"] for row in rows} == {3}
    expected = [_direct(policy, text, 12) for text in texts]
    assert [row["generation"] for row in rows] == expected
    assert len(set(expected)) == 3, "the prompts tell apart: a mix-up would show"


def test_sampling_gives_each_prompt_its_samples_under_the_seed(model_dir, tmp_path, capsys) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n")  # the blank line is skipped
    sampling = ["temperature=1.0", "top_k=50", "num_samples=3", "seed=7"]
    args = [f"ckpt_path={model_dir}", f"prompts={prompts}", "max_new_tokens=10", *sampling]

    rows = _main(capsys, *args)
    assert [(row["prompt"], row["sample"]) for row in rows] == [
        (prompt, sample) for prompt in ("first prompt", "second prompt") for sample in range(3)
    ]
    assert len({row["completion"] for row in rows}) > 1, "samples, not one greedy text"

    # The same seed draws the same samples, and each model draws from it: a reference equal to the
    # policy samples the same text as the policy, which is the text of the run above.
    compared = _main(capsys, *args, f"reference_model={model_dir}")
    assert [row["policy"] for row in compared] == [row["completion"] for row in rows]
    assert [row["reference"] for row in compared] == [row["completion"] for row in rows]


def test_compare_puts_the_runs_step_zero_policy_beside_its_policy(
    make_config, tmp_path, capsys
) -> None:
    # A run directory as training leaves it, without the minute of training: build() seeds and
    # builds as a run does (its reference is the step-0 policy); noise stands in for training.
    cfg = make_config()
    run = build(cfg)
    step_zero = run.module.reference.model
    policy = copy.deepcopy(run.module.policy)
    with torch.no_grad():
        for weight in policy.parameters():
            weight.add_(0.5 * torch.randn_like(weight))
    export_policy(policy, run.datamodule.tokenizer, tmp_path / "hf_model")
    (tmp_path / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")  # what Hydra writes for a run
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    state = {f"policy.{key}": value for key, value in policy.state_dict().items()}
    torch.save({"state_dict": state, RUN_CONFIG_KEY: run.module.run_config, "global_step": 0}, ckpt)

    prompts = ["Can you tell me about bees?", "Please explain tides to me."]
    # The toy task's prompts are text: chat_template=false renders them as training did.
    args = [f"prompt={p}" for p in prompts]  # the key repeated: both prompts
    args += ["max_new_tokens=24", "chat_template=false", "compare=true"]
    result = _cli(f"ckpt_path={tmp_path}", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows((tmp_path / "generations.jsonl").read_text())  # a run's default output
    rendered = [f"{BOS}{p}" for p in prompts]
    expected = [(_direct(policy, r, 24), _direct(step_zero, r, 24)) for r in rendered]
    assert [(row["policy"], row["reference"]) for row in rows] == expected
    assert rows[0]["settings"]["reference"] == f"TinyLlama (seed {cfg.seed})"
    # The texts tell the models apart: the policy's, and a TinyLlama under another seed.
    assert all(trained != base for trained, base in expected)
    torch.manual_seed(cfg.seed + 1)
    other_seed = instantiate(cfg.model).load_policy()
    assert [_direct(other_seed, r, 24) for r in rendered] != [ref for _, ref in expected]

    # A checkpoint names its base model through the run config it stores.
    from_ckpt = _main(capsys, f"ckpt_path={ckpt}", *args)
    assert [(row["policy"], row["reference"]) for row in from_ckpt] == expected


def test_errors_are_one_line(model_dir, tmp_path, capsys) -> None:
    def error(*args: str | Path) -> str:
        capsys.readouterr()
        assert main([f"ckpt_path={args[0]}", *map(str, args[1:])]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    missing = tmp_path / "missing"
    assert error(missing, "prompt=Hi") == (
        f"error: no model folder, run directory or checkpoint at {str(missing)!r}"
    )
    unfinished = tmp_path / "run"
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "checkpoints" / "last.ckpt").write_bytes(b"")
    message = error(unfinished, "prompt=Hi")
    assert "has no hf_model/" in message and "last.ckpt" in message
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert "a LoRA adapter alone" in error(adapter, "prompt=Hi")

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert error(model_dir, f"prompts={empty}") == f"error: prompts={str(empty)!r} holds no prompts"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": oops}\n')
    assert error(model_dir, f"prompts={bad}").startswith(f"error: {bad}, line 2: not valid JSON")
    bad.write_text('{"prompt": [{"role": "robot", "content": "beep"}]}\n')
    assert "line 1, field 'prompt', message 0: unknown role 'robot'" in error(
        model_dir, f"prompts={bad}"
    )

    assert "reference_model=" in error(model_dir, "prompt=Hi", "compare=true")
    assert "temperature" in error(model_dir, "prompt=Hi", "num_samples=2")
    # The old flag style names the new form; an unknown key lists the valid ones.
    assert "(here: chat_template=false)" in error(model_dir, "--no-chat-template")
    assert "valid keys: ckpt_path, prompt, prompts" in error(model_dir, "promt=Hi")


def test_the_base_model_is_named_by_where_its_weights_came_from() -> None:
    from kto_lightning.cli.generation import base_name

    tiny = {"_target_": "kto_lightning.models.TinyLlama"}
    assert base_name({"model": {**tiny, "weights": "bundled"}, "seed": 42}) == (
        "TinyLlama (weights: bundled)"
    )
    assert base_name({"model": {**tiny, "weights": None}, "seed": 7}) == "TinyLlama (seed 7)"
    assert base_name({"model": {"name_or_path": "org/model"}}) == "org/model"
