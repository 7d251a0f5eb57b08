"""``tunekit data check``: counts, length histogram, duplicates and train/eval contamination.

- Exact duplicates: identical text after normalisation (lower case, punctuation -> space,
  whitespace collapsed), found by hashing.
- Near duplicates: MinHash over word 5-grams (64 hash functions) with LSH banding (16 bands of 4
  rows, so pairs with Jaccard >= 0.8 are candidates with probability > 0.999); candidate pairs are
  kept when their estimated Jaccard similarity reaches ``near_dup_threshold``.
- Contamination: as in the GPT-3 paper (Brown et al. 2020, appendix C), an eval example is dirty
  when it shares an N-gram of words with any training example; N is the 5th percentile of eval
  lengths in words, clamped to [8, 13]. Eval examples shorter than N are dirty only when their
  whole normalised text equals a training example.

Every n-gram is hashed to 64 bits with vectorised numpy arithmetic (no per-n-gram Python loop).
Without a tokenizer, lengths are counted in whitespace-separated words.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunekit.config.errors import UserError
from tunekit.data.errors import DataError
from tunekit.data.messages import TRANSFORMS, detect_format
from tunekit.data.sources import load_rows

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
NUM_PERM, BANDS = 64, 16


@dataclass
class Example:
    where: str
    text: str
    length: int


@dataclass
class CheckReport:
    """Everything ``tunekit data check`` prints (see :func:`format_report`)."""

    format: str
    length_unit: str
    num_rows: int = 0
    num_eval_rows: int = 0
    bad_rows: list[str] = field(default_factory=list)
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    max_seq_len: int | None = None
    exact_duplicates: list[list[str]] = field(default_factory=list)  # groups of row locations
    near_duplicates: list[tuple[str, str, float]] = field(default_factory=list)
    contamination_ngram: int = 0
    contaminated: list[tuple[str, str]] = field(default_factory=list)  # (eval row, train row)


def example_text(item: Any) -> str:
    """All text of a transformed row: a document, a conversation, or a (chosen, rejected) pair."""
    if isinstance(item, str):
        return item
    if isinstance(item, tuple) and len(item) == 3:  # KTO example: prompt, completion, label
        prompt, completion, _ = item
        return "\n".join(m["content"] for m in prompt + completion)
    if isinstance(item, tuple):  # preference pair: prompt and both responses
        chosen, rejected = item
        return "\n".join([m["content"] for m in chosen] + [rejected[-1]["content"]])
    return "\n".join(m["content"] for m in item)


def normalise_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def read_examples(sources, *, format: str = "auto", column_map: Mapping[str, str] | None = None,
                  tokenizer=None, text_split: str = "file") -> tuple[list[Example], list[str], str]:
    """Transform every row; returns (examples, bad row messages, format used)."""
    rows = load_rows(sources, text_split=text_split)
    if format == "auto":
        if not len(rows):
            return [], [], format
        format = detect_format(rows[0], column_map)
    if format not in TRANSFORMS:
        raise UserError(f"unknown format {format!r}; expected auto or one of {', '.join(TRANSFORMS)}")
    transform = TRANSFORMS[format](column_map)
    # Shared prompt wording (Alpaca's) would make every row look like every other one.
    row_text = getattr(transform, "raw_messages", transform)
    examples, bad = [], []
    for i in range(len(rows)):
        try:
            item = row_text(rows[i])
        except DataError as e:
            bad.append(str(e.at(rows.where(i))))
            continue
        text = example_text(item)
        if tokenizer is None:
            length = len(text.split())
        elif isinstance(item, str):
            length = len(tokenizer.encode(text))
        else:
            templated = transform(rows[i]) if row_text is not transform else item
            if isinstance(templated, tuple):  # a pair: the chosen conversation; KTO: prompt + completion
                templated = templated[0] if len(templated) == 2 else templated[0] + templated[1]
            length = len(tokenizer.tokenize_messages(templated)[0])
        examples.append(Example(rows.where(i), text, length))
    return examples, bad, format


class _Vocab:
    """Word -> id, shared by all documents of one check so equal words hash equally."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def __call__(self, words: list[str]) -> np.ndarray:
        ids = self.ids
        return np.fromiter((ids.setdefault(w, len(ids) + 1) for w in words), np.uint64, len(words))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads n-gram hashes over all 64 bits."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every window of ``n`` word ids (empty when there are fewer than n words)."""
    if len(ids) < n:
        return np.zeros(0, np.uint64)
    windows = np.lib.stride_tricks.sliding_window_view(ids, n)
    powers = np.uint64(1_000_003) ** np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix((windows * powers).sum(axis=1, dtype=np.uint64) + np.uint64(n))


def minhash_signatures(word_ids: list[np.ndarray], shingle: int = 5, num_perm: int = NUM_PERM,
                       seed: int = 0) -> np.ndarray:
    """uint64[d, num_perm] MinHash signatures over word ``shingle``-grams (the whole text when shorter)."""
    rng = np.random.default_rng(seed)
    xor = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
    sig = np.empty((len(word_ids), num_perm), np.uint64)
    for d, ids in enumerate(word_ids):
        h = ngram_hashes(ids, min(shingle, max(1, len(ids))))
        if not len(h):
            h = np.zeros(1, np.uint64)
        sig[d] = _mix(h[:, None] ^ xor[None, :]).min(axis=0)
    return sig


def near_duplicate_pairs(sig: np.ndarray, threshold: float, bands: int = BANDS
                         ) -> list[tuple[int, int, float]]:
    """Pairs (i, j, estimated Jaccard) with estimate >= threshold, found by LSH banding."""
    rows = sig.shape[1] // bands
    candidates = set()
    for b in range(bands):
        band = np.ascontiguousarray(sig[:, b * rows:(b + 1) * rows]).view(np.dtype((np.void, 8 * rows))).ravel()
        order = np.argsort(band, kind="stable")
        sorted_band = band[order]
        same = np.flatnonzero(sorted_band[1:] == sorted_band[:-1])
        if not len(same):
            continue
        # Group runs of equal band values and pair every member with the run's first member
        # and with each other (runs are small for non-degenerate data).
        starts = np.flatnonzero(np.concatenate([[True], sorted_band[1:] != sorted_band[:-1]]))
        ends = np.concatenate([starts[1:], [len(order)]])
        for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            members = sorted(order[s:e].tolist())
            for a in range(len(members)):
                for c in range(a + 1, len(members)):
                    candidates.add((members[a], members[c]))
    pairs = []
    for i, j in sorted(candidates):
        sim = float((sig[i] == sig[j]).mean())
        if sim >= threshold:
            pairs.append((i, j, sim))
    return pairs


def contamination(train_ids: list[np.ndarray], eval_ids: list[np.ndarray], train_keys: list[bytes],
                  eval_keys: list[bytes]) -> tuple[int, list[tuple[int, int]]]:
    """(N, [(eval index, train index)]) for eval examples sharing an N-gram with training data."""
    lengths = np.array([len(x) for x in eval_ids]) if eval_ids else np.zeros(0)
    n = int(np.clip(np.percentile(lengths, 5), 8, 13)) if len(lengths) else 13
    train_h = [ngram_hashes(ids, n) for ids in train_ids]
    owner = np.repeat(np.arange(len(train_h)), [len(h) for h in train_h])
    flat = np.concatenate(train_h) if train_h else np.zeros(0, np.uint64)
    order = np.argsort(flat, kind="stable")
    flat, owner = flat[order], owner[order]
    by_text = {}
    for t, key in enumerate(train_keys):
        by_text.setdefault(key, t)
    hits = []
    for e, ids in enumerate(eval_ids):
        if len(ids) < n:
            if eval_keys[e] in by_text:
                hits.append((e, by_text[eval_keys[e]]))
            continue
        h = ngram_hashes(ids, n)
        pos = np.clip(np.searchsorted(flat, h), 0, max(0, len(flat) - 1))
        found = np.flatnonzero(flat[pos] == h) if len(flat) else np.zeros(0, np.int64)
        if len(found):
            hits.append((e, int(owner[pos[found[0]]])))
    return n, hits


def check_data(train, eval=None, *, tokenizer=None, format: str = "auto",
               column_map: Mapping[str, str] | None = None, max_seq_len: int | None = None,
               near_dup_threshold: float = 0.8, text_split: str = "file") -> CheckReport:
    """Check training files (and optionally eval files); see the module docstring for the methods."""
    examples, bad, fmt = read_examples(train, format=format, column_map=column_map,
                                       tokenizer=tokenizer, text_split=text_split)
    report = CheckReport(format=fmt, length_unit="tokens" if tokenizer is not None else "words",
                         num_rows=len(examples) + len(bad), bad_rows=bad,
                         lengths=np.array([ex.length for ex in examples], np.int64),
                         max_seq_len=max_seq_len)
    vocab = _Vocab()
    words = [normalise_words(ex.text) for ex in examples]
    keys = [" ".join(w).encode() for w in words]
    groups: dict[bytes, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    report.exact_duplicates = [[examples[i].where for i in g] for g in groups.values() if len(g) > 1]
    ids = [vocab(w) for w in words]
    # One representative per exact group: exact copies are reported above and would otherwise
    # make LSH buckets quadratic.
    reps = [g[0] for g in groups.values()]
    for a, b, sim in near_duplicate_pairs(minhash_signatures([ids[i] for i in reps]), near_dup_threshold):
        report.near_duplicates.append((examples[reps[a]].where, examples[reps[b]].where, sim))
    if eval is not None:
        eval_examples, eval_bad, _ = read_examples(eval, format=format,  # "auto" detects it anew
                                                   column_map=column_map, text_split=text_split)
        report.num_eval_rows = len(eval_examples) + len(eval_bad)
        report.bad_rows += eval_bad
        eval_words = [normalise_words(ex.text) for ex in eval_examples]
        n, hits = contamination(ids, [vocab(w) for w in eval_words], keys,
                                [" ".join(w).encode() for w in eval_words])
        report.contamination_ngram = n
        report.contaminated = [(eval_examples[e].where, examples[t].where) for e, t in hits]
    return report


def length_histogram(lengths: np.ndarray, width: int = 40) -> list[str]:
    """Text bars over power-of-two bins."""
    if not len(lengths):
        return []
    top = max(1, int(np.ceil(np.log2(max(1, int(lengths.max())) + 1))))
    edges = [0] + [2**k for k in range(top + 1)]
    counts, _ = np.histogram(lengths, bins=edges)
    peak = max(1, int(counts.max()))
    lines = []
    for lo, hi, c in zip(edges[:-1], edges[1:], counts):
        if c:
            lines.append(f"  {lo:>7}-{hi - 1:<7} {int(c):>8}  {'#' * max(1, round(width * c / peak))}")
    return lines


def format_report(report: CheckReport, max_items: int = 5) -> str:
    """The short human-readable report printed by ``tunekit data check``."""
    out = [f"format: {report.format}",
           f"rows: {report.num_rows} train" + (f", {report.num_eval_rows} eval" if report.num_eval_rows else ""),
           f"bad rows: {len(report.bad_rows)}"]
    out += [f"  {b}" for b in report.bad_rows[:max_items]]
    lengths = report.lengths
    if len(lengths):
        p50, p95 = np.percentile(lengths, [50, 95])
        out.append(f"length ({report.length_unit}): min {lengths.min()}, median {p50:.0f}, "
                   f"p95 {p95:.0f}, max {lengths.max()}, total {lengths.sum()}")
        if report.max_seq_len:
            over = int((lengths > report.max_seq_len).sum())
            out.append(f"  longer than max_seq_len={report.max_seq_len}: {over} ({100 * over / len(lengths):.1f}%)")
        out += length_histogram(lengths)
    dup_rows = sum(len(g) - 1 for g in report.exact_duplicates)
    out.append(f"exact duplicates: {dup_rows} row(s) repeat an earlier one ({len(report.exact_duplicates)} group(s))")
    out += [f"  {' = '.join(g[:4])}{' ...' if len(g) > 4 else ''}" for g in report.exact_duplicates[:max_items]]
    out.append(f"near duplicates (MinHash, word 5-grams): {len(report.near_duplicates)} pair(s)")
    out += [f"  {a} ~ {b} (Jaccard ~{s:.2f})" for a, b, s in report.near_duplicates[:max_items]]
    if report.num_eval_rows:
        pct = 100 * len(report.contaminated) / max(1, report.num_eval_rows)
        out.append(f"eval contamination ({report.contamination_ngram}-gram overlap): "
                   f"{len(report.contaminated)} of {report.num_eval_rows} eval rows ({pct:.1f}%)")
        out += [f"  {e} overlaps {t}" for e, t in report.contaminated[:max_items]]
    return "\n".join(out)
