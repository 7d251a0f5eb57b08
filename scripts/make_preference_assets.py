"""Build the demo preference set for the tiny model: tunekit/assets/tiny_llama_preference/.

    python scripts/make_preference_assets.py            # seeded: reruns write the same files

The task is the SFT demo's (tunekit/assets/tiny_llama_data, scripts/demo_corpus.py): a single-digit
addition question in one of four wordings, digits and number words mixed. Each pair has the same
question, chosen = the correct sum, rejected = a plausible wrong answer (off by one or two, the
digits of the sum swapped, the carry dropped or added, an operand echoed, the product or the
difference instead of the sum).

The questions follow the SFT demo's split of the 100 (a, b) pairs: train pairs use the 70 pairs of
the SFT train set, val pairs the 30 held-out ones, so no val question is asked in either train set.
(The split is recomputed with demo_corpus.addition_split's seed and checked against the shipped
SFT files.)

Outputs (standard TRL format, strings; the chat template is applied by the dataset):
  train.jsonl, val.jsonl          {"prompt": "Add 4 and three.", "chosen": "7", "rejected": "8"}
  train_kto.jsonl, val_kto.jsonl  the same pairs unpaired for KTO, shuffled:
                                  {"prompt": ..., "completion": "7", "label": true} and
                                  {"prompt": ..., "completion": "8", "label": false}
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_corpus  # noqa: E402
from make_demo_assets import ASSETS, DATA_DIR, SEED  # noqa: E402

OUT_DIR = ASSETS / "tiny_llama_preference"
N_TRAIN, N_VAL = 1000, 200
N_VAL_PAIRS = 30  # as demo_corpus.addition_split's default

# Kinds of wrong answers and how often each is drawn (among those that apply to the sum).
MISTAKES = {"off_by_one": 0.35, "off_by_two": 0.1, "swapped_digits": 0.15, "carry": 0.15,
            "operand": 0.1, "product": 0.1, "difference": 0.05}


def wrong_answers(a: int, b: int) -> dict[str, list[int]]:
    """Each kind of mistake -> the wrong answers it gives for a + b (kinds giving none left out)."""
    s = a + b
    kinds = {
        "off_by_one": [s - 1, s + 1],
        "off_by_two": [s - 2, s + 2],
        "swapped_digits": [int(str(s)[::-1])] if s >= 10 and s % 10 not in (0, s // 10) else [],
        "carry": [s - 10 if s >= 10 else s + 10],
        "operand": [a, b],
        "product": [a * b],
        "difference": [abs(a - b)],
    }
    return {k: sorted({v for v in vs if v >= 0 and v != s}) for k, vs in kinds.items()
            if any(v >= 0 and v != s for v in vs)}


def rejected_answer(rng: random.Random, a: int, b: int) -> tuple[str, int]:
    options = wrong_answers(a, b)
    kinds = sorted(options)
    kind = rng.choices(kinds, weights=[MISTAKES[k] for k in kinds])[0]
    return kind, rng.choice(options[kind])


def questions(rng: random.Random, pairs: list[tuple[int, int]]) -> list[tuple[str, int, int]]:
    """Every distinct wording of every pair: 4 templates x digit/word for each operand."""
    out = []
    for a, b in pairs:
        for template in demo_corpus.ADDITION_TEMPLATES:
            for fa in (str(a), demo_corpus.NUMBER_WORDS[a]):
                for fb in (str(b), demo_corpus.NUMBER_WORDS[b]):
                    out.append((template.format(a=fa, b=fb), a, b))
    rng.shuffle(out)
    return out


def sft_pair_split(seed: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The (a, b) pairs of the SFT demo's train and val sets (addition_split's first draw)."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10) for b in range(10)]
    rng.shuffle(pairs)
    return pairs[N_VAL_PAIRS:], pairs[:N_VAL_PAIRS]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def build(out_dir: Path, seed: int) -> dict:
    sft_seed = seed + 5  # make_demo_assets.write_data
    sft_train, sft_val = demo_corpus.addition_split(sft_seed)
    if sft_train != read_jsonl(DATA_DIR / "train.jsonl") or sft_val != read_jsonl(DATA_DIR / "val.jsonl"):
        raise SystemExit(f"the SFT demo data in {DATA_DIR} is not demo_corpus.addition_split({sft_seed}); "
                         "rebuild it first (scripts/make_demo_assets.py --stage data)")
    train_pairs, val_pairs = sft_pair_split(sft_seed)
    rng = random.Random(seed + 7)
    splits, mistakes = {}, collections.Counter()
    for name, pairs, n in (("train", train_pairs, N_TRAIN), ("val", val_pairs, N_VAL)):
        rows = []
        for prompt, a, b in questions(rng, pairs)[:n]:
            kind, wrong = rejected_answer(rng, a, b)
            mistakes[kind] += 1
            rows.append({"prompt": prompt, "chosen": str(a + b), "rejected": str(wrong)})
        splits[name] = rows
    sft_questions = {r["messages"][0]["content"] for r in sft_train}
    val_questions = {r["prompt"] for r in splits["val"]}
    assert not val_questions & {r["prompt"] for r in splits["train"]} and not val_questions & sft_questions

    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for name, rows in splits.items():
        write_jsonl(out_dir / f"{name}.jsonl", rows)
        unpaired = [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
                    for r in rows for key in ("chosen", "rejected")]
        rng.shuffle(unpaired)
        write_jsonl(out_dir / f"{name}_kto.jsonl", unpaired)
        sizes[name] = len(rows)
    sizes["bytes"] = sum(p.stat().st_size for p in out_dir.glob("*.jsonl"))
    sizes["mistakes"] = dict(mistakes.most_common())
    return sizes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    print(json.dumps(build(args.out_dir, args.seed)))


if __name__ == "__main__":
    main()
