"""Synthetic text for the shipped demo: the generic pretraining corpus and the fine-tuning task.

Pretraining corpus ("generic English-like text"): template sentences over a closed vocabulary
(people, animals, things, colours, places), word lists that are repeated ("copy" patterns, which
give a small model induction heads), counting, and single-digit arithmetic facts. It never
contains the fine-tuning instruction or any reversed list.

Fine-tuning task ("answer an addition question"): the user asks, in words the base model never
saw ("What is 3 + five?", "Add 6 and 2.", ...), for a single-digit sum; the assistant answers with
the number only. The base model knows the facts in another form ("3 plus 5 is 8.") but cannot
follow the instruction (it scores 0% exact-match in the chat format); fine-tuning on 70 of the
100 (a, b) pairs teaches the format, and the held-out 30 pairs show it generalises.

(A "reverse the words" task was tried first: this 500-step base model has no in-context copying
(induction heads) yet, and LoRA could not learn it in 1000 steps: 0% exact-match.)

Everything is a pure function of a `random.Random`, so the assets are reproducible from a seed.
"""

from __future__ import annotations

import random

NAMES = (
    "anna ben clara david emma felix grace hugo ida jack kate leo maria nina oscar paul rosa sam "
    "tara victor wendy yara zoe omar lucy max eva tom lily noah"
).split()
ANIMALS = (
    "cat dog fox bird fish horse mouse owl frog bear wolf duck goat lion tiger rabbit snake sheep "
    "cow pig deer bee ant crow seal whale"
).split()
THINGS = (
    "book cup ball box hat key lamp map pen ring shoe sock spoon table chair door window bag coat "
    "kite drum bell boat car train bike clock coin bread apple cake egg milk rice soup tea stone "
    "leaf tree flower river hill cloud star moon sun rain snow wind road bridge tower garden"
).split()
COLOURS = "red blue green yellow black white brown pink purple orange grey gold".split()
ADJECTIVES = (
    "big small old new happy sad fast slow warm cold quiet loud soft hard bright dark tall short "
    "young clever lazy busy tiny huge kind wild calm"
).split()
PLACES = (
    "park house school forest village market kitchen garden beach city farm station library "
    "harbour valley"
).split()
VERBS = (  # (present 3rd person, past)
    ("sees", "saw"), ("finds", "found"), ("likes", "liked"), ("takes", "took"), ("holds", "held"),
    ("carries", "carried"), ("watches", "watched"), ("follows", "followed"), ("paints", "painted"),
    ("buys", "bought"), ("wants", "wanted"), ("loves", "loved"), ("brings", "brought"),
    ("drops", "dropped"), ("hides", "hid"), ("cleans", "cleaned"),
)
NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()

NOUNS = ANIMALS + THINGS
# Words of the list / copy patterns.
TASK_WORDS = tuple(sorted(set(ANIMALS + THINGS + COLOURS + ADJECTIVES)))

def _np(rng: random.Random) -> str:
    """A short noun phrase: 'the red cat', 'a big box', 'Anna'."""
    if rng.random() < 0.2:
        return rng.choice(NAMES).capitalize()
    det = rng.choice(("the", "a", "the", "this", "that", "my", "her", "his"))
    adj = rng.choice(COLOURS + ADJECTIVES) + " " if rng.random() < 0.6 else ""
    return f"{det} {adj}{rng.choice(NOUNS)}"


def _sentence(rng: random.Random) -> str:
    kind = rng.randrange(8)
    present, past = rng.choice(VERBS)
    if kind == 0:
        s = f"{_np(rng)} {present} {_np(rng)}."
    elif kind == 1:
        s = f"{_np(rng)} {past} {_np(rng)} in the {rng.choice(PLACES)}."
    elif kind == 2:
        s = f"{_np(rng)} is {rng.choice(COLOURS + ADJECTIVES)}."
    elif kind == 3:
        s = f"there is {_np(rng)} near the {rng.choice(PLACES)}."
    elif kind == 4:
        s = f"{rng.choice(NAMES).capitalize()} has {rng.choice(NUMBER_WORDS[2:])} {rng.choice(NOUNS)}s."
    elif kind == 5:
        s = f"yesterday {_np(rng)} {past} {_np(rng)} and {_np(rng)}."
    elif kind == 6:
        s = f"where is {_np(rng)}? it is in the {rng.choice(PLACES)}."
    else:
        s = f"{_np(rng)} and {_np(rng)} went to the {rng.choice(PLACES)}."
    return s[0].upper() + s[1:]


def _word_list(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(TASK_WORDS) for _ in range(n)]


def _copy_pattern(rng: random.Random) -> str:
    words = " ".join(_word_list(rng, rng.randint(2, 6)))
    template = rng.choice((
        "The list is: {w}. Again: {w}.",
        "{Name} said: {w}. Then {Name} said it again: {w}.",
        "Words: {w}. Repeat: {w}.",
    ))
    return template.format(w=words, Name=rng.choice(NAMES).capitalize())


def _counting(rng: random.Random) -> str:
    start = rng.randrange(0, 8)
    n = rng.randint(3, 5)
    return "Counting: " + " ".join(NUMBER_WORDS[start:start + n]) + "."


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randrange(10), rng.randrange(10)
    if rng.random() < 0.5:
        return f"{a} plus {b} is {a + b}."
    return f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is {a + b}."


def pretraining_document(rng: random.Random) -> str:
    """One document of 2-6 lines of the generic corpus."""
    parts = []
    for _ in range(rng.randint(2, 6)):
        r = rng.random()
        if r < 0.6:
            parts.append(_sentence(rng))
        elif r < 0.8:
            parts.append(_copy_pattern(rng))
        elif r < 0.9:
            parts.append(_counting(rng))
        else:
            parts.append(_arithmetic(rng))
    return " ".join(parts)


def tokenizer_extra_texts(seed: int, n: int = 2000) -> list[str]:
    """Chat-formatted word-list prompts added to the tokenizer's training text (so `[INST]` and
    the instruction words become pieces); the shipped tokenizer.model was trained with these."""
    rng = random.Random(seed)
    seen: set[str] = set()
    texts: list[str] = []
    while len(texts) < n:
        words = _word_list(rng, rng.randint(3, 5))
        prompt = "Reverse the order of the words: " + " ".join(words)
        if prompt not in seen:
            seen.add(prompt)
            texts.append(f"[INST] {prompt} [/INST] {' '.join(reversed(words))}")
    return texts


ADDITION_TEMPLATES = (
    "What is {a} + {b}?",
    "Add {a} and {b}.",
    "Compute {a} + {b}. Answer with a number.",
    "What do you get when you add {b} to {a}?",
)


def _operand(rng: random.Random, n: int) -> str:
    return str(n) if rng.random() < 0.5 else NUMBER_WORDS[n]


def addition_split(seed: int, n_val_pairs: int = 30) -> tuple[list[dict], list[dict]]:
    """Train / held-out rows in OpenAI `messages` format for the single-digit addition task.

    The 100 pairs (a, b) are split, so no val sum (a, b) is ever asked during fine-tuning; the base
    model saw every "a plus b is c" fact in pretraining, the instruction wording never.
    """
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)
    splits = []
    for chunk in (pairs[n_val_pairs:], pairs[:n_val_pairs]):
        rows, seen = [], set()
        for a, b in chunk:
            for template in ADDITION_TEMPLATES:
                for _ in range(4):  # digits and number words mixed
                    prompt = template.format(a=_operand(rng, a), b=_operand(rng, b))
                    if prompt not in seen:
                        seen.add(prompt)
                        rows.append({"messages": [
                            {"role": "user", "content": prompt},
                            {"role": "assistant", "content": str(a + b)},
                        ]})
        rng.shuffle(rows)
        splits.append(rows)
    return splits[0], splits[1]
