"""A tokenizer that needs no training and no download: one token per UTF-8 byte.

It is the tokenizer of the tiny default model (`model=tiny`, `model=scratch`) and of the tests.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tokenizer_models
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
BYTE_VOCAB_SIZE = 256 + 3  # every byte, then BOS, EOS, PAD

# A minimal chat template for the byte-level tokenizer, so conversational data also works on the
# tiny model. Role headers are plain text; the assistant turn ends with EOS.
BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<' + message['role'] + '>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character table, so every byte is a visible vocabulary entry."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with one token per UTF-8 byte (ids 0-255 are the byte values) plus BOS/EOS/PAD.

    It needs no training and no download, encodes any text without unknown tokens, and has a chat
    template, which makes it the tokenizer of the tiny default model and of the tests.
    """
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    for special in (BOS, EOS, PAD):
        vocab[special] = len(vocab)
    backend = Tokenizer(tokenizer_models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    tokenizer.chat_template = BYTE_CHAT_TEMPLATE
    return tokenizer
