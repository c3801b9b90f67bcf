"""The benchmark fixture, built locally and cached: rows, a BPE tokenizer, a random-init Llama.

Nothing is downloaded. Layout of the fixture folder:
    rows.jsonl            512 unpaired rows {prompt, completion, label}, ~40 words each side
    val.jsonl             8 more rows, the validation source kto_lightning asks for (never run)
    long_<L>.jsonl        64 rows whose prompt is exactly L/2 - 1 tokens (L/2 with BOS) and whose
                          completion is longer than L/2 tokens, so every row fills max_length L
    model/                LlamaForCausalLM + tokenizer, written by save_pretrained (safetensors)
    spec.json             the spec and a hash of this file; any change rebuilds the folder
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path


def _words(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(text.split()))  # in order, without repeats


# fmt: off
_NOUNS = _words(
    "river city garden teacher window engine market forest letter student doctor bridge"
    " village kitchen question answer problem system library museum mountain island harbor"
    " factory farmer painter signal picture country journey lesson valley machine station"
    " message theory pattern network summer winter morning evening neighbor council recipe"
    " battery planet ocean desert camera stone paper budget contract report meeting customer"
    " product service memory decision method result effect reason example feature process"
    " history science music culture language animal weather season harvest voyage lantern"
    " castle tower orchard meadow canyon glacier volcano compass ladder mirror blanket"
)
_VERBS = _words(
    "explain describe build carry follow improve measure protect repair collect compare"
    " discover imagine observe prepare remember support design gather deliver arrange"
    " balance capture connect create discuss examine invite justify organize predict"
    " question reduce restore review select share study test translate visit watch"
)
_ADJECTIVES = _words(
    "quiet bright careful ancient modern simple complex gentle rapid narrow broad heavy"
    " fragile steady curious honest clever patient sudden warm cold distant familiar"
    " hidden open narrow silver golden wooden crowded empty useful strange ordinary"
    " reliable practical elegant rough smooth generous noisy calm vivid subtle"
)
_ADVERBS = _words(
    "slowly quickly carefully often rarely nearly almost quietly openly gently clearly"
    " usually suddenly finally honestly simply"
)
_PREPOSITIONS = _words("near behind across beyond under above beside around through toward")
_SYLLABLES = _words(
    "ka lo mi ra ven tor sel qua bri dun fal gor hep is jun kel mor nax ol pim rud sav"
    " tel ul vor wen yas zed an ber cor dal em fin gal hol ith kor lum nor"
)
_QUESTION_OPENERS = (
    "Can you explain why", "Please describe how", "Tell me whether", "I wonder why",
    "Could you show how", "Help me understand why", "Explain in simple terms how",
)
_ANSWER_OPENERS = (
    "Sure.", "Of course.", "Good question.", "In short,", "Here is the idea.", "Well,",
    "It depends.", "Briefly,",
)
# fmt: on


@dataclass(frozen=True)
class FixtureSpec:
    """Everything that defines the fixture; stored as spec.json beside it."""

    version: int = 2
    seed: int = 1234
    rows: int = 512
    val_rows: int = 8
    words: int = 40  # about this many words per prompt and per completion
    long_rows: int = 64
    long_lengths: tuple[int, ...] = (256, 512, 1024)
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 2048
    weights_dtype: str = "float32"  # as saved; both frameworks load them as float32 either way
    special_tokens: dict[str, str] = field(
        default_factory=lambda: {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
    )


class TextGenerator:
    """Seeded English-like sentences: real words, and made-up names drawn with Zipf weights."""

    def __init__(self, seed: int, lexicon: int = 6000) -> None:
        self.rng = random.Random(seed)
        names = set()
        while len(names) < lexicon:
            k = self.rng.choice((2, 2, 3, 3, 4))
            names.add("".join(self.rng.choice(_SYLLABLES) for _ in range(k)))
        self.names = sorted(names)
        self.rng.shuffle(self.names)
        # Zipf weights: a few names are common, most are rare, as in real text.
        self.name_weights = [1.0 / (i + 1) for i in range(len(self.names))]
        # What random.choices(weights=...) sums on every call, summed once: the same draws.
        self._cum_weights = list(itertools.accumulate(self.name_weights))

    def _name(self) -> str:
        return self.rng.choices(self.names, cum_weights=self._cum_weights)[0].capitalize()

    def _noun_phrase(self) -> str:
        r = self.rng.random()
        if r < 0.25:
            return self._name()
        adjective = f"{self.rng.choice(_ADJECTIVES)} " if r < 0.7 else ""
        return f"the {adjective}{self.rng.choice(_NOUNS)}"

    def sentence(self) -> str:
        c = self.rng.choice
        forms = (
            lambda: f"{self._noun_phrase()} {c(_VERBS)}s {self._noun_phrase()}",
            lambda: (
                f"{self._noun_phrase()} {c(_ADVERBS)} {c(_VERBS)}s {self._noun_phrase()} "
                f"{c(_PREPOSITIONS)} {self._noun_phrase()}"
            ),
            lambda: (
                f"when {self._noun_phrase()} is {c(_ADJECTIVES)}, {self._noun_phrase()} "
                f"{c(_VERBS)}s {self._noun_phrase()}"
            ),
            lambda: (
                f"{self._noun_phrase()} and {self._noun_phrase()} {c(_VERBS)} "
                f"{self._noun_phrase()} {c(_ADVERBS)}"
            ),
            lambda: (
                f"{self.rng.randint(2, 1999)} {c(_NOUNS)}s {c(_PREPOSITIONS)} "
                f"{self._noun_phrase()} seem {c(_ADJECTIVES)}"
            ),
        )
        text = c(forms)()
        return text[0].upper() + text[1:] + "."

    def prompt(self, words: int) -> str:
        """A few sentences of context, then a question: at least `words` words."""
        parts: list[str] = []
        while sum(len(p.split()) for p in parts) < words - 10:
            parts.append(self.sentence())
        tail = self.sentence()[:-1]
        parts.append(f"{self.rng.choice(_QUESTION_OPENERS)} {tail[0].lower()}{tail[1:]}?")
        return " ".join(parts)

    def completion(self, words: int) -> str:
        """An answer of at least `words` words, starting with a space (it follows the prompt)."""
        parts = [self.rng.choice(_ANSWER_OPENERS)]
        while sum(len(p.split()) for p in parts) < words:
            parts.append(self.sentence())
        return " " + " ".join(parts)

    def rows(self, n: int, words: int) -> list[dict]:
        out = []
        for _ in range(n):
            # Vary the lengths around `words`, as real data does.
            prompt = self.prompt(max(8, round(self.rng.gauss(words, words * 0.15))))
            completion = self.completion(max(8, round(self.rng.gauss(words, words * 0.15))))
            out.append(
                {"prompt": prompt, "completion": completion, "label": self.rng.random() < 0.5}
            )
        return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _train_tokenizer(texts: list[str], spec: FixtureSpec):
    """Byte-level BPE trained on `texts`; BOS is added in front of every encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    sp = spec.special_tokens
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=[sp["pad"], sp["bos"], sp["eos"], sp["unk"]],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    bos_id = backend.token_to_id(sp["bos"])
    # tokenizer(text) gives [BOS] + tokens, as a Llama tokenizer does; TRL relies on that, while
    # kto_lightning tokenizes without special tokens and adds BOS itself: same ids either way.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{sp['bos']} $A", pair=f"{sp['bos']} $A $B", special_tokens=[(sp["bos"], bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=sp["bos"],
        eos_token=sp["eos"],
        pad_token=sp["pad"],
        unk_token=sp["unk"],
    )


def _tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _long_rows(rows: list[dict], tokenizer, length: int) -> list[dict]:
    """Rows that fill `length` tokens in both frameworks, cut at word boundaries.

    The prompt keeps its last words, at most length/2 - 1 tokens (length/2 with BOS), so
    kto_lightning (max_prompt_length = length/2) never cuts it; the completion keeps its first
    words, more than length/2 tokens, so both kto_lightning (completion cut to fit) and TRL 1.16
    (no prompt limit; prompt + completion cut on the right) end every row at exactly `length`.
    """
    half = length // 2
    out = []
    for row in rows:
        words = row["prompt"].split(" ")
        # The most trailing words within half - 1 tokens (the count grows with k: bisect).
        lo, hi = 1, len(words)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if _tokens(tokenizer, " ".join(words[-mid:])) <= half - 1:
                lo = mid
            else:
                hi = mid - 1
        prompt = " ".join(words[-lo:])
        words = row["completion"].split(" ")  # words[0] is "": the completion's leading space
        # The fewest leading words that reach half + 8 tokens.
        lo, hi = 2, len(words)
        if _tokens(tokenizer, " ".join(words)) < half + 8:
            raise RuntimeError(f"a long completion is too short for max_length {length}")
        while lo < hi:
            mid = (lo + hi) // 2
            if _tokens(tokenizer, " ".join(words[:mid])) >= half + 8:
                hi = mid
            else:
                lo = mid + 1
        out.append({"prompt": prompt, "completion": " ".join(words[:lo]), "label": row["label"]})
    return out


def _spec_json(spec: FixtureSpec) -> str:
    # The generator's code is part of what the fixture is: an edit to this file rebuilds it.
    source = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    return json.dumps({**asdict(spec), "source": source}, sort_keys=True)


def is_built(folder: Path, spec: FixtureSpec | None = None) -> bool:
    """Whether `folder` holds a complete fixture of `spec`, built by this version of this file."""
    marker = folder / "spec.json"
    return marker.is_file() and marker.read_text() == _spec_json(spec or FixtureSpec())


def build_fixture(
    folder: Path, spec: FixtureSpec | None = None, log=print, init_device: str = "cpu"
) -> Path:
    """Build the fixture in `folder` unless an identical one is there; returns the model folder.

    `init_device` is where the random weights are drawn ("cuda" is much faster for a 1B model;
    the draws differ from the CPU's, so the cached fixture is whichever was built first).
    """
    spec = spec or FixtureSpec()
    if is_built(folder, spec):
        return folder / "model"
    spec_json = _spec_json(spec)
    marker = folder / "spec.json"
    log(f"building the fixture in {folder} (cached for later runs)")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    generator = TextGenerator(spec.seed)
    rows = generator.rows(spec.rows, spec.words)
    val_rows = generator.rows(spec.val_rows, spec.words)
    longest = max(spec.long_lengths, default=0)
    # ~1.3 tokens per word: enough words that both halves exceed longest/2 tokens.
    raw_long = generator.rows(spec.long_rows, words=longest) if longest else []
    texts = [r[k] for r in rows + val_rows + raw_long for k in ("prompt", "completion")]
    tokenizer = _train_tokenizer(texts, spec)

    _write_jsonl(folder / "rows.jsonl", rows)
    _write_jsonl(folder / "val.jsonl", val_rows)
    for length in spec.long_lengths:
        _write_jsonl(folder / f"long_{length}.jsonl", _long_rows(raw_long, tokenizer, length))

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(spec.seed)
    with torch.device(init_device):
        model = LlamaForCausalLM(config)
    model = model.to(getattr(torch, spec.weights_dtype)).to("cpu")  # saved from host memory
    model_dir = folder / "model"
    model.save_pretrained(model_dir)  # safetensors
    tokenizer.save_pretrained(model_dir)
    marker.write_text(spec_json)  # last: an interrupted build is rebuilt next time
    return model_dir


def describe(folder: Path) -> dict:
    """Facts about a built fixture for the report: sizes, token lengths, vocabulary."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder / "model")
    rows = read_jsonl(folder / "rows.jsonl")
    p = [len(tokenizer(r["prompt"])["input_ids"]) for r in rows]
    c = [len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) + 1 for r in rows]
    words = [len(r["prompt"].split()) for r in rows] + [len(r["completion"].split()) for r in rows]
    return {
        "rows": len(rows),
        "desirable": sum(bool(r["label"]) for r in rows),
        "mean_words": sum(words) / len(words),
        "tokenizer_vocab": len(tokenizer),
        "mean_prompt_tokens": sum(p) / len(p),
        "mean_completion_tokens": sum(c) / len(c),
        "max_row_tokens": max(a + b for a, b in zip(p, c, strict=True)),
    }
