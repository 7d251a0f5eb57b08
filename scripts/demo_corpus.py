"""Synthetic text for the shipped demo: the generic pretraining corpus and the fine-tuning task.

Pretraining corpus ("generic English-like text"): template sentences over a closed vocabulary
(people, animals, things, colours, places), word lists that are repeated ("copy" patterns, which
give a small model induction heads), counting, and single-digit arithmetic facts. It never
contains the fine-tuning instruction or any reversed list.

Fine-tuning task ("reverse the words"): the user gives 3-5 words, the assistant answers with the
same words in reverse order, e.g. "Reverse the order of the words: red fox sun" -> "sun fox red".
The base model has never seen the chat format nor a reversal, so it scores ~0% exact-match before
fine-tuning; the skill is new, but it is built from parts the base model already has (the words,
copying), which is why a few hundred LoRA steps suffice.

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
# Words the reversal task draws from: single, common words the tokenizer keeps whole.
TASK_WORDS = tuple(sorted(set(ANIMALS + THINGS + COLOURS + ADJECTIVES)))

INSTRUCTION = "Reverse the order of the words:"


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


def reversal_example(rng: random.Random) -> tuple[str, str]:
    """(user prompt, assistant answer) for the fine-tuning task."""
    words = _word_list(rng, rng.randint(3, 5))
    return f"{INSTRUCTION} {' '.join(words)}", " ".join(reversed(words))


def reversal_split(seed: int, n_train: int, n_val: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train / held-out rows in OpenAI `messages` format (no word list is in both)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_val:
        prompt, answer = reversal_example(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ]})
    return rows[:n_train], rows[n_train:]
