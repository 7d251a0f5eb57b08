"""Data pipeline throughput: 100k synthetic chat examples from a JSONL file to packed batches.

Measures, end to end, reading the JSONL file (lazy index + parse), the message transform and its
validation, the chat template + tokenizer (a byte-level BPE tokenizer.json trained here on the
synthetic text by a small BPE trainer in this script and run by tunekit.data.tokenizers'
tiktoken tokenizer with the Llama 3 chat format), label computation and greedy packing; then the collate (block-causal masks) separately.

    python benchmarks/bench_data.py [--examples 100000] [--seq-len 2048] [--workers 1]

Prints tokens/s (median of --repeats runs) and the machine load average at the start, since other
processes on shared machines can slow every number down.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

WORDS = ("the a of to and in is it you that he was for on are with as his they be at one have this "
         "from or had by hot word but what some we can out other were all there when up use your how "
         "said an each she which do their time if will way about many then them write would like so "
         "these her long make thing see him two has look more day could go come did number sound no "
         "most people my over know water than call first who may down side been now find any new work "
         "part take get place made live where after back little only round man year came show every "
         "good me give our under name very through just form sentence great think say help low line "
         "differ turn cause much mean before move right boy old too same tell does set three want air "
         "well also play small end put home read hand port large spell add even land here must big high "
         "such follow act why ask men change went light kind off need house picture try us again animal "
         "point mother world near build self earth father head stand own page should country found "
         "answer school grow study still learn plant cover food sun four between state keep eye never "
         "last let thought city tree cross farm hard start might story saw far sea draw left late run "
         "don't while press close night real life few north 2024 3.14 42 (x) [y] {z} code: def f(x): "
         "return x*2; naïve café résumé 東京 データ").split()


def synthetic_chats(n: int, seed: int = 0):
    rng = random.Random(seed)
    text = lambda k: " ".join(rng.choices(WORDS, k=k)).capitalize() + rng.choice(".?!")  # noqa: E731
    for _ in range(n):
        msgs = [{"role": "system", "content": text(rng.randint(5, 20))}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            msgs.append({"role": "user", "content": text(rng.randint(5, 60))})
            msgs.append({"role": "assistant", "content": text(rng.randint(10, 120))})
        yield {"messages": msgs}


def train_bpe_ranks(texts: list[str], vocab_size: int, pattern: str) -> dict[bytes, int]:
    """Byte-level BPE training (merge the most frequent adjacent pair, next rank = next id) over
    pre-tokenized word counts: the ranks tiktoken expects, built in seconds on synthetic text."""
    import collections

    import regex

    words = collections.Counter(w.encode("utf-8") for t in texts for w in regex.findall(pattern, t))
    ranks = {bytes([b]): b for b in range(256)}
    splits = {w: [bytes([b]) for b in w] for w in words}
    while len(ranks) < vocab_size:
        pairs = collections.Counter()
        for w, parts in splits.items():
            for a, b in zip(parts, parts[1:]):
                pairs[a, b] += words[w]
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        for w, parts in splits.items():
            i, out = 0, []
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == a and parts[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(parts[i])
                    i += 1
            splits[w] = out
    return ranks


def build_tokenizer(sample: list[dict], vocab_size: int):
    """A Llama-3-style tiktoken tokenizer (tunekit.data.tokenizers) over BPE ranks trained here."""
    from tunekit.data.tokenizers.chat_formats import get_chat_format
    from tunekit.data.tokenizers.tiktoken_tokenizer import (
        LLAMA3_PATTERN,
        TiktokenTokenizer,
        llama3_special_tokens,
    )

    ranks = train_bpe_ranks([m["content"] for row in sample for m in row["messages"]], vocab_size,
                            LLAMA3_PATTERN)
    specials = llama3_special_tokens(len(ranks))
    return TiktokenTokenizer(ranks, LLAMA3_PATTERN, added_tokens=specials,
                             special_ids=set(specials.values()), bos_id=specials["<|begin_of_text|>"],
                             eos_id=specials["<|end_of_text|>"], pad_id=specials["<|finetune_right_pad_id|>"],
                             chat_format=get_chat_format("llama3"))


class ReplayTokenizer:
    """Wraps a tokenizer; ``tokenize_messages`` returns precomputed results for the rows of
    ``data`` (keyed by the message contents), so timing it isolates the rest of the pipeline."""

    def __init__(self, tokenizer, data: Path):
        self.pad_id = tokenizer.pad_id
        self.cache = {}
        with open(data) as f:
            for line in f:
                msgs = json.loads(line)["messages"]
                self.cache[self._key(msgs)] = tokenizer.tokenize_messages(msgs)

    @staticmethod
    def _key(messages):
        return tuple(m["content"] for m in messages)

    def tokenize_messages(self, messages, add_generation_prompt=False):
        return self.cache[self._key(messages)]

    def lookup_seconds(self, calls: int) -> float:
        """Time spent in the cache lookups themselves (subtracted from the measurement)."""
        keys = [list({"content": c} for c in k) for k in list(self.cache)[:calls]]
        t0 = time.perf_counter()
        for k in keys:
            self.tokenize_messages(k)
        return (time.perf_counter() - t0) * calls / max(1, len(keys))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=100_000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes for packing")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)

    from tunekit.data import chat_dataset

    print(f"load average at start: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "chat.jsonl"
        t0 = time.perf_counter()
        with open(data, "w") as f:
            for row in synthetic_chats(args.examples):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {args.examples} examples ({data.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")
        tokenizer = build_tokenizer(list(synthetic_chats(2000, seed=1)), args.vocab_size)
        print(f"tokenizer: {type(tokenizer).__name__}, vocab {tokenizer.vocab_size}")

        times, packed = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            packed = chat_dataset(tokenizer, data, max_seq_len=args.seq_len, packed=True,
                                  num_workers=args.workers)
            times.append(time.perf_counter() - t0)
        n_tokens = len(packed.tokens)
        best, median = min(times), statistics.median(times)
        print(f"read + template + tokenize + pack: {n_tokens:,} tokens, {packed.num_documents:,} documents -> "
              f"{len(packed):,} rows of {args.seq_len} (efficiency {100 * packed.efficiency:.1f}%)")
        print(f"  median {median:.2f}s = {n_tokens / median / 1e6:.2f} M tokens/s "
              f"(best {n_tokens / best / 1e6:.2f} M tokens/s, workers={args.workers})")

        # Where the time goes: the tokenizer's chat tokenization alone, on the same rows.
        sample = list(synthetic_chats(5000))
        t0 = time.perf_counter()
        n = sum(len(tokenizer.tokenize_messages(r["messages"])[0]) for r in sample)
        dt = time.perf_counter() - t0
        print(f"  of which tokenizer.tokenize_messages alone: {n / dt / 1e6:.2f} M tokens/s")

        # The data side alone: the same pipeline with the tokenizer's results replayed from a cache.
        subset = tmp / "subset.jsonl"
        with open(data) as f, open(subset, "w") as out:
            out.writelines(line for _, line in zip(range(20_000), f))
        replay = ReplayTokenizer(tokenizer, subset)
        t0 = time.perf_counter()
        small = chat_dataset(replay, subset, max_seq_len=args.seq_len, packed=True)
        dt = time.perf_counter() - t0 - replay.lookup_seconds(len(small.doc_lengths))
        print(f"  the data side alone (JSONL parse, transform, labels, packing; tokenizer output "
              f"replayed), {len(small.doc_lengths):,} examples: {len(small.tokens) / dt / 1e6:.2f} M tokens/s")

        batch_size, n_batches = 4, 16
        t0 = time.perf_counter()
        for b in range(n_batches):
            batch = packed.collate([packed[(b * batch_size + k) % len(packed)] for k in range(batch_size)])
        dt = time.perf_counter() - t0
        print(f"collate (tokens, labels, input_pos, mask [{batch_size}, {args.seq_len}, {args.seq_len}]): "
              f"{1000 * dt / n_batches:.1f} ms/batch = {batch_size * args.seq_len * n_batches / dt / 1e6:.2f} M tokens/s")
        assert batch["mask"].shape == (batch_size, args.seq_len, args.seq_len)
    return 0


if __name__ == "__main__":
    sys.exit(main())
