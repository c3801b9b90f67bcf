"""Tests for kto_lightning.online.sampler: HFSampler on a random tiny Llama and the byte-level
tokenizer: what it draws, in which order, how it stops, what it leaves as it was (the caller's
random state, the model's train mode), that a prompt's draw depends on its own seed alone (not on
the prompts beside it), and that the counter-based Gumbel noise samples softmax(logits / T)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from kto_lightning.core.logprobs import CausalLM
from kto_lightning.data.prompts import prompt_ids
from kto_lightning.errors import ConfigError
from kto_lightning.models.byte_tokenizer import byte_level_tokenizer
from kto_lightning.models.tiny import TinyLlama
from kto_lightning.online.noise import GumbelNoise, gumbel_noise, mix64, row_keys, uniforms
from kto_lightning.online.sampler import HFSampler, Sampler, Samples

TOKENIZER = byte_level_tokenizer()
# Different lengths, so that the batch is padded on the left.
PROMPTS = [
    prompt_ids(text, TOKENIZER, chat_template=False, where=f"prompt {i}")
    for i, text in enumerate(["Q: 2+2=", "hello there, how are you", "x"])
]
SEEDS = [11, 22, 33]  # one per prompt


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
    samples = sampler(k=1, temperature=0.0, max_new_tokens=12).sample(model, PROMPTS, SEEDS)
    assert samples.completion_ids == [greedy_alone(model, ids, 12) for ids in PROMPTS]
    assert samples.prompt_index.tolist() == [0, 1, 2]


def test_k_samples_of_each_prompt_come_contiguous(model: CausalLM) -> None:
    k = 3
    # A temperature this low samples each prompt's greedy completion: the rows show their prompt.
    samples = sampler(k=k, temperature=1e-4, max_new_tokens=6).sample(model, PROMPTS, SEEDS)
    assert len(samples) == len(PROMPTS) * k
    assert samples.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    greedy = [greedy_alone(model, ids, 6) for ids in PROMPTS]
    assert len({tuple(g) for g in greedy}) == len(PROMPTS)  # the prompts are told apart
    assert samples.completion_ids == [g for g in greedy for _ in range(k)]


def test_greedy_draws_ignore_the_seeds(model: CausalLM) -> None:
    draw = sampler(k=1, temperature=0.0, max_new_tokens=8)
    assert draw.logits_processors(SEEDS, prompt_width=5) == []
    first = draw.sample(model, PROMPTS, SEEDS).completion_ids
    assert draw.sample(model, PROMPTS, [-1, 2**70, 0]).completion_ids == first


def test_the_same_seeds_draw_the_same_samples_and_other_seeds_others(model: CausalLM) -> None:
    draw = sampler(k=4, temperature=1.0)
    first = draw.sample(model, PROMPTS, SEEDS).completion_ids
    assert draw.sample(model, PROMPTS, SEEDS).completion_ids == first
    # A new seed for prompt 1 redraws prompt 1's four samples, and only those.
    other = draw.sample(model, PROMPTS, [11, 23, 33]).completion_ids
    assert other[:4] == first[:4] and other[8:] == first[8:]
    assert other[4:8] != first[4:8]
    # The k samples of one prompt differ from each other.
    assert len({tuple(c) for c in first[:4]}) > 1


def by_prompt(completions: list[list[int]], k: int) -> list[list[list[int]]]:
    """N = n * k completions -> each prompt's k."""
    return [completions[i : i + k] for i in range(0, len(completions), k)]


def test_a_prompts_samples_do_not_depend_on_the_prompts_beside_it(model: CausalLM) -> None:
    k = 3
    draw = sampler(k=k, temperature=1.0, max_new_tokens=10)
    alone = [
        draw.sample(model, [ids], [seed]).completion_ids
        for ids, seed in zip(PROMPTS, SEEDS, strict=True)
    ]
    # All together: other companions, a left padding as wide as the longest prompt.
    together = by_prompt(draw.sample(model, PROMPTS, SEEDS).completion_ids, k)
    assert together == alone
    # In the reverse order, and beside a prompt longer than any (wider padding still).
    longer = prompt_ids("a longer prompt than the rest " * 2, TOKENIZER, False, where="long")
    order = [2, 1, 0]
    mixed = draw.sample(
        model, [longer] + [PROMPTS[i] for i in order], [5] + [SEEDS[i] for i in order]
    )
    assert by_prompt(mixed.completion_ids, k)[1:] == [alone[i] for i in order]
    # Two ranks that each draw half of a batch draw what one process draws for all of it.
    batch, seeds = [*PROMPTS, longer], [*SEEDS, 5]
    whole = draw.sample(model, batch, seeds).completion_ids
    halves = [draw.sample(model, batch[i : i + 2], seeds[i : i + 2]) for i in (0, 2)]
    assert whole == halves[0].completion_ids + halves[1].completion_ids
    # The samples are not all alike, so the comparisons above could fail.
    assert len({tuple(c) for c in whole}) > len(batch)


def test_the_global_random_state_is_untouched_and_plays_no_part(model: CausalLM) -> None:
    draw = sampler(k=2, temperature=1.0)
    torch.manual_seed(1)
    before = torch.get_rng_state()
    first = draw.sample(model, PROMPTS, SEEDS).completion_ids
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(2)
    assert draw.sample(model, PROMPTS, SEEDS).completion_ids == first


def test_the_models_own_generation_config_still_applies(
    model: CausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = greedy_alone(model, PROMPTS[1], 12)
    banned = plain[:4]  # the greedy completion's first tokens, which the model's config bans
    monkeypatch.setattr(model.generation_config, "suppress_tokens", banned)
    constrained = greedy_alone(model, PROMPTS[1], 12)
    assert constrained[0] != plain[0]
    # A temperature this low samples the greedy completion, here the constrained one.
    low = sampler(k=1, temperature=1e-4, max_new_tokens=12)
    assert low.sample(model, PROMPTS[1:2], [0]).completion_ids == [constrained]
    free = sampler(k=4, temperature=1.0, max_new_tokens=12).sample(model, PROMPTS, SEEDS)
    assert not {t for c in free.completion_ids for t in c} & set(banned)


def test_one_seed_per_prompt_is_required(model: CausalLM) -> None:
    with pytest.raises(ValueError, match="sample got 2 seeds for 3 prompts; give one seed per"):
        sampler(k=2).sample(model, PROMPTS, [1, 2])
    with pytest.raises(ValueError, match="sample got 1 seeds for 0 prompts"):
        sampler(k=2).sample(model, [], [1])


def test_the_callers_random_state_is_untouched(model: CausalLM) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    expected = torch.rand(3)
    torch.set_rng_state(before)
    sampler(k=2, temperature=1.0).sample(model, PROMPTS, SEEDS)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("training", [True, False])
def test_the_models_mode_is_restored(model: CausalLM, training: bool) -> None:
    model.train(training)
    sampler(k=1, temperature=0.0).sample(model, PROMPTS, SEEDS)
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
        sampler(k=1, temperature=0.0).sample(model, PROMPTS, SEEDS)
    assert seen == {"training": False, "grad": False}  # it ran in eval mode, without gradients
    assert model.training
    assert torch.equal(torch.get_rng_state(), before)


def test_a_model_with_dropout_samples_alike_from_train_and_eval_mode() -> None:
    model = tiny_model(dropout=0.5, disable_dropout=False)
    draw = sampler(k=2, temperature=1.0, max_new_tokens=12)
    model.train()
    from_train = draw.sample(model, PROMPTS, SEEDS).completion_ids
    model.eval()
    from_eval = draw.sample(model, PROMPTS, SEEDS).completion_ids
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
    free = sampler(k=1, temperature=0.0, max_new_tokens=10).sample(model, PROMPTS, SEEDS)
    assert not free.stopped.any() and all(len(c) == 10 for c in free.completion_ids)
    stop = free.completion_ids[1][3]  # a token the second prompt's greedy completion writes
    cut = sampler(k=1, temperature=0.0, max_new_tokens=10, stop_token_ids=[stop])
    samples = cut.sample(model, PROMPTS, SEEDS)
    for before, after, stopped in zip(
        free.completion_ids, samples.completion_ids, samples.stopped.tolist(), strict=True
    ):
        if stop in before:
            assert after == before[: before.index(stop) + 1] and stopped
        else:
            assert after == before and not stopped
    assert samples.stopped[1]


def test_max_new_tokens_bounds_every_completion(model: CausalLM) -> None:
    samples = sampler(k=2, temperature=1.0, max_new_tokens=3).sample(model, PROMPTS, SEEDS)
    assert [len(c) for c in samples.completion_ids] == [3] * 6
    assert not samples.stopped.any()


def test_samples_decode_and_time_the_draw(model: CausalLM) -> None:
    samples = sampler(k=1, temperature=0.0, stop_token_ids=[TOKENIZER.encode("a")[0]]).sample(
        model, PROMPTS, SEEDS
    )
    texts = samples.texts(TOKENIZER)
    assert texts == [TOKENIZER.decode(c, skip_special_tokens=True) for c in samples.completion_ids]
    assert samples.seconds > 0


def test_no_prompts_draw_nothing(model: CausalLM) -> None:
    samples = sampler(k=2).sample(model, [], [])
    assert isinstance(samples, Samples) and len(samples) == 0 and samples.seconds == 0.0


def test_an_empty_prompt_is_refused(model: CausalLM) -> None:
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        sampler(k=1).sample(model, [[1, 2], []], [0, 1])


def test_from_tokenizer_takes_its_end_and_pad_ids() -> None:
    made = sampler(k=2, stop_token_ids=[10])
    assert (made.eos_token_id, made.pad_token_id) == (257, 258)
    config = made.generation_config(tiny_model())
    assert config.eos_token_id == [10, 257] and config.pad_token_id == 258
    # Greedy generate: the sampling comes from the processors.
    assert (config.do_sample, config.num_return_sequences) == (False, 1)


@pytest.mark.parametrize(
    ("top_p", "kinds"),
    [
        (1.0, [TemperatureLogitsWarper, GumbelNoise]),
        (0.9, [TemperatureLogitsWarper, TopPLogitsWarper, GumbelNoise]),
    ],
)
def test_the_processors_warp_then_add_noise(top_p: float, kinds: list[type]) -> None:
    processors = sampler(k=2, temperature=0.7, top_p=top_p).logits_processors([4, 5], 9)
    assert [type(p) for p in processors] == kinds
    noise = processors[-1]
    assert isinstance(noise, GumbelNoise) and noise.prompt_width == 9
    assert torch.equal(noise.keys, row_keys([4, 5], 2)) and len(set(noise.keys.tolist())) == 4


# The counter-based noise.
MASK = 2**64 - 1


def splitmix64_reference(x: int) -> int:
    """splitmix64's finaliser on Python ints (unbounded, masked to 64 bits by hand)."""
    x &= MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def test_mix64_is_splitmix64_in_int64() -> None:
    words = [0, 1, -1, 2**63 - 1, -(2**63), 0x123456789ABCDEF, -987654321]
    mixed = mix64(torch.tensor(words)).tolist()
    assert [m & MASK for m in mixed] == [splitmix64_reference(w) for w in words]
    assert mix64(torch.tensor(0)).item() == 0  # its fixed point: the keys mix the seed twice


def test_row_keys_take_seeds_of_any_size_and_differ() -> None:
    keys = row_keys([0, 1, -1, 2**63, 2**100 + 5], k=3)
    assert keys.shape == (15,) and keys.dtype == torch.long
    assert len(set(keys.tolist())) == 15
    assert torch.equal(row_keys([2**64 + 1], 3), row_keys([1], 3))  # taken modulo 2**64


def test_uniforms_lie_in_the_open_interval_and_are_uniform() -> None:
    u = uniforms(row_keys(range(200), k=4), step=3, vocab=500)  # 400,000 draws
    assert u.shape == (800, 500) and u.dtype == torch.float64
    assert u.min() > 0 and u.max() < 1
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 4 * math.sqrt(1 / 180 / n)  # Var of (u - 1/2)**2
    deciles = torch.histc(u.float(), bins=10, min=0, max=1) / n
    assert (deciles - 0.1).abs().max() < 4 * math.sqrt(0.09 / n)
    # A new step, a new key or another token give other words.
    keys = row_keys([7], k=1)
    assert not torch.equal(uniforms(keys, 0, 50), uniforms(keys, 1, 50))
    assert not torch.equal(uniforms(keys, 0, 50), uniforms(row_keys([8], 1), 0, 50))
    assert len(set(uniforms(keys, 0, 50).flatten().tolist())) == 50


def assert_frequencies(draws: torch.Tensor, expected: torch.Tensor) -> None:
    """Each token's share of `draws` lies within 4 standard errors of its probability (exactly
    0 where that is 0)."""
    n = draws.numel()
    shares = torch.bincount(draws.flatten(), minlength=len(expected)).double() / n
    bound = 4 * (expected * (1 - expected) / n).sqrt()
    assert ((shares - expected).abs() <= bound).all(), (shares, expected)


def test_gumbel_noise_samples_softmax_of_the_logits_over_the_temperature() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temperature, rows, steps = 0.8, 4000, 5
    processors = sampler(k=4, temperature=temperature).logits_processors(range(rows // 4), 7)
    draws = torch.stack(
        [
            processors(torch.zeros(rows, 7 + t, dtype=torch.long), logits.expand(rows, -1)).argmax(
                1
            )
            for t in range(steps)
        ]
    )  # (steps, rows): one draw per row and step
    expected = torch.softmax(logits.double() / temperature, 0)
    assert_frequencies(draws, expected)
    # A row's draws at two steps are independent: P(a, b) = p_a p_b for the likeliest token.
    both = ((draws[0] == 0) & (draws[1] == 0)).double().mean()
    assert abs(both - expected[0] ** 2) < 4 * math.sqrt(expected[0] ** 2 / rows)


def test_top_p_removes_the_tail_and_the_noise_keeps_it_removed() -> None:
    logits = torch.tensor([3.0, 2.0, 1.0, -2.0, -4.0])
    p = torch.softmax(logits.double(), 0)  # 0.66, 0.24, 0.09, 0.004, 0.0006
    rows = 20000
    processors = sampler(k=1, top_p=0.95).logits_processors(range(rows), 3)
    scores = processors(torch.zeros(rows, 3, dtype=torch.long), logits.expand(rows, -1))
    assert torch.isneginf(scores[:, 3:]).all() and torch.isfinite(scores[:, :3]).all()
    draws = scores.argmax(1)
    expected = torch.cat([p[:3] / p[:3].sum(), torch.zeros(2, dtype=torch.float64)])
    assert_frequencies(draws, expected)


def test_gumbel_noise_is_the_same_on_a_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    keys = row_keys(range(8), k=4)
    assert torch.equal(uniforms(keys.cuda(), 5, 1000).cpu(), uniforms(keys, 5, 1000))
    torch.testing.assert_close(
        gumbel_noise(keys.cuda(), 5, 1000).cpu(), gumbel_noise(keys, 5, 1000)
    )


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
