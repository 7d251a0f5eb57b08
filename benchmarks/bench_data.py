"""Data pipeline throughput: 100k synthetic chat examples from a JSONL file to packed rows.

What is timed, end to end, is one call a user (or a recipe) makes:

    chat_dataset(tokenizer, "chat.jsonl", max_seq_len=2048, packed=True, num_workers=W)

i.e. reading the JSONL file (newline scan + json parse of every row), the OpenAI message transform
and its validation, the chat template, the tokenizer, the loss mask, the shifted labels and the
greedy packing. Writing the synthetic file and building the tokenizers are not timed.

Two realistic tokenizers are trained here (no downloads) on the synthetic text and loaded the way
a user loads a checkpoint, with ``tunekit.data.tokenizers.from_hf(folder)``:

- ``tiktoken``: a byte-level BPE ``tokenizer.json`` (Llama 3 pre-tokenizer regex, the 256 Llama 3
  special tokens, rank-consistent merges like HF's own tiktoken conversion), which ``from_hf`` runs
  on tiktoken's core, with the Llama 3 chat format;
- ``sentencepiece``: a sentencepiece BPE ``tokenizer.model`` (byte fallback, Llama 2 options) with
  the Llama 2 chat format.

Both are trained until every word of the synthetic text is one token (the vocabulary then stops
growing), so a token is about as long as with a real 32k-128k vocabulary on English text
(~4.5 characters); the script prints the ratio.

    python benchmarks/bench_data.py [--examples 100000] [--workers 1,2] [--repeats 3]

``--workers 2`` is the ``num_workers=2`` argument of the dataset builders (tokenization in two
forked processes). The shipped configs use the default ``num_workers=1``, so the workers=1 numbers
are what a recipe gets out of the box.

Each run prints its wall-clock tokens/s, its own CPU time, and the CPU use of other processes
during the run (from /proc/stat, in cores: 0 = the machine was ours, 2 = two other cores' worth of
work competed with us); the summary gives the median of the runs. The last line is one JSON object
with every number.
"""

from __future__ import annotations

import argparse
import collections
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


def training_texts(n: int = 2000) -> list[str]:
    return [m["content"] for row in synthetic_chats(n, seed=1) for m in row["messages"]]


def train_bpe_ranks(texts: list[str], vocab_size: int, pattern: str) -> dict[bytes, int]:
    """Byte-level BPE training (merge the most frequent adjacent pair, next rank = next id) over
    pre-tokenized word counts: the ranks tiktoken expects, built in seconds on synthetic text."""
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


def write_tokenizer_json_checkpoint(folder: Path, vocab_size: int) -> None:
    """tokenizer.json + tokenizer_config.json of a Llama-3-style byte-level BPE trained here."""
    from tunekit.data.tokenizers.hf_json import byte_decoder
    from tunekit.data.tokenizers.tiktoken_tokenizer import LLAMA3_PATTERN, llama3_special_tokens

    ranks = train_bpe_ranks(training_texts(), vocab_size, LLAMA3_PATTERN)
    to_char = {b: c for c, b in byte_decoder().items()}
    show = lambda token: "".join(to_char[b] for b in token)  # noqa: E731  (GPT-2 byte-to-unicode)
    by_rank = sorted(ranks, key=ranks.get)
    # Every split of a token into two tokens is a merge, in the token's rank order: what HF's
    # tiktoken conversion writes, and what makes the file rank-consistent for tiktoken.
    merges = [f"{show(t[:k])} {show(t[k:])}" for t in by_rank for k in range(1, len(t))
              if t[:k] in ranks and t[k:] in ranks]
    specials = llama3_special_tokens(len(ranks))
    spec = {
        "version": "1.0",
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for s, i in specials.items()],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True, "vocab": {show(t): r for t, r in ranks.items()}, "merges": merges},
    }
    folder.mkdir(parents=True)
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "pad_token": "<|finetune_right_pad_id|>"}))


def write_sentencepiece_checkpoint(folder: Path, vocab_size: int) -> None:
    """tokenizer.model (sentencepiece BPE, Llama 2 options) + tokenizer_config.json."""
    import sentencepiece as spm

    folder.mkdir(parents=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_texts()), model_prefix=str(folder / "tokenizer"),
        vocab_size=vocab_size, hard_vocab_limit=False, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2,
        minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "legacy": False}))


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


class CpuMeter:
    """CPU seconds used by other processes while a block runs, from /proc/stat (Linux)."""

    def __enter__(self):
        self._start = self._sample()
        return self

    def __exit__(self, *exc):
        self._end = self._sample()

    @staticmethod
    def _sample():
        t = os.times()
        own = t.user + t.system + t.children_user + t.children_system
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]
            busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
        except (OSError, ValueError):
            busy = None
        return time.perf_counter(), own, busy

    @property
    def wall(self) -> float:
        return self._end[0] - self._start[0]

    @property
    def own_cpu(self) -> float:
        """CPU seconds of this process and its finished children (forked workers) in the block."""
        return self._end[1] - self._start[1]

    @property
    def outside_cores(self) -> float | None:
        """Average number of cores kept busy by other processes during the block."""
        if self._start[2] is None:
            return None
        others = (self._end[2] - self._start[2]) - (self._end[1] - self._start[1])
        return max(0.0, others / self.wall)


def run_pipeline(tokenizer, data: Path, seq_len: int, workers: int, repeats: int) -> dict:
    from tunekit.data import chat_dataset

    runs = []
    for _ in range(repeats):
        with CpuMeter() as meter:
            packed = chat_dataset(tokenizer, data, max_seq_len=seq_len, packed=True, num_workers=workers)
        n_tokens = len(packed.tokens)
        runs.append({"seconds": round(meter.wall, 3), "tokens_per_s": round(n_tokens / meter.wall),
                     "cpu_seconds": round(meter.own_cpu, 3),
                     "outside_cores": None if meter.outside_cores is None else round(meter.outside_cores, 2)})
        print(f"    run: {meter.wall:6.2f}s  {n_tokens / meter.wall / 1e6:.2f} M tokens/s  (our CPU time "
              f"{meter.own_cpu:.2f}s = {n_tokens / meter.own_cpu / 1e6:.2f} M tokens per CPU-second; other "
              f"processes kept {runs[-1]['outside_cores']} of {os.cpu_count()} cores busy)", flush=True)
    median = statistics.median(r["tokens_per_s"] for r in runs)
    print(f"  workers={workers}: {n_tokens:,} tokens, {packed.num_documents:,} documents -> {len(packed):,} "
          f"rows of {seq_len} (efficiency {100 * packed.efficiency:.1f}%): median {median / 1e6:.2f} M tokens/s")
    return {"workers": workers, "tokens": n_tokens, "rows": len(packed), "efficiency": round(packed.efficiency, 4),
            "median_tokens_per_s": median, "runs": runs}


def run_validation(tokenizer, data: Path, workers: int) -> dict:
    """An unpacked dataset's build: every row transformed and tokenized once (the up-front check
    that stops a bad row before training), then nothing kept but the row index."""
    from tunekit.data import chat_dataset

    with CpuMeter() as meter:
        ds = chat_dataset(tokenizer, data, max_seq_len=2048, num_workers=workers)
    print(f"  unpacked build with row validation, workers={workers}: {len(ds):,} rows in {meter.wall:.2f}s "
          f"({len(ds) / meter.wall:,.0f} rows/s; other processes kept {meter.outside_cores or 0:.2f} of {os.cpu_count()} "
          "cores busy)", flush=True)
    return {"workers": workers, "rows": len(ds), "seconds": round(meter.wall, 3),
            "outside_cores": None if meter.outside_cores is None else round(meter.outside_cores, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=100_000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--vocab-size", type=int, default=4096, help="upper bound; training stops earlier "
                   "once every word is one token")
    p.add_argument("--workers", default="1,2", help="comma-separated num_workers values to time")
    p.add_argument("--tokenizers", default="tiktoken,sentencepiece")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    workers = [int(w) for w in args.workers.split(",")]

    from tunekit.data import chat_dataset
    from tunekit.data.tokenizers import from_hf

    result = {"examples": args.examples, "seq_len": args.seq_len, "cores": os.cpu_count(),
              "load_average_at_start": round(os.getloadavg()[0], 2), "tokenizers": {}}
    print(f"load average at start: {result['load_average_at_start']} (cores: {os.cpu_count()})")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "chat.jsonl"
        t0 = time.perf_counter()
        with open(data, "w") as f:
            for row in synthetic_chats(args.examples):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {args.examples:,} examples ({data.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")
        builders = {"tiktoken": (write_tokenizer_json_checkpoint, "llama3"),
                    "sentencepiece": (write_sentencepiece_checkpoint, "llama2")}
        sample = [r["messages"] for r in synthetic_chats(5000, seed=2)]
        chars = sum(len(m["content"]) for msgs in sample for m in msgs)
        for name in args.tokenizers.split(","):
            write, chat_format = builders[name]
            t0 = time.perf_counter()
            write(tmp / name, args.vocab_size)
            tokenizer = from_hf(tmp / name, chat_format=chat_format)
            content_tokens = sum(len(tokenizer.encode(m["content"], False, False)) for msgs in sample for m in msgs)
            info = {"class": type(tokenizer).__name__, "chat_format": chat_format, "vocab_size": tokenizer.vocab_size,
                    "chars_per_token": round(chars / content_tokens, 2)}
            print(f"\n{name}: {info['class']} from {'tokenizer.json' if name == 'tiktoken' else 'tokenizer.model'}, "
                  f"vocab {tokenizer.vocab_size}, {info['chars_per_token']} characters/token, chat format "
                  f"{chat_format} (trained in {time.perf_counter() - t0:.1f}s)")
            info["pipeline"] = [run_pipeline(tokenizer, data, args.seq_len, w, args.repeats) for w in workers]
            info["validate_unpacked"] = [run_validation(tokenizer, data, w) for w in workers]

            # Where the time goes: the tokenizer's chat tokenization alone, on the same kind of rows.
            t0 = time.perf_counter()
            n = sum(len(tokenizer.tokenize_messages(msgs)[0]) for msgs in sample)
            info["tokenize_messages_tokens_per_s"] = round(n / (time.perf_counter() - t0))
            print(f"  of which tokenizer.tokenize_messages alone: "
                  f"{info['tokenize_messages_tokens_per_s'] / 1e6:.2f} M tokens/s")
            result["tokenizers"][name] = info

        # The data side alone: the same pipeline with the tokenizer's results replayed from a cache.
        subset = tmp / "subset.jsonl"
        with open(data) as f, open(subset, "w") as out:
            out.writelines(line for _, line in zip(range(20_000), f))
        replay = ReplayTokenizer(tokenizer, subset)
        t0 = time.perf_counter()
        small = chat_dataset(replay, subset, max_seq_len=args.seq_len, packed=True)
        dt = time.perf_counter() - t0 - replay.lookup_seconds(len(small.doc_lengths))
        result["data_side_tokens_per_s"] = round(len(small.tokens) / dt)
        print(f"\nthe data side alone (JSONL parse, transform, labels, packing; {name} tokenizer output "
              f"replayed), {len(small.doc_lengths):,} examples: {len(small.tokens) / dt / 1e6:.2f} M tokens/s")

        batch_size, n_batches = 4, 16
        t0 = time.perf_counter()
        for b in range(n_batches):
            batch = small.collate([small[(b * batch_size + k) % len(small)] for k in range(batch_size)])
        dt = time.perf_counter() - t0
        result["collate_ms_per_batch"] = round(1000 * dt / n_batches, 2)
        print(f"collate (tokens, labels, input_pos, mask [{batch_size}, {args.seq_len}, {args.seq_len}]): "
              f"{1000 * dt / n_batches:.1f} ms/batch")
        assert batch["mask"].shape == (batch_size, args.seq_len, args.seq_len)
    result["load_average_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
