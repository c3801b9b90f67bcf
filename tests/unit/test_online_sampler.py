"""Tests for kto_lightning.online.sampler: HFSampler on a random tiny Llama and the byte-level
tokenizer: what it draws, in which order, how it stops, and what it leaves as it was (the
caller's random state, the model's train mode)."""

from __future__ import annotations

import pytest
import torch

from kto_lightning.core.logprobs import CausalLM
from kto_lightning.data.prompts import prompt_ids
from kto_lightning.errors import ConfigError
from kto_lightning.models.byte_tokenizer import byte_level_tokenizer
from kto_lightning.models.tiny import TinyLlama
from kto_lightning.online.sampler import HFSampler, Sampler, Samples

TOKENIZER = byte_level_tokenizer()
# Different lengths, so that the batch is padded on the left.
PROMPTS = [
    prompt_ids(text, TOKENIZER, chat_template=False, where=f"prompt {i}")
    for i, text in enumerate(["Q: 2+2=", "hello there, how are you", "x"])
]


def tiny_model(seed: int = 0, **sizes: object) -> CausalLM:
    torch.manual_seed(seed)
    settings: dict = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_seq_len": 128}
    return TinyLlama(weights=None, **(settings | sizes)).load_policy()


@pytest.fixture(scope="module")
def model() -> CausalLM:
    return tiny_model()


def sampler(**settings: object) -> HFSampler:
    return HFSampler.from_tokenizer(TOKENIZER, **({"max_new_tokens": 8} | settings))


def greedy_alone(model: CausalLM, ids: list[int], max_new_tokens: int) -> list[int]:
    """One prompt's greedy completion, generated alone (no padding), cut after its EOS."""
    with torch.no_grad():
        output = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=TOKENIZER.pad_token_id,
            eos_token_id=TOKENIZER.eos_token_id,
        )
    new = output[0, len(ids) :].tolist()
    eos = TOKENIZER.eos_token_id
    return new[: new.index(eos) + 1] if eos in new else new


def test_hf_sampler_is_a_sampler() -> None:
    def draw(s: Sampler) -> int:  # a type checker holds HFSampler to the protocol here
        return s.k

    assert draw(sampler(k=2)) == 2


def test_greedy_rows_equal_each_prompts_own_generation(model: CausalLM) -> None:
    samples = sampler(k=1, temperature=0.0, max_new_tokens=12).sample(model, PROMPTS, seed=0)
    assert samples.completion_ids == [greedy_alone(model, ids, 12) for ids in PROMPTS]
    assert samples.prompt_index.tolist() == [0, 1, 2]


def test_k_samples_of_each_prompt_come_contiguous(model: CausalLM) -> None:
    k = 3
    # A temperature this low samples each prompt's greedy completion: the rows show their prompt.
    samples = sampler(k=k, temperature=1e-4, max_new_tokens=6).sample(model, PROMPTS, seed=1)
    assert len(samples) == len(PROMPTS) * k
    assert samples.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    greedy = [greedy_alone(model, ids, 6) for ids in PROMPTS]
    assert len({tuple(g) for g in greedy}) == len(PROMPTS)  # the prompts are told apart
    assert samples.completion_ids == [g for g in greedy for _ in range(k)]


def test_the_same_seed_draws_the_same_samples_and_another_seed_others(model: CausalLM) -> None:
    draw = sampler(k=4, temperature=1.0)
    first = draw.sample(model, PROMPTS, seed=7)
    assert draw.sample(model, PROMPTS, seed=7).completion_ids == first.completion_ids
    assert draw.sample(model, PROMPTS, seed=8).completion_ids != first.completion_ids
    # The k samples of one prompt differ from each other.
    assert len({tuple(c) for c in first.completion_ids[:4]}) > 1


def test_the_callers_random_state_is_untouched(model: CausalLM) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    expected = torch.rand(3)
    torch.set_rng_state(before)
    sampler(k=2, temperature=1.0).sample(model, PROMPTS, seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("training", [True, False])
def test_the_models_mode_is_restored(model: CausalLM, training: bool) -> None:
    model.train(training)
    sampler(k=1, temperature=0.0).sample(model, PROMPTS, seed=0)
    assert model.training is training
    assert all(module.training is training for module in model.modules())


def test_the_models_mode_is_restored_when_generation_fails(
    model: CausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = {}

    def failing_generate(*args: object, **kwargs: object) -> None:
        seen.update(training=model.training, grad=torch.is_grad_enabled())
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model, "generate", failing_generate)
    model.train()
    before = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="out of memory"):
        sampler(k=1, temperature=0.0).sample(model, PROMPTS, seed=0)
    assert seen == {"training": False, "grad": False}  # it ran in eval mode, without gradients
    assert model.training
    assert torch.equal(torch.get_rng_state(), before)


def test_a_model_with_dropout_samples_alike_from_train_and_eval_mode() -> None:
    model = tiny_model(dropout=0.5, disable_dropout=False)
    draw = sampler(k=2, temperature=1.0, max_new_tokens=12)
    model.train()
    from_train = draw.sample(model, PROMPTS, seed=3).completion_ids
    model.eval()
    from_eval = draw.sample(model, PROMPTS, seed=3).completion_ids
    assert from_train == from_eval
    # The dropout acts in train mode: generating there directly gives other samples.
    model.train()
    with torch.no_grad():
        torch.manual_seed(3)
        a = model.generate(torch.tensor([PROMPTS[1]]), do_sample=True, max_new_tokens=12, top_k=0)
        model.eval()
        torch.manual_seed(3)
        b = model.generate(torch.tensor([PROMPTS[1]]), do_sample=True, max_new_tokens=12, top_k=0)
    assert not torch.equal(a, b)


def test_a_stop_token_ends_the_completion_and_is_kept(model: CausalLM) -> None:
    free = sampler(k=1, temperature=0.0, max_new_tokens=10).sample(model, PROMPTS, seed=0)
    assert not free.stopped.any() and all(len(c) == 10 for c in free.completion_ids)
    stop = free.completion_ids[1][3]  # a token the second prompt's greedy completion writes
    cut = sampler(k=1, temperature=0.0, max_new_tokens=10, stop_token_ids=[stop])
    samples = cut.sample(model, PROMPTS, seed=0)
    for before, after, stopped in zip(
        free.completion_ids, samples.completion_ids, samples.stopped.tolist(), strict=True
    ):
        if stop in before:
            assert after == before[: before.index(stop) + 1] and stopped
        else:
            assert after == before and not stopped
    assert samples.stopped[1]


def test_max_new_tokens_bounds_every_completion(model: CausalLM) -> None:
    samples = sampler(k=2, temperature=1.0, max_new_tokens=3).sample(model, PROMPTS, seed=0)
    assert [len(c) for c in samples.completion_ids] == [3] * 6
    assert not samples.stopped.any()


def test_samples_decode_and_time_the_draw(model: CausalLM) -> None:
    samples = sampler(k=1, temperature=0.0, stop_token_ids=[TOKENIZER.encode("a")[0]]).sample(
        model, PROMPTS, seed=0
    )
    texts = samples.texts(TOKENIZER)
    assert texts == [TOKENIZER.decode(c, skip_special_tokens=True) for c in samples.completion_ids]
    assert samples.seconds > 0


def test_no_prompts_draw_nothing(model: CausalLM) -> None:
    samples = sampler(k=2).sample(model, [], seed=0)
    assert isinstance(samples, Samples) and len(samples) == 0 and samples.seconds == 0.0


def test_an_empty_prompt_is_refused(model: CausalLM) -> None:
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        sampler(k=1).sample(model, [[1, 2], []], seed=0)


def test_from_tokenizer_takes_its_end_and_pad_ids() -> None:
    made = sampler(k=2, stop_token_ids=[10])
    assert (made.eos_token_id, made.pad_token_id) == (257, 258)
    config = made.generation_config(tiny_model())
    assert config.eos_token_id == [10, 257] and config.pad_token_id == 258
    assert (config.do_sample, config.top_k, config.num_return_sequences) == (True, 0, 1)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"k": 0}, "online.sampling.k must be an integer >= 1"),
        ({"max_new_tokens": 0}, "online.sampling.max_new_tokens must be an integer >= 1"),
        ({"temperature": -1.0}, "online.sampling.temperature must be >= 0"),
        ({"top_p": 0.0}, r"online.sampling.top_p must be in \(0, 1\]"),
        ({"k": 2, "temperature": 0.0}, "online.sampling.k=2 with online.sampling.temperature=0"),
        ({"stop_token_ids": [-1]}, "online.sampling.stop_token_ids must be token ids"),
    ],
)
def test_settings_are_checked(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sampler(**settings)
