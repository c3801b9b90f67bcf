"""Tests for kto_lightning.online's reward functions: the built-ins, a user's function by import
path, the reward model, and `score`'s checks of what a function returns.

The reward models are tiny Llama classifiers built from a config and written with
save_pretrained beside the byte-level tokenizer; nothing touches the network.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForSequenceClassification

from kto_lightning.data.toy import consistency_rows
from kto_lightning.errors import ConfigError, ModelLoadError, RewardError
from kto_lightning.models.byte_tokenizer import BYTE_VOCAB_SIZE, byte_level_tokenizer
from kto_lightning.online.reward_model import RewardModel
from kto_lightning.online.rewards import (
    ConsistencyVerifier,
    ExactMatch,
    RegexMatch,
    reward_from_path,
    score,
)

PROMPTS = ["What is 2 + 2?", "Name the capital of France.", "Spell cat."]


def batch(completions: list[str], rows: list[dict]) -> tuple[list[str], list[str], list[dict]]:
    return PROMPTS[: len(completions)], completions, rows


# ---------------------------------------------------------------------------------- ExactMatch


def test_exact_match_strips_whitespace_and_is_case_sensitive_by_default():
    rows = [{"answer": "4"}, {"answer": "Paris"}, {"answer": "c a t"}]
    rewards = ExactMatch()(*batch([" 4\n", "paris", "cat"], rows))
    assert rewards == [1.0, 0.0, 0.0]


def test_exact_match_options_and_non_string_answers():
    rows = [{"gold": 4}, {"gold": "Paris"}]
    assert ExactMatch(field="gold", ignore_case=True)(*batch(["4", "PARIS "], rows)) == [1.0, 1.0]
    assert ExactMatch(field="gold", strip=False)(*batch(["4 ", "Paris"], rows)) == [0.0, 1.0]


def test_exact_match_names_the_row_without_the_field():
    with pytest.raises(RewardError, match=r"ExactMatch: row 1 \(prompt 'Name the capital.*"
                       r"has no field 'answer'; its fields: gold"):  # fmt: skip
        ExactMatch()(*batch(["4", "Paris"], [{"answer": "4"}, {"gold": "Paris"}]))


# ---------------------------------------------------------------------------------- RegexMatch


def test_regex_match_searches_a_pattern_from_the_config():
    reward = RegexMatch(pattern=r"\b4\b")
    assert reward(*batch(["It is 4.", "It is 44.", "four"], [{}, {}, {}])) == [1.0, 0.0, 0.0]


def test_regex_match_takes_each_rows_pattern_from_a_field():
    rows = [{"re": r"^\d+$"}, {"re": "Paris"}, {"re": "c.t"}]
    assert RegexMatch(field="re")(*batch(["42", "It is Paris", "dog"], rows)) == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("kwargs", [{}, {"pattern": "a", "field": "re"}])
def test_regex_match_takes_exactly_one_of_pattern_and_field(kwargs):
    with pytest.raises(ConfigError, match=r"exactly one of pattern .* and field"):
        RegexMatch(**kwargs)


def test_regex_match_refuses_a_bad_pattern_when_built():
    with pytest.raises(ConfigError, match=r"^RegexMatch: pattern '\(ab' is not a valid regular"):
        RegexMatch(pattern="(ab")


def test_regex_match_names_the_row_whose_pattern_is_bad():
    rows = [{"re": "a"}, {"re": "[a-"}]
    with pytest.raises(ConfigError) as caught:
        RegexMatch(field="re")(*batch(["a", "b"], rows))
    message = str(caught.value)
    assert message.startswith("RegexMatch: field 're' of row 1 (prompt 'Name the capital")
    assert "pattern '[a-' is not a valid regular expression" in message
    assert "\n" not in message


# ------------------------------------------------------------------------ ConsistencyVerifier


@pytest.mark.parametrize("split", ["train", "validation"])
def test_consistency_verifier_scores_the_task_rows_by_their_labels(split):
    rows = consistency_rows(200, split=split)
    prompts = [row["prompt"] for row in rows]
    rewards = ConsistencyVerifier()(prompts, [row["completion"] for row in rows], rows)
    assert rewards == [1.0 if row["label"] else 0.0 for row in rows]
    assert 0 < sum(rewards) < len(rows)


def test_consistency_verifier_wants_the_object_as_a_whole_word():
    prompt = "Mia keeps a brashnt in the box. What does Mia keep in the box?"
    completions = ["A brashnt.", "brashnts", "Mia keeps a Brashnt.", "brashnt"]
    rewards = ConsistencyVerifier()([prompt] * 4, completions, [{}] * 4)
    assert rewards == [1.0, 0.0, 0.0, 1.0]


def test_consistency_verifier_refuses_a_prompt_of_another_form():
    prompts = [
        "Mia keeps a brashnt in the box. What does Mia keep in the box?",
        "Mia keeps a brashnt in the box. What does Tom keep in the box?",
    ]
    with pytest.raises(RewardError) as caught:
        ConsistencyVerifier()(prompts, ["brashnt", "brashnt"], [{}, {}])
    assert str(caught.value).startswith(
        "ConsistencyVerifier: row 1 (prompt 'Mia keeps a brashnt in the box. What does Tom keep "
        "in the bo...') is not a prompt of the bundled consistency task"
    )


# -------------------------------------------------------------------------- reward_from_path


def length_reward(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    """A user's reward function: the completion's length."""
    return [float(len(completion)) for completion in completions]


NOT_A_FUNCTION = 3


@pytest.mark.parametrize("separator", [":", "."])
def test_reward_from_path_imports_a_function(separator):
    found = reward_from_path(f"{__name__}{separator}length_reward")
    assert found is length_reward
    assert found(["p", "q"], ["ab", "abcd"], [{}, {}]) == [2.0, 4.0]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_module_xyz:fn", r"module 'no_such_module_xyz' does not import "
         r"\(ModuleNotFoundError: No module named 'no_such_module_xyz'\)"),
        (f"{__name__}:missing", rf"module '{__name__}' has no attribute 'missing'"),
        (f"{__name__}:NOT_A_FUNCTION", "names a int, which is not callable"),
        ("length_reward", "is not an import path; write it as 'package.module:function'"),
    ],
)  # fmt: skip
def test_reward_from_path_names_the_path_and_what_failed(path, message):
    with pytest.raises(ConfigError, match=rf"^reward function '{path}'.*{message}$"):
        reward_from_path(path)


# ------------------------------------------------------------------------------------- score


def test_score_returns_float32_rewards_from_lists_tensors_arrays_and_booleans():
    for result in ([1, 0.5, -2], torch.tensor([1.0, 0.5, -2.0]), np.array([1.0, 0.5, -2.0])):
        rewards = score(lambda p, c, r, result=result: result, PROMPTS, ["a", "b", "c"], [{}] * 3)
        assert rewards.dtype == torch.float32
        assert_close(rewards, torch.tensor([1.0, 0.5, -2.0]))
    booleans = score(lambda p, c, r: [True, False, True], PROMPTS, ["a", "b", "c"], [{}] * 3)
    assert booleans.tolist() == [1.0, 0.0, 1.0]


def fails_on_paris(prompts: list[str], completions: list[str], rows: list[dict]) -> list[float]:
    if "Paris" in completions:
        raise KeyError("no verifier for capitals")
    return [1.0] * len(completions)


def test_score_names_the_first_row_a_failing_function_fails_on():
    with pytest.raises(RewardError) as caught:
        score(fails_on_paris, PROMPTS, ["4", "Paris", "cat"], [{}] * 3)
    assert str(caught.value) == (
        "reward function fails_on_paris failed on row 1 (prompt 'Name the capital of France.'): "
        "KeyError: 'no verifier for capitals'"
    )
    assert isinstance(caught.value.__cause__, KeyError)


def test_score_shortens_a_long_prompt_to_an_excerpt():
    prompt = "x" * 100 + "\nsecond line"
    with pytest.raises(RewardError, match=rf"row 0 \(prompt '{'x' * 60}\.\.\.'\): KeyError"):
        score(fails_on_paris, [prompt], ["Paris"], [{}])


class Miscounting:
    def __call__(self, prompts, completions, rows):
        return [0.0] * (len(completions) - 1)


@pytest.mark.parametrize(
    ("reward_fn", "message"),
    [
        (Miscounting(), "reward function Miscounting returned 2 rewards for 3 completions; it "
         "must return one per completion"),
        (lambda p, c, r: [0.0, math.nan, 1.0], "reward function <lambda> returned nan for row 1 "
         "(prompt 'Name the capital of France.'); a reward must be a finite real number"),
        (lambda p, c, r: [0.0, 1.0, math.inf], "returned inf for row 2 (prompt 'Spell cat.')"),
        (lambda p, c, r: [0.0, 1.0, "1.0"], "returned '1.0' for row 2 (prompt 'Spell cat.')"),
        (lambda p, c, r: [None, 1.0, 0.0], "returned None for row 0 (prompt 'What is 2 + 2?')"),
        (lambda p, c, r: "101", "reward function <lambda> returned a str, not a sequence of "
         "floats (one per completion)"),
        (lambda p, c, r: 1.0, "returned a float, not a sequence"),
    ],
)  # fmt: skip
def test_score_names_the_function_and_row_of_an_unusable_result(reward_fn, message):
    with pytest.raises(RewardError) as caught:
        score(reward_fn, PROMPTS, ["4", "Paris", "cat"], [{}] * 3)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_score_passes_a_reward_functions_own_error_through():
    # The verifier's own message names the row by its index in the whole batch, not in a row
    # that score() would call alone.
    prompts = [row["prompt"] for row in consistency_rows(2)] + ["Spell cat."]
    with pytest.raises(RewardError, match=r"^ConsistencyVerifier: row 2 \(prompt 'Spell cat.'\)"):
        score(ConsistencyVerifier(), prompts, ["a", "b", "c"], [{}] * 3)


# ------------------------------------------------------------------------------- RewardModel

TEXTS = (
    ["Hi", "Mia keeps a brashnt in the box. What does Mia keep in the box?", "x"],
    ["A brashnt.", "ok", "a much longer answer than the other two, to pad them"],
)
PLAIN = [prompt + completion for prompt, completion in zip(*TEXTS, strict=True)]


def save_classifier(
    folder: Path, num_labels: int = 1, pad: bool = True, chat_template: bool = True
) -> LlamaForSequenceClassification:
    """A tiny Llama classifier with the byte tokenizer, written to `folder`; the model itself."""
    tokenizer = byte_level_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=BYTE_VOCAB_SIZE, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.2, num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id if pad else None,
    )  # fmt: skip
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def direct_logits(model: LlamaForSequenceClassification, ids: list[list[int]]) -> torch.Tensor:
    """The model's logits on each sequence of ids alone (no padding): [len(ids), num_labels]."""
    with torch.no_grad():
        return torch.cat([model(torch.tensor([one])).logits for one in ids])


def byte_ids(texts: list[str]) -> list[list[int]]:
    """The byte tokenizer's ids of `texts`: their UTF-8 bytes."""
    return [list(text.encode()) for text in texts]


def test_reward_model_scores_the_chat_rendering_alone_and_in_batches(tmp_path):
    model = save_classifier(tmp_path)
    prompts, completions = TEXTS
    # The byte tokenizer's chat template renders a user turn and an assistant turn like this.
    eos = byte_level_tokenizer().eos_token_id
    rendered = [
        [*f"<user>\n{p}\n<assistant>\n{c}".encode(), eos]
        for p, c in zip(prompts, completions, strict=True)
    ]
    one = RewardModel(str(tmp_path), batch_size=1)(prompts, completions, [{}] * 3)
    three = RewardModel(str(tmp_path), batch_size=3)(prompts, completions, [{}] * 3)
    assert_close(torch.tensor(one), direct_logits(model, rendered)[:, 0], rtol=0, atol=1e-5)
    assert_close(torch.tensor(three), torch.tensor(one), rtol=0, atol=1e-5)
    assert len(set(one)) == 3


def test_reward_model_without_a_chat_template_scores_prompt_plus_completion(tmp_path):
    model = save_classifier(tmp_path, chat_template=False)
    prompts, completions = TEXTS
    expected = direct_logits(model, byte_ids(PLAIN))
    scores = RewardModel(str(tmp_path), batch_size=2)(prompts, completions, [{}] * 3)
    assert_close(torch.tensor(scores), expected[:, 0], rtol=0, atol=1e-5)


def test_reward_model_keeps_the_end_of_a_long_text(tmp_path):
    model = save_classifier(tmp_path, chat_template=False)
    prompts, completions = TEXTS
    expected = direct_logits(model, [ids[-8:] for ids in byte_ids(PLAIN)])
    scores = RewardModel(str(tmp_path), max_length=8)(prompts, completions, [{}] * 3)
    assert_close(torch.tensor(scores), expected[:, 0], rtol=0, atol=1e-5)


def test_a_two_label_reward_model_scores_the_difference_of_its_logits(tmp_path):
    # Saved without a pad id: the reward model takes the tokenizer's, so batches of 3 work.
    model = save_classifier(tmp_path, num_labels=2, pad=False, chat_template=False)
    prompts, completions = TEXTS
    logits = direct_logits(model, byte_ids(PLAIN))
    scores = RewardModel(str(tmp_path), batch_size=3)(prompts, completions, [{}] * 3)
    assert_close(torch.tensor(scores), logits[:, 1] - logits[:, 0], rtol=0, atol=1e-5)


def test_a_reward_model_computes_in_the_dtype_asked(tmp_path):
    save_classifier(tmp_path)
    reward = RewardModel(str(tmp_path), dtype="bfloat16")
    scores = reward(*TEXTS, [{}] * 3)
    assert all(math.isfinite(s) for s in scores)
    model, _ = reward._load()
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "bf16"}, "reward.dtype must name a floating-point torch dtype"),
        ({"dtype": "int8"}, "reward.dtype must name a floating-point torch dtype"),
        ({"batch_size": 0}, "reward.batch_size must be an integer >= 1, got 0"),
    ],
)
def test_reward_model_settings_are_checked_when_built(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RewardModel("unused", **kwargs)


def test_a_three_label_model_is_refused(tmp_path):
    save_classifier(tmp_path, num_labels=3)
    with pytest.raises(ConfigError, match="is a classifier with num_labels=3; a reward model has"):
        RewardModel(str(tmp_path))(["p"], ["c"], [{}])


def test_a_missing_reward_model_is_a_model_load_error_when_first_called(tmp_path):
    reward = RewardModel(str(tmp_path / "missing"))  # builds: nothing is read yet
    with pytest.raises(ModelLoadError, match=r"reward.name_or_path='.*missing': no such folder"):
        reward(["p"], ["c"], [{}])
