"""Tests for kto_lightning.models: the byte tokenizer, TinyLlama, the reference copy, loading.

Nothing here touches the network: loading goes through local folders written by save_pretrained,
and hub names are tried with HF_HUB_OFFLINE=1 or with `hub.can_connect` replaced.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.testing import assert_close
from transformers import AutoTokenizer, LlamaForCausalLM

from kto_lightning.cli.config_files import config_dir
from kto_lightning.common import hub
from kto_lightning.core.losses import KTOLoss
from kto_lightning.core.metrics import FIELDS, metrics_from_sums
from kto_lightning.data import Example, KTOCollator
from kto_lightning.errors import ConfigError, ModelLoadError
from kto_lightning.models import Pretrained, TinyLlama, ensure_pad_token, make_reference
from kto_lightning.models.byte_tokenizer import byte_level_tokenizer
from kto_lightning.models.reference import CopyReference
from kto_lightning.models.tiny import BUNDLED, BUNDLED_WEIGHTS, weights_digest
from kto_lightning.training.module import KTOModule

TEXTS = [
    "plain ascii",
    "caf\u00e9 na\u00efve \u00fcber",
    "\u2713 \u4e2d\u6587 \U0001f600 \u0627\u0644\u0639\u0631\u0628\u064a\u0629",
    "tabs\tand\nnewlines\r\n and  double  spaces ",
    "\x00\x01\x7f control bytes",
]

TINY = dict(hidden_size=16, num_layers=1, num_heads=2, max_seq_len=32)


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if the code under test tries to reach the hub."""

    def refuse(host, *args, **kwargs):
        raise AssertionError(f"tried to connect to {host}")

    monkeypatch.setattr(hub, "can_connect", refuse)


# ------------------------------------------------------------------------------------ tokenizer


def test_byte_tokenizer_special_ids(tokenizer):
    assert len(tokenizer) == 259
    special = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert special == (256, 257, 258)
    assert tokenizer.convert_ids_to_tokens([256, 257, 258]) == ["<|bos|>", "<|eos|>", "<|pad|>"]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_ids_are_the_utf8_bytes_and_round_trip(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_byte_tokenizer_adds_no_special_tokens_by_itself(tokenizer):
    assert tokenizer("ab")["input_ids"] == [97, 98]


def test_byte_tokenizer_every_id_round_trips(tokenizer):
    every = list(range(259))
    assert tokenizer.convert_tokens_to_ids(tokenizer.convert_ids_to_tokens(every)) == every
    tokens = tokenizer.convert_ids_to_tokens(every)
    assert len(set(tokens)) == 259


def test_byte_tokenizer_decode_skips_special_tokens(tokenizer):
    ids = [256, *b"hi", 257, 258]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi"
    assert tokenizer.decode(ids) == "<|bos|>hi<|eos|><|pad|>"


def test_byte_tokenizer_save_and_reload(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert (
            reloaded(text, add_special_tokens=False)["input_ids"]
            == (tokenizer(text, add_special_tokens=False)["input_ids"])
        )
    assert (reloaded.bos_token_id, reloaded.eos_token_id, reloaded.pad_token_id) == (256, 257, 258)
    messages = [{"role": "user", "content": "hi"}]
    assert reloaded.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_byte_tokenizer_chat_template(tokenizer):
    user = [{"role": "user", "content": "hi"}]
    assert (
        tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        == "<user>\nhi\n<assistant>\n"
    )
    assert tokenizer.apply_chat_template(user, tokenize=False) == "<user>\nhi\n"
    turn = [*user, {"role": "assistant", "content": "hello"}]
    assert tokenizer.apply_chat_template(turn, tokenize=False) == (
        "<user>\nhi\n<assistant>\nhello<|eos|>"
    )


def test_ensure_pad_token_falls_back_to_eos():
    tokenizer = byte_level_tokenizer()
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    assert ensure_pad_token(tokenizer).pad_token_id == 257


def test_ensure_pad_token_without_eos_names_the_key():
    tokenizer = byte_level_tokenizer()
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(ConfigError, match=r"model\.tokenizer_name_or_path"):
        ensure_pad_token(tokenizer)


# ------------------------------------------------------------------------------------ TinyLlama


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"vocab_size": 258}, "model.vocab_size"),
        ({"hidden_size": 30, "num_heads": 4}, "model.num_heads"),
        ({"hidden_size": 0}, "model.hidden_size"),
        ({"num_layers": 0}, "model.num_layers"),
        ({"num_heads": 0}, "model.num_heads"),
        ({"max_seq_len": 0}, "model.max_seq_len"),
        ({"dropout": 1.0}, "model.dropout"),
        ({"dropout": -0.1}, "model.dropout"),
        ({"intermediate_size": 0}, "model.intermediate_size"),
    ],
)
def test_tiny_llama_validation_names_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        TinyLlama(**kwargs)


def test_tiny_llama_divisibility_error_names_both_keys():
    with pytest.raises(ConfigError) as info:
        TinyLlama(hidden_size=30, num_heads=4)
    assert "model.hidden_size (30)" in str(info.value)
    assert "model.num_heads (4)" in str(info.value)


def test_tiny_llama_builds_the_configured_model():
    torch.manual_seed(0)
    source = TinyLlama(vocab_size=300, hidden_size=32, num_layers=3, num_heads=4, max_seq_len=64)
    policy = source.load_policy()
    assert isinstance(policy, LlamaForCausalLM)
    config = policy.config
    assert config.vocab_size == 300
    assert config.hidden_size == 32
    assert config.num_hidden_layers == 3
    assert config.num_attention_heads == 4
    assert config.intermediate_size == 128  # 4 x hidden_size by default
    assert config.max_position_embeddings == 64
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (256, 257, 258)
    assert len(policy.model.layers) == 3
    assert policy.get_input_embeddings().weight.shape == (300, 32)
    # Untied: the output head is its own matrix.
    assert policy.lm_head.weight.data_ptr() != policy.get_input_embeddings().weight.data_ptr()
    logits = policy(torch.tensor([[256, 104, 105]])).logits
    assert logits.shape == (1, 3, 300)
    assert TinyLlama(intermediate_size=48, **TINY).config().intermediate_size == 48


def test_tiny_llama_tokenizer_is_the_byte_tokenizer():
    tokenizer = TinyLlama(**TINY).load_tokenizer()
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == [97, 98]
    assert tokenizer.pad_token_id == 258


# ------------------------------------------------------------------------------------ reference


def test_make_reference_is_an_equal_frozen_independent_copy():
    torch.manual_seed(0)
    policy = TinyLlama(**TINY).load_policy()
    policy.train()
    reference = make_reference(policy)
    assert reference is not policy
    assert reference.training is False
    assert all(not m.training for m in reference.modules())
    assert all(not p.requires_grad for p in reference.parameters())
    # The policy itself is left trainable and in train mode.
    assert policy.training is True
    assert all(p.requires_grad for p in policy.parameters())
    policy_state, reference_state = policy.state_dict(), reference.state_dict()
    assert policy_state.keys() == reference_state.keys()
    for name in policy_state:
        assert_close(reference_state[name], policy_state[name])
        assert reference_state[name].data_ptr() != policy_state[name].data_ptr()
    snapshot = {name: value.clone() for name, value in reference_state.items()}
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    for name, value in reference.state_dict().items():
        assert_close(value, snapshot[name])
        assert not torch.equal(value, policy.state_dict()[name])


# ------------------------------------------------------------------------------------ dropout

LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": "all-linear"}
# Random (not zero) LoRA B matrices, so that the adapters' dropout changes the output at step 0.
RANDOM_LORA = {**LORA, "init_lora_weights": False}


def _kto_batch() -> dict[str, torch.Tensor]:
    """Four rows (two desirable, two undesirable), each with an unrelated KL partner."""
    tokenizer = byte_level_tokenizer()
    examples = []
    for i, label in enumerate([True, True, False, False]):
        prompt = tokenizer(f"Question {i}: what is {i} plus {i}?")["input_ids"]
        completion = tokenizer(f"It is {2 * i}." if label else f"No idea about {i}.")["input_ids"]
        partner = tokenizer(f"Unrelated answer number {7 * i + 3}.")["input_ids"]
        examples.append(Example([256, *prompt], [*completion, 257], label, partner, i))
    return KTOCollator(pad_token_id=258)(examples)


def _step_zero_sums(source: TinyLlama) -> dict[str, torch.Tensor]:
    """The metric sums of a first training step, the policy in train mode, reference == policy."""
    torch.manual_seed(0)
    policy = source.load_policy()
    loss = KTOLoss(beta=0.1)
    module = KTOModule(
        policy, CopyReference(make_reference(policy)), loss, functools.partial(torch.optim.SGD)
    )
    module.train()
    assert policy.training
    sums = module._step(_kto_batch(), "train").metric_sums
    return dict(zip(FIELDS, sums, strict=True))


@pytest.mark.parametrize(
    "kwargs",
    [{"dropout": 0.1}, {"lora": RANDOM_LORA}],
    ids=["attention-dropout", "lora-dropout"],
)
def test_dropout_is_off_by_default_so_step_zero_rewards_and_kl_are_exactly_zero(kwargs):
    sums = _step_zero_sums(TinyLlama(**TINY, **kwargs))
    for name in ("reward_desirable_sum", "reward_undesirable_sum", "kl_sum"):
        assert sums[name].item() == 0.0, f"{name} = {sums[name].item()} at step 0"
    metrics = metrics_from_sums(torch.stack(list(sums.values())))
    assert metrics["rewards/chosen"].item() == metrics["rewards/rejected"].item() == 0.0
    assert metrics["kl"].item() == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [{"dropout": 0.1}, {"lora": RANDOM_LORA}],
    ids=["attention-dropout", "lora-dropout"],
)
def test_with_dropout_kept_train_mode_rewards_are_not_zero(kwargs):
    # The control: the test above could fail, because dropout alone moves the rewards.
    sums = _step_zero_sums(TinyLlama(**TINY, **kwargs, disable_dropout=False))
    assert sums["reward_desirable_sum"].item() != 0.0
    assert sums["reward_undesirable_sum"].item() != 0.0


def test_disable_dropout_zeroes_modules_attention_and_config():
    policy = TinyLlama(**TINY, dropout=0.1, lora=LORA).load_policy()
    dropouts = [m for m in policy.modules() if isinstance(m, nn.Dropout)]
    assert dropouts, "peft builds lora_dropout as nn.Dropout modules"
    assert all(m.p == 0.0 for m in dropouts)
    attention = [m for m in policy.modules() if hasattr(m, "attention_dropout")]
    assert attention and all(m.attention_dropout == 0.0 for m in attention)
    assert policy.config.attention_dropout == 0.0

    kept = TinyLlama(**TINY, dropout=0.1, lora=LORA, disable_dropout=False).load_policy()
    assert all(m.p == 0.1 for m in kept.modules() if isinstance(m, nn.Dropout))
    assert kept.config.attention_dropout == 0.1


MODEL_FILES = sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))


@pytest.mark.parametrize("name", MODEL_FILES)
def test_every_model_file_sets_disable_dropout(make_config, name):
    cfg = make_config(f"model={name}", fast=False)
    assert "disable_dropout" in cfg.model
    assert cfg.model.disable_dropout is True


# ---------------------------------------------------------------------------- TinyLlama weights

# The bundled file's content digest (`weights_digest`): `make tiny-weights` on a CPU with the pinned
# torch writes these weights again and prints it; a new file is a deliberate change, recorded here.
BUNDLED_DIGEST = "5d6a9fb0e917e5c5c34cef8afaa50ad35e40fe4b625846fe0603227d5f0c7d56"


def test_bundled_weights_are_small_and_the_recorded_file():
    assert BUNDLED_WEIGHTS.stat().st_size < 5 * 1024 * 1024
    assert weights_digest(BUNDLED_WEIGHTS) == BUNDLED_DIGEST


def test_the_digest_is_of_the_content_not_the_metadata_order(tmp_path):
    state = load_file(BUNDLED_WEIGHTS)
    sizes = TinyLlama().sizes()
    save_file(state, tmp_path / "a.safetensors", metadata={k: str(v) for k, v in sizes.items()})
    reordered = {k: str(sizes[k]) for k in reversed(sizes)}
    save_file(state, tmp_path / "b.safetensors", metadata=reordered)
    assert weights_digest(tmp_path / "a.safetensors") == weights_digest(tmp_path / "b.safetensors")
    state["lm_head.weight"][0, 0] += 1e-3
    save_file(state, tmp_path / "c.safetensors", metadata={k: str(v) for k, v in sizes.items()})
    assert weights_digest(tmp_path / "c.safetensors") != weights_digest(tmp_path / "a.safetensors")


def test_tiny_model_file_ships_the_bundled_weights(make_config):
    model = make_config(fast=False).model
    assert model.weights == BUNDLED
    assert TinyLlama(**{k: v for k, v in model.items() if k != "_target_"}).weights_path() == (
        BUNDLED_WEIGHTS
    )


def test_bundled_weights_are_what_the_policy_loads():
    policy = TinyLlama(weights=BUNDLED).load_policy()
    shipped = load_file(BUNDLED_WEIGHTS)
    state = policy.state_dict()
    assert state.keys() == shipped.keys()
    for name, tensor in shipped.items():
        assert torch.equal(state[name], tensor), name


def test_null_weights_are_the_seeded_random_init():
    torch.manual_seed(0)
    first = TinyLlama().load_policy().state_dict()
    torch.manual_seed(0)
    again = TinyLlama(weights=None).load_policy().state_dict()
    shipped = load_file(BUNDLED_WEIGHTS)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not any(torch.equal(first[n], shipped[n]) for n in first if "norm" not in n)


def test_weights_from_a_path_with_lora_on_top(tmp_path):
    torch.manual_seed(1)
    source = TinyLlama(**TINY).load_policy()
    path = tmp_path / "mine.safetensors"
    save_file(source.state_dict(), path)
    torch.manual_seed(2)
    policy = TinyLlama(**TINY, weights=str(path), lora=LORA).load_policy()
    merged = policy.merge_and_unload().state_dict()  # LoRA's B starts at 0: the file's weights
    for name, tensor in source.state_dict().items():
        assert torch.equal(merged[name], tensor), name


def test_weights_of_other_sizes_name_the_key_that_differs():
    with pytest.raises(ConfigError, match=r"model\.hidden_size=64 there, 32 here.*weights=null"):
        TinyLlama(hidden_size=32, weights=BUNDLED).load_policy()


def test_weights_file_without_sizes_names_the_tensor(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(TinyLlama(**{**TINY, "num_layers": 2}).load_policy().state_dict(), path)
    with pytest.raises(ConfigError, match=r"tensor model\.layers\.1\..*there, None here"):
        TinyLlama(**TINY, weights=str(path)).load_policy()


def test_missing_or_unreadable_weights_file_names_the_key(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ConfigError, match=r"model\.weights=.*missing\.safetensors: no such file"):
        TinyLlama(weights=str(missing))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match=r"model\.weights=.*not a readable safetensors file"):
        TinyLlama(weights=str(junk)).load_policy()


# ------------------------------------------------------------------------------------ Pretrained


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny Llama and the byte tokenizer written with save_pretrained, and the model itself."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = TinyLlama(**TINY).load_policy().eval()
    model.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder, model


def test_pretrained_loads_a_local_folder(saved_model, monkeypatch, no_network):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, model = saved_model
    source = Pretrained(name_or_path=str(folder))
    tokenizer = source.load_tokenizer()
    policy = source.load_policy()
    assert isinstance(policy, LlamaForCausalLM)
    assert policy.dtype == torch.float32
    text = "caf\u00e9 \u2713"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.pad_token_id == 258
    input_ids = torch.tensor([[256, *ids]])
    with torch.no_grad():
        assert_close(policy.eval()(input_ids).logits, model(input_ids).logits)


def test_pretrained_dtype_and_separate_tokenizer_folder(saved_model, tmp_path, no_network):
    folder, _ = saved_model
    tokenizer_folder = tmp_path / "tokenizer"
    byte_level_tokenizer().save_pretrained(tokenizer_folder)
    source = Pretrained(
        name_or_path=str(folder), tokenizer_name_or_path=str(tokenizer_folder), dtype="bfloat16"
    )
    assert source.load_policy().dtype == torch.bfloat16
    assert source.load_tokenizer()("a", add_special_tokens=False)["input_ids"] == [97]


@pytest.mark.parametrize("load", ["load_policy", "load_tokenizer"])
def test_pretrained_uncached_hub_name_offline_fails_fast(monkeypatch, no_network, load):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "some-org/some-model-that-is-not-cached"
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        getattr(Pretrained(name_or_path=name), load)()
    assert time.monotonic() - start < 5.0
    message = str(info.value)
    assert f"model.name_or_path={name!r}" in message
    assert "HF_HUB_OFFLINE" in message


def test_pretrained_uncached_tokenizer_name_names_its_key(monkeypatch, no_network, saved_model):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, _ = saved_model
    name = "some-org/tokenizer-that-is-not-cached"
    source = Pretrained(name_or_path=str(folder), tokenizer_name_or_path=name)
    with pytest.raises(ModelLoadError, match=f"model.tokenizer_name_or_path={name!r}"):
        source.load_tokenizer()


def test_pretrained_unreachable_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.org")
    hosts = []
    monkeypatch.setattr(hub, "can_connect", lambda host, *a, **k: hosts.append(host) or False)
    name = "some-org/some-model-that-is-not-cached"
    with pytest.raises(ModelLoadError) as info:
        Pretrained(name_or_path=name).load_policy()
    assert hosts == ["hub.example.org"]
    message = str(info.value)
    assert f"model.name_or_path={name!r}" in message
    assert "the hub (hub.example.org) cannot be reached" in message


@pytest.mark.parametrize("offline", ["0", "1"])
def test_pretrained_missing_local_path(tmp_path, monkeypatch, no_network, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    missing = str(tmp_path / "checkpoints" / "final")
    with pytest.raises(ModelLoadError, match="no such folder") as info:
        Pretrained(name_or_path=missing).load_policy()
    assert f"model.name_or_path={missing!r}" in str(info.value)


def test_pretrained_folder_without_a_model(tmp_path, no_network):
    with pytest.raises(ModelLoadError, match="is not a model folder: it holds neither") as info:
        Pretrained(name_or_path=str(tmp_path)).load_policy()
    assert str(tmp_path) in str(info.value)


def test_pretrained_disables_dropout_unless_told_not_to(tmp_path, no_network):
    TinyLlama(**TINY, dropout=0.1, disable_dropout=False).load_policy().save_pretrained(tmp_path)
    policy = Pretrained(name_or_path=str(tmp_path)).load_policy()
    assert policy.config.attention_dropout == 0.0
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in policy.model.layers)
    kept = Pretrained(name_or_path=str(tmp_path), disable_dropout=False).load_policy()
    assert kept.config.attention_dropout == 0.1
    assert all(layer.self_attn.attention_dropout == 0.1 for layer in kept.model.layers)


def test_pretrained_bad_dtype_names_the_key():
    with pytest.raises(ConfigError, match=r"model\.dtype") as info:
        Pretrained(name_or_path="anything", dtype="int8")
    assert "'int8'" in str(info.value)
