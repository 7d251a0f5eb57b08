"""tokenizer.json byte-level BPE: load time and encode speed of each path, side by side.

A BPE is trained here with the ``tokenizers`` library (no downloads) on this Python's standard
library sources plus multilingual lines, in Qwen2's layout (Split regex + ByteLevel, NFC, one
merge per token), and saved as tokenizer.json. Then, on the same text:

- ``tiktoken``: ``load_tokenizer_json`` (the file passes the load-time check, so tiktoken runs it);
  its load time includes the check (HF's rule run on every vocabulary token);
- ``python (cold)`` / ``python (warm)``: :class:`MergeRankBPE`, the exact pure-Python rule used when
  the check fails and ``tokenizers`` is not installed, with an empty / filled pre-token cache;
- ``tokenizers``: the Rust library itself (the reference; ids are checked equal).

    python benchmarks/bench_tokenizer_json.py [--vocab 32000] [--chars 2000000]

Times are CPU seconds of this process (``time.process_time``), so other load on the machine
inflates them less than wall-clock time; the last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import random
import sysconfig
import tempfile
import time
from pathlib import Path

LINES = ["日本語のテキストです。你好，世界！한국어 문장도 있어요.", "Emoji 😀🎉 👍🏽 👨‍👩‍👧 done",
         "Ünïcödé ßtraße Ελληνικά русский עברית العربية हिन्दी", "Numbers 1234567 and 3.14159",
         "It's we'll they'd I'M YOU'RE", "Whitespace   runs\t\ttabs\n\nnew\r\nlines"]
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def corpus(chars: int) -> list[str]:
    rng = random.Random(0)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    texts, total = [], 0
    for f in files:
        text = f.read_text(errors="replace")
        lines = text.splitlines(keepends=True)
        for _ in range(len(lines) // 20):  # a multilingual line every ~20 code lines
            lines.insert(rng.randrange(len(lines) + 1), rng.choice(LINES) + "\n")
        texts.append("".join(lines))
        total += len(texts[-1])
        if total >= chars:
            break
    return texts


def train(texts: list[str], vocab: int, path: Path) -> None:
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(path))


def cpu(fn):
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chars", type=int, default=2_000_000)
    args = p.parse_args()
    from tokenizers import Tokenizer

    from tunekit.data.tokenizers import (
        MergeRankBPE,
        TiktokenTokenizer,
        load_tokenizer_json,
    )
    from tunekit.data.tokenizers.hf_json import _bpe_model, _pattern

    texts = corpus(args.chars)
    chars = sum(map(len, texts))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        train(texts, args.vocab, path)
        ref = Tokenizer.from_file(str(path))
        spec = json.loads(path.read_text())
        fast, load_s = cpu(lambda: load_tokenizer_json(path, bos_token=None, eos_token="<|im_end|>"))
    assert isinstance(fast, TiktokenTokenizer), "the trained file should pass the tiktoken check"
    ranks, merges = _bpe_model(spec["model"], "bench")
    _, load_plain_s = cpu(lambda: TiktokenTokenizer(ranks, QWEN2_PATTERN, added_tokens={},
                                                    special_ids=set(), bos_id=None, eos_id=0))
    exact = MergeRankBPE(ranks, _pattern(spec["pre_tokenizer"], "bench"), merges,
                         added_tokens=fast.added_tokens, special_ids=fast.special_ids, bos_id=None,
                         eos_id=fast.eos_id, normalize=fast._normalize)

    def run(encode):
        return [encode(t) for t in texts]

    want, hf_s = cpu(lambda: run(lambda t: ref.encode(t, add_special_tokens=False).ids))
    results = {"tokenizers": hf_s}
    for name, tok in (("tiktoken", fast), ("python (cold)", exact), ("python (warm)", exact)):
        got, seconds = cpu(lambda tok=tok: run(lambda t: tok.encode(t, add_bos=False, add_eos=False)))
        assert got == want, name
        results[name] = seconds
    tokens = sum(map(len, want))
    print(f"vocab {len(ranks)} ({len(merges)} merges, one per token); {chars / 1e6:.1f} M chars, "
          f"{tokens / 1e6:.2f} M tokens; ids equal on every text")
    print(f"load_tokenizer_json: {load_s:.2f} s CPU (tiktoken setup alone {load_plain_s:.2f} s; "
          f"the rest is reading the file and the check)")
    for name, seconds in results.items():
        print(f"{name:>14}: {chars / seconds / 1e6:6.2f} M chars/s  {tokens / seconds / 1e6:5.2f} "
              f"M tokens/s  ({hf_s / seconds:.2f}x tokenizers)")
    print(json.dumps({"vocab": len(ranks), "chars": chars, "tokens": tokens, "load_s": load_s,
                      "tiktoken_setup_s": load_plain_s, "encode_cpu_s": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
