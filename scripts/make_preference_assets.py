"""Build the demo preference set for the tiny model: tunekit/assets/tiny_llama_preference/.

    python scripts/make_preference_assets.py            # seeded: reruns write the same files

The task is the SFT demo's (tunekit/assets/tiny_llama_data, scripts/demo_corpus.py): a single-digit
addition question in one of four wordings, digits and number words mixed. Each pair has the same
question, chosen = the correct sum, rejected = the sum off by one, once each way: the wrong answers
the SFT demo's model finds most likely (scoring every answer 0..18 after each train question with
that model, the best wrong one is off by one for 96% of them, off by two for 3%).

The questions follow the SFT demo's split of the 100 (a, b) pairs: train pairs use the 70 pairs of
the SFT train set, val pairs the 30 held-out ones, so no val question is asked in either train set.
(The split is recomputed with demo_corpus.addition_split's seed and checked against the shipped
SFT files.) The SFT train set asks some sums rarely (sum 3 in 9 of 770 questions, 14 in 22), and
the SFT model misses the held-out questions with those sums most (3: 31 of 32 wrong); the train
pairs therefore ask every sum equally often (QUESTIONS_PER_SUM questions, the wordings of that
sum's train pairs cycled), the val pairs as they come.

Outputs (standard TRL format, strings; the chat template is applied by the dataset):
  train.jsonl, val.jsonl          {"prompt": "Add 4 and three.", "chosen": "7", "rejected": "8"}
  train_kto.jsonl, val_kto.jsonl  the same pairs unpaired for KTO (as TRL unpairs), shuffled:
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
import demo_corpus
from make_demo_assets import ASSETS, DATA_DIR, SEED

OUT_DIR = ASSETS / "tiny_llama_preference"
N_VAL_PAIRS = 30  # as demo_corpus.addition_split's default

QUESTIONS_PER_SUM = 64  # train questions per sum 0..18 (1216 questions, 2368 pairs)
N_VAL_QUESTIONS = 100   # held-out questions (about 200 pairs)


def rejected_answers(total: int) -> list[int]:
    """The wrong answers paired with the correct ``total``: off by one, each way (none below 0)."""
    return [v for v in (total - 1, total + 1) if v >= 0]


def balanced_questions(rng: random.Random, questions_: list[tuple[str, int, int]], per_sum: int
                       ) -> list[tuple[str, int, int]]:
    """``per_sum`` questions for every sum the questions have: that sum's questions in turn
    (shuffled, repeated when there are fewer), then all of them shuffled."""
    by_sum: dict[int, list[tuple[str, int, int]]] = collections.defaultdict(list)
    for q in questions_:
        by_sum[q[1] + q[2]].append(q)
    out = []
    for total in sorted(by_sum):
        pool = by_sum[total]
        out += [pool[i % len(pool)] for i in range(per_sum)]
    rng.shuffle(out)
    return out


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
        f.writelines(json.dumps(row) + "\n" for row in rows)


def build(out_dir: Path, seed: int) -> dict:
    sft_seed = seed + 5  # make_demo_assets.write_data
    sft_train, sft_val = demo_corpus.addition_split(sft_seed)
    if sft_train != read_jsonl(DATA_DIR / "train.jsonl") or sft_val != read_jsonl(DATA_DIR / "val.jsonl"):
        raise SystemExit(f"the SFT demo data in {DATA_DIR} is not demo_corpus.addition_split({sft_seed}); "
                         "rebuild it first (scripts/make_demo_assets.py --stage data)")
    train_pairs, val_pairs = sft_pair_split(sft_seed)
    rng = random.Random(seed + 7)
    chosen_questions = {"train": balanced_questions(rng, questions(rng, train_pairs), QUESTIONS_PER_SUM),
                        "val": questions(rng, val_pairs)[:N_VAL_QUESTIONS]}
    splits = {name: [{"prompt": prompt, "chosen": str(a + b), "rejected": str(wrong)}
                     for prompt, a, b in qs for wrong in rejected_answers(a + b)]
              for name, qs in chosen_questions.items()}
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
    sizes["questions"] = {name: len(qs) for name, qs in chosen_questions.items()}
    return sizes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    print(json.dumps(build(args.out_dir, args.seed)))


if __name__ == "__main__":
    main()
