"""The bundled toy task: answer a question helpfully (desirable) or dismissively (undesirable).

It is generated from templates with a fixed seed, so it needs no download and is the same on every
machine. A desirable completion opens politely, states the fact the question asked for, and closes
kindly; an undesirable one brushes the question off or refuses. The two share no template, so a tiny
model learns to tell them apart in a few hundred steps, while topics, openers and closers vary
enough that validation rows are not copies of training rows.
"""

from __future__ import annotations

import random
import re
import string

TOPICS = [
    ("the moon", "it circles the earth about once every twenty seven days"),
    ("bees", "they turn flower nectar into honey and store it in wax combs"),
    ("rainbows", "sunlight splits into colours inside falling drops of rain"),
    ("volcanoes", "molten rock rises from deep below and erupts through the crust"),
    ("the heart", "it pumps blood through the body about seventy times a minute"),
    ("penguins", "they are birds that swim very well but cannot fly"),
    ("tides", "the pull of the moon lifts the oceans twice a day"),
    ("bread", "yeast makes gas bubbles that let the dough rise"),
    ("lightning", "it is a huge spark between charged clouds and the ground"),
    ("owls", "they hunt at night and can turn their heads very far"),
    ("glaciers", "they are rivers of ice that creep slowly downhill"),
    ("the sun", "it is a star that shines by fusing hydrogen into helium"),
    ("coral reefs", "tiny animals build them from limestone over many years"),
    ("snow", "water vapour freezes into six sided crystals in cold clouds"),
    ("maps", "they shrink the land onto paper using a fixed scale"),
    ("whales", "they are mammals that breathe air through a blowhole"),
    ("deserts", "they get very little rain and can be cold at night"),
    ("magnets", "they pull on iron because of aligned electron spins"),
    ("echoes", "sound bounces off a far wall and returns to your ears"),
    ("seeds", "they hold a young plant and food for its first days"),
    ("clocks", "gears or a crystal count out even ticks of time"),
    ("ants", "they live in colonies and follow scent trails to food"),
    ("comets", "they are balls of ice and dust that grow tails near the sun"),
    ("bicycles", "pedals turn a chain that drives the back wheel"),
    ("thunder", "air heated by lightning expands so fast that it booms"),
    ("mushrooms", "they are the fruit of fungi that live in the soil"),
    ("fog", "it is a cloud that forms close to the ground"),
    ("the wind", "air moves from high pressure toward low pressure"),
    ("frogs", "they start life as tadpoles that live in water"),
    ("islands", "they are land surrounded on every side by water"),
]

QUESTIONS = [
    "Can you tell me about {topic}?",
    "What should I know about {topic}?",
    "Please explain {topic} to me.",
    "I am curious about {topic}. What is one fact?",
    "Could you share something interesting about {topic}?",
    "Give me a short fact about {topic}.",
]

OPENERS = ["Sure!", "Happy to help.", "Great question.", "Of course.", "Gladly."]
CLOSERS = [
    "I hope that helps.",
    "Let me know if you want more.",
    "Thanks for asking.",
    "Enjoy learning about it.",
    "Feel free to ask again.",
]
DISMISSALS = [
    "Look it up yourself.",
    "Why would I care about {topic}?",
    "That is a boring question.",
    "Ask someone else, not me.",
    "No. Figure it out on your own.",
    "Whatever, {topic} is not worth my time.",
    "I will not answer that.",
    "Stop asking me about {topic}.",
]


def toy_rows(num_rows: int = 1200, seed: int = 0) -> list[dict]:
    """Rows `{prompt, completion, label}`, half desirable and half undesirable, shuffled."""
    rng = random.Random(seed)
    rows = []
    for i in range(num_rows):
        topic, fact = rng.choice(TOPICS)
        prompt = rng.choice(QUESTIONS).format(topic=topic)
        desirable = i % 2 == 0
        if desirable:
            completion = f"{rng.choice(OPENERS)} {fact.capitalize()}. {rng.choice(CLOSERS)}"
        else:
            completion = rng.choice(DISMISSALS).format(topic=topic)
        rows.append({"prompt": prompt, "completion": completion, "label": desirable})
    rng.shuffle(rows)
    return rows


# ---------------------------------------------------------------------------------------------
# The consistency task: the answer must agree with the prompt.
#
# Each prompt states where a named person keeps an object and asks what they keep there. Both
# completions have the same words and shape; the desirable one names the object the prompt
# stated, the undesirable one another object. Telling them apart takes reading the prompt, not
# the completion's style. Objects are made-up words, drawn from two disjoint pools: validation
# prompts use only objects never seen in training, so a model that scores them right has learnt
# to look the object up in the prompt rather than to remember which objects are "good".
CONSISTENCY = "toy_consistency"
NAMES = ["Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Max", "Eli", "Kim", "Ada", "Ben"]
PLACES = ["box", "drawer", "bag", "shed", "closet", "basket", "jar", "pocket", "cupboard", "tent"]
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "gl", "tr"]
VOWELS = ["a", "e", "i", "o", "u"]
CODAS = ["", "n", "x", "m", "r", "sh", "nt", "lk"]
VAL_OBJECT_SHARE = 0.25  # of the made-up objects, the share only validation uses
# The prompt of every consistency row; `stated_object` reads the object back out of it.
CONSISTENCY_PROMPT = "{name} keeps a {kept} in the {place}. What does {name} keep in the {place}?"


def made_up_words(seed: int = 0) -> list[str]:
    """Every two-syllable made-up word of the syllable lists, in a seeded order."""
    syllables = [o + v for o in ONSETS for v in VOWELS]
    words = sorted({a + b + c for a in syllables for b in syllables[:20] for c in CODAS})
    random.Random(seed).shuffle(words)
    return words


def consistency_rows(num_rows: int = 1200, split: str = "train", seed: int = 0) -> list[dict]:
    """Rows `{prompt, completion, label}` of the consistency task, half of each label.

    `split` "train" draws objects from the training pool, any other split from the validation
    pool (no object in common); names and places are shared. The object pools do not depend on
    `seed`, so every split of every seed keeps them apart.
    """
    words = made_up_words()
    n_val = int(len(words) * VAL_OBJECT_SHARE)
    pool = words[n_val:] if split == "train" else words[:n_val]
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for i in range(num_rows):
        name, place = rng.choice(NAMES), rng.choice(PLACES)
        kept, other = rng.sample(pool, 2)
        prompt = CONSISTENCY_PROMPT.format(name=name, kept=kept, place=place)
        desirable = i % 2 == 0
        answer = kept if desirable else other
        completion = f"{name} keeps a {answer} in the {place}."
        rows.append({"prompt": prompt, "completion": completion, "label": desirable})
    rng.shuffle(rows)
    return rows


def _template_regex(template: str) -> re.Pattern[str]:
    """`template` (a format string) as a regex: a field matches a word, and where a field comes
    again it must be the same word."""
    pattern, seen = "", set()
    for literal, field, _, _ in string.Formatter().parse(template):
        pattern += re.escape(literal)
        if field is not None:
            pattern += f"(?P={field})" if field in seen else rf"(?P<{field}>\w+)"
            seen.add(field)
    return re.compile(pattern)


_CONSISTENCY_PROMPT_RE = _template_regex(CONSISTENCY_PROMPT)


def stated_object(prompt: str) -> str | None:
    """The object a consistency prompt says its person keeps, or None for any other prompt.

    The task's verifier (kto_lightning.online.rewards.ConsistencyVerifier) reads it here, from
    the same template that wrote the prompt, so that the two cannot drift apart.
    """
    found = _CONSISTENCY_PROMPT_RE.fullmatch(prompt.strip())
    return found["kept"] if found else None
