"""Build the sample evaluation tasks for the tiny demo model: tunekit/assets/eval/.

    python scripts/make_eval_assets.py            # seeded: reruns write the same files

The tiny model learned facts such as "3 plus 5 is 8." / "seven plus two is 9." in pretraining
(scripts/demo_corpus.py); the SFT demo then teaches a chat wording of the same sums. These tasks
ask the pretraining facts, so they measure what fine-tuning keeps of them ("forgetting"):

  arithmetic_mc.jsonl     multiple choice, lm-eval style (template "{question} is", continuation
                          " " + choice): {"question": "3 plus five", "choices": ["7", "8", "9", "13"], "answer": 1}
                          choices: the sum, the sum off by one each way, and a distractor of another
                          length (so acc and acc_norm can differ), shuffled
  arithmetic_gsm8k.jsonl  generation with a GSM8K-style reference ("#### " before the final
                          answer): {"question": "3 plus five", "answer": "3 + 5 = 8\n#### 8"}

20 questions each over different (a, b) pairs of single digits, operands as digits or number words.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
OUT = Path(__file__).resolve().parents[1] / "tunekit" / "assets" / "eval"
N = 20


def operand(rng: random.Random, n: int) -> str:
    return NUMBER_WORDS[n] if rng.random() < 0.5 else str(n)


def main() -> None:
    rng = random.Random(12)
    pairs = rng.sample([(a, b) for a in range(10) for b in range(10)], 2 * N)
    OUT.mkdir(parents=True, exist_ok=True)
    mc = []
    for a, b in pairs[:N]:
        s = a + b
        near = sorted({s - 1, s + 1} - {-1})  # off by one (no -1)
        far = [x for x in range(19) if x not in (s, *near) and len(str(x)) != len(str(s))]
        choices = [str(x) for x in [s, *near, rng.choice(far)]]
        while len(choices) < 4:  # s = 0 has one neighbour only
            choices.append(str(rng.choice([x for x in range(19) if str(x) not in choices])))
        rng.shuffle(choices)
        mc.append({"question": f"{operand(rng, a)} plus {operand(rng, b)}", "choices": choices,
                   "answer": choices.index(str(s))})
    gen = [{"question": f"{operand(rng, a)} plus {operand(rng, b)}", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
           for a, b in pairs[N:]]
    for name, rows in (("arithmetic_mc.jsonl", mc), ("arithmetic_gsm8k.jsonl", gen)):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {OUT / name} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
