"""The embedded default's model speaks the toy task's language: its bundled weights (the toy
task's SFT model, `make tiny-weights`) write words where a random init writes "are are are", and
answer mostly dismissively, the answers the default KTO run then turns helpful."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from cli import train_in_process
from conftest import FAST
from kto_lightning.data import toy
from kto_lightning.data.config import Columns, Source
from kto_lightning.data.splits import read_splits
from kto_lightning.models.tiny import BUNDLED, TinyLlama

# Every word the toy task's rows are made of.
TOY_TEXT = " ".join(
    [
        *(f"{topic} {fact}" for topic, fact in toy.TOPICS),
        *toy.QUESTIONS, *toy.OPENERS, *toy.CLOSERS, *toy.DISMISSALS,
    ]
)  # fmt: skip
TOY_WORDS = set(re.findall(r"[a-z]+", TOY_TEXT.lower()))


def speaks_the_task(text: str) -> bool:
    """Whether `text` has words of the task's language: 4 or more distinct ones. "are are are
    ..." has one; random bytes have almost none. (A floor, not fluency.)"""
    words = re.findall(r"[a-z]+", text.lower())
    return len({w for w in words if w in TOY_WORDS}) >= 4


def greedy(model: TinyLlama, prompt: str, max_new_tokens: int = 64) -> str:
    """The greedy answer to `prompt`, encoded as training encodes a text prompt (BOS + bytes)."""
    tokenizer = model.load_tokenizer()
    policy = model.load_policy().eval()
    ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        out = policy.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_the_check_refuses_what_a_random_init_writes():
    assert not speaks_the_task("are are are are are are are are")
    assert speaks_the_task("Sure! They turn flower nectar into honey. I hope that helps.")
    torch.manual_seed(0)
    assert not speaks_the_task(greedy(TinyLlama(weights=None), "Can you tell me about bees?"))


def test_bundled_model_answers_a_toy_question_in_words():
    answer = greedy(TinyLlama(weights=BUNDLED), "Can you tell me about bees?")
    assert speaks_the_task(answer), answer


def kind(answer: str) -> str:
    """What `answer` is: helpful where it opens as the task's desirable answers do, dismissive
    where it opens as a dismissal, else other."""
    if answer.startswith(tuple(toy.OPENERS)):
        return "helpful"
    openings = tuple(d.split("{topic}")[0] for d in toy.DISMISSALS)
    return "dismissive" if answer.startswith(openings) else "other"


def test_bundled_model_answers_the_default_runs_validation_prompts_mostly_dismissively():
    # The default run's held-out prompts (the SFT stage never saw them): its greedy answers are
    # the task's, and three in four or more brush the question off.
    prompts = read_splits(Source(), Columns(), seed=42)[1].rows["prompt"][:16]
    bundled = TinyLlama(weights=BUNDLED)
    answers = [greedy(bundled, prompt, max_new_tokens=40) for prompt in prompts]
    kinds = [kind(answer) for answer in answers]
    assert "other" not in kinds, list(zip(prompts, answers, strict=True))
    assert kinds.count("dismissive") >= 12, list(zip(prompts, answers, strict=True))


def test_default_run_starts_from_the_bundled_weights(tmp_path: Path):
    random_init = "model.weights=null"
    args = [o for o in FAST if o != random_init]
    result = train_in_process(
        *args, "trainer.limit_train_batches=2", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # validate_before_training: step 0's table is the bundled model's own greedy answers.
    rows = [json.loads(line) for line in (tmp_path / "run/generations/step_0.jsonl").open()]
    bundled = TinyLlama(weights=BUNDLED)
    assert rows and all(row["generation"] == greedy(bundled, row["prompt"]) for row in rows), rows
