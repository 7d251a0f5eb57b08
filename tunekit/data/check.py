"""``tunekit data check``: counts, length histogram, duplicates and train/eval contamination.

Every row is normalised to words (lower case; anything but letters and digits separates words)
and each word is hashed to 64 bits. Rows are read in chunks and everything after the per-row
JSON parse and text normalisation is vectorised numpy code over a whole chunk (no per-word Python
object), so time is linear in the data and memory is 256 bytes of signature per training row
plus the evaluation sets' n-grams.

- Exact duplicates: identical normalised text. Rows are grouped by a 64-bit hash of their word
  sequence and every group is confirmed by comparing the normalised texts, so a hash collision
  can never report a false duplicate.
- Near duplicates: MinHash over word 5-grams by one-permutation hashing (Li, Owen & Zhang 2012):
  each 5-gram is hashed once into one of 64 bins, a bin keeps its smallest hash, and empty bins
  borrow from the first non-empty bin on a fixed probe sequence ("optimal densification",
  Shrivastava 2017), so a bin of two texts agrees with probability equal to their Jaccard
  similarity. LSH banding (16 bands of 4 bins) makes pairs with Jaccard >= 0.8 share a band with
  probability about 0.999. Rows sharing a band bucket are not compared pairwise: each bucket
  compares its members with its first member (the leader), unmatched members with the next
  leader, for at most ``max_leaders`` leaders; matches (estimated Jaccard >=
  ``near_dup_threshold``) are joined with union-find and members already joined are not compared
  again. Near duplicates are reported as clusters (connected components). Work is at most
  rows x bands x max_leaders signature comparisons, even when templated rows share one bucket.
- Contamination: as in the GPT-3 paper (Brown et al. 2020, appendix C), an eval example is dirty
  when it shares an N-gram of words with any training example; N is the 5th percentile of eval
  lengths in words, clamped to [8, 13]. Eval examples shorter than N are dirty only when their
  whole normalised text equals a training example. Every n-gram of the training rows is looked up
  in the eval sets' 64-bit n-gram hashes (a bitmap filter, then a sorted array).

Without a tokenizer, lengths are counted in normalised words.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunekit.config.errors import UserError
from tunekit.data.errors import DataError
from tunekit.data.messages import TRANSFORMS, detect_format
from tunekit.data.sources import load_rows

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
# The same normalisation for ASCII text as a byte table: letters lowered, digits kept, anything
# else a space (bytes.translate runs at memory speed; the regex is ~20x slower).
_ASCII_TABLE = bytes(ord(chr(c).lower()) if chr(c).isalnum() else 32 for c in range(128)) + bytes(range(128, 256))
NUM_BINS, BANDS, SHINGLE, MAX_LEADERS = 64, 16, 5, 8
_CHUNK_BYTES = 1 << 21  # normalised text per vectorised chunk
_BYTE_P, _WORD_P = 0x100000001B3, 1_000_003  # odd, so invertible mod 2**64


@dataclass
class EvalReport:
    """Contamination of one evaluation set by the training data."""

    name: str
    num_rows: int = 0
    ngram: int = 0
    contaminated: list[tuple[str, str]] = field(default_factory=list)  # (eval row, a train row it overlaps)


@dataclass
class CheckReport:
    """Everything ``tunekit data check`` prints (see :func:`format_report`)."""

    format: str
    length_unit: str
    num_rows: int = 0
    bad_rows: list[str] = field(default_factory=list)
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    max_seq_len: int | None = None
    exact_duplicates: list[list[str]] = field(default_factory=list)  # groups of row locations
    near_duplicates: list[list[str]] = field(default_factory=list)  # clusters of row locations, largest first
    near_dup_threshold: float = 0.8
    near_dup_comparisons: int = 0  # signature comparisons made (linear in rows, see the module docstring)
    near_dup_uncompared: int = 0  # (band, row) entries left in a bucket after max_leaders leaders
    max_leaders: int = MAX_LEADERS
    evals: list[EvalReport] = field(default_factory=list)


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


def normalised(text: str) -> bytes:
    """UTF-8 words of ``text`` (``[^\\W_]+`` runs, lower case) separated by one or more spaces."""
    if text.isascii():
        return text.encode().translate(_ASCII_TABLE)
    return " ".join(_WORD.findall(text.lower())).encode()


def normalise_words(text: str) -> list[str]:
    return normalised(text).decode().split()


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads hashes over all 64 bits."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class PolyHash:
    """``sum(x[s + k] * p**k for k < length) mod 2**64`` of any span of ``x`` in O(1) after one
    prefix-sum pass: ``(S[s + length] - S[s]) * p**-s`` with ``S[i] = sum_{j<i} x[j] * p**j``.
    Holds the power tables (grown on demand) so chunks reuse them."""

    def __init__(self, p: int):
        self.p, self.inv = p, pow(p, -1, 2**64)
        self.pow = self.ipow = np.ones(1, np.uint64)

    def _tables(self, n: int) -> None:
        if len(self.pow) <= n:
            m = max(n + 1, 2 * len(self.pow))
            self.pow = np.cumprod(np.r_[np.uint64(1), np.full(m - 1, self.p, np.uint64)], dtype=np.uint64)
            self.ipow = np.cumprod(np.r_[np.uint64(1), np.full(m - 1, self.inv, np.uint64)], dtype=np.uint64)

    def prefix(self, x: np.ndarray) -> np.ndarray:
        """uint64[len(x) + 1] prefix sums S."""
        self._tables(len(x))
        s = np.zeros(len(x) + 1, np.uint64)
        np.cumsum(x * self.pow[:len(x)], out=s[1:])
        return s

    def spans(self, s: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
        return (s[start + length] - s[start]) * self.ipow[start]


def word_hashes(texts: Sequence[bytes], byte_hash: PolyHash) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash of every word of the normalised ``texts``, concatenated; int64 words per text)."""
    if not texts:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    a = np.frombuffer(b" ".join(texts), np.uint8)
    edge = np.diff((a != 32).view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edge == 1), np.flatnonzero(edge == -1)
    h = _mix(byte_hash.spans(byte_hash.prefix(a.astype(np.uint64)), starts, ends - starts))
    sizes = np.fromiter(map(len, texts), np.int64, len(texts)) + 1
    text_starts = np.cumsum(sizes) - sizes
    counts = np.diff(np.searchsorted(starts, text_starts), append=len(starts))
    return h, counts


def window_hashes(prefix: np.ndarray, counts: np.ndarray, n: int, poly: PolyHash, *,
                  whole_short: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash of every window of ``n`` consecutive words inside one text, the text's index).

    ``prefix`` is ``poly.prefix(word hashes)`` of the texts' concatenated words, ``counts`` their
    word counts. ``whole_short``: a text of 1..n-1 words gives one hash of all its words.
    """
    counts = np.asarray(counts, np.int64)
    first = np.cumsum(counts) - counts
    size = np.minimum(counts, n) if whole_short else np.full(len(counts), n, np.int64)
    num = np.where(size > 0, np.maximum(counts - size + 1, 0), 0)
    owner = np.repeat(np.arange(len(counts)), num)
    start = np.arange(len(owner)) - np.repeat(np.cumsum(num) - num, num) + first[owner]
    width = size[owner]
    with np.errstate(over="ignore"):
        return _mix(poly.spans(prefix, start, width) + width.astype(np.uint64)), owner


def ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every window of ``n`` values of ``ids`` (empty when there are fewer than n)."""
    poly = PolyHash(_WORD_P)
    ids = np.asarray(ids, np.uint64)
    return window_hashes(poly.prefix(ids), np.array([len(ids)]), n, poly)[0]


def _probe_order(bins: int, seed: int) -> np.ndarray:
    """int64[bins, bins]: row j is bin j, then the other bins in a fixed random order."""
    keys = np.random.default_rng(seed).random((bins, bins))
    np.fill_diagonal(keys, -1.0)
    return np.argsort(keys, axis=1)


def minhash_signatures(shingles: np.ndarray, owner: np.ndarray, num_texts: int, bins: int = NUM_BINS,
                       seed: int = 0) -> np.ndarray:
    """uint32[num_texts, bins] one-permutation MinHash of each text's shingle hashes (``owner`` =
    text of each shingle), densified; texts without shingles get all zeros."""
    h = _mix(shingles ^ np.uint64(0x9E3779B97F4A7C15 + seed))
    shift = np.uint64(64 - int(np.log2(bins)))
    key = owner * bins + (h >> shift).astype(np.int64)
    sig = np.full(num_texts * bins, 0xFFFFFFFF, np.uint32)
    np.minimum.at(sig, key, (h & np.uint64(0xFFFFFFFF)).astype(np.uint32))
    filled = np.zeros(num_texts * bins, bool)
    filled[key] = True
    sig, filled = sig.reshape(num_texts, bins), filled.reshape(num_texts, bins)
    has_any = filled.any(axis=1)
    sig[~has_any] = 0
    rows, cols = np.nonzero(~filled & has_any[:, None])
    probes = _probe_order(bins, seed)
    for t in range(1, bins):  # the first non-empty bin on bin j's probe sequence
        if not len(rows):
            break
        src = probes[cols, t]
        ok = filled[rows, src]
        sig[rows[ok], cols[ok]] = sig[rows[ok], src[ok]]
        rows, cols = rows[~ok], cols[~ok]
    return sig


def _band_keys(part: np.ndarray) -> np.ndarray:
    """uint64 hash of each row of ``part`` (uint32[n, rows_per_band])."""
    key = np.zeros(len(part), np.uint64)
    for c in range(part.shape[1]):
        key = _mix(key ^ (part[:, c].astype(np.uint64) | np.uint64(c << 32)))
    return key


def _find(parent: np.ndarray, x: np.ndarray) -> np.ndarray:
    r = parent[x]
    while True:
        up = parent[r]
        if np.array_equal(up, r):
            return r
        r = up


def _union(parent: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """Join the sets of a[i] and b[i] for all i (vectorised hooking: a root points to a smaller
    root, so no cycles; hooks lost to a concurrent write are retried)."""
    while len(a):
        ra, rb = _find(parent, a), _find(parent, b)
        differ = ra != rb
        a, b = np.minimum(ra, rb)[differ], np.maximum(ra, rb)[differ]
        parent[b] = a


def _flatten(parent: np.ndarray) -> None:
    while True:
        up = parent[parent]
        if np.array_equal(up, parent):
            return
        parent[:] = up


def _shared(members: np.ndarray, bucket: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The entries (grouped by bucket) whose bucket holds at least two, and which start a bucket."""
    if not len(bucket):
        return members, bucket, np.zeros(0, bool)
    first = np.concatenate([[True], bucket[1:] != bucket[:-1]])
    run = np.cumsum(first) - 1
    keep = np.bincount(run)[run] > 1
    return members[keep], bucket[keep], first[keep]


def _similar(sig: np.ndarray, a: np.ndarray, b: np.ndarray, threshold: float, block: int = 1 << 15) -> np.ndarray:
    """Estimated Jaccard of rows a[i], b[i] >= threshold (in blocks: bounded memory)."""
    need = threshold * sig.shape[1] - 1e-9
    out = np.empty(len(a), bool)
    for s in range(0, len(a), block):
        out[s:s + block] = (sig[a[s:s + block]] == sig[b[s:s + block]]).sum(axis=1) >= need
    return out


@dataclass
class NearDuplicates:
    clusters: list[np.ndarray]  # row indices of each cluster, ascending; largest clusters first
    comparisons: int
    uncompared: int


def near_duplicate_clusters(sig: np.ndarray, threshold: float, bands: int = BANDS,
                            max_leaders: int = MAX_LEADERS) -> NearDuplicates:
    """Clusters of rows whose signatures (uint32[n, bins]) estimate Jaccard >= threshold; see the
    module docstring for the bucket-leader comparisons and their bound."""
    n, bins = sig.shape
    per_band = bins // bands
    parent = np.arange(n)
    comparisons = uncompared = 0
    for b in range(bands):
        key = _band_keys(sig[:, b * per_band:(b + 1) * per_band])
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        bucket = np.cumsum(np.concatenate([[True], sorted_key[1:] != sorted_key[:-1]])) - 1
        members, bucket, _ = _shared(order, bucket)
        if not len(members):
            continue
        # One entry per (bucket, cluster so far): rows already joined need no comparison.
        _, first = np.unique(bucket * n + _find(parent, members), return_index=True)
        first.sort()
        members, bucket = members[first], bucket[first]
        for round_ in range(max_leaders + 1):
            members, bucket, leads = _shared(members, bucket)
            if not len(members):
                break
            if round_ == max_leaders:
                uncompared += len(members)
                break
            leader = members[np.maximum.accumulate(np.where(leads, np.arange(len(leads)), 0))]
            a, c, bucket = leader[~leads], members[~leads], bucket[~leads]
            comparisons += len(a)
            match = _similar(sig, a, c, threshold)
            _union(parent, a[match], c[match])
            members, bucket = c[~match], bucket[~match]
        _flatten(parent)
    _flatten(parent)
    size = np.bincount(parent, minlength=n)
    rows = np.flatnonzero(size[parent] > 1)
    rows = rows[np.argsort(parent[rows], kind="stable")]
    clusters = np.split(rows, np.flatnonzero(np.diff(parent[rows])) + 1) if len(rows) else []
    clusters.sort(key=lambda c: (-len(c), c[0]))
    return NearDuplicates(clusters, comparisons, uncompared)


def _open(source, text_split: str, label: str | None):
    """The row source, a loading error prefixed with ``label`` (e.g. the config key it came from)."""
    try:
        return load_rows(source, text_split=text_split)
    except UserError as e:
        if label is None:
            raise
        raise UserError(f"{label}: {e}") from None


def _row_text(rows, format: str, column_map):
    """(format, transform, the function giving a row's own text for comparisons)."""
    if format == "auto":
        format = detect_format(rows[0], column_map) if len(rows) else format
        if format == "auto":
            return format, None, None
    if format not in TRANSFORMS:
        raise UserError(f"unknown format {format!r}; expected auto or one of {', '.join(TRANSFORMS)}")
    transform = TRANSFORMS[format](column_map)
    # Shared prompt wording (Alpaca's) would make every row look like every other one.
    return format, transform, getattr(transform, "raw_messages", transform)


@dataclass
class _Chunk:
    index: np.ndarray  # row numbers in the source
    words: np.ndarray  # uint64 word hashes, concatenated
    counts: np.ndarray  # words per row
    lengths: list[int] | None  # tokens per row (with a tokenizer)


def _chunks(rows, transform, row_text, bad: list[str], byte_hash: PolyHash, tokenizer=None) -> Iterator[_Chunk]:
    """Read, transform and normalise the rows, yielding them in vectorisable chunks."""
    texts, index, lengths, size = [], [], [], 0
    for i in range(len(rows)):
        try:
            row = rows[i]
            item = row_text(row)
        except DataError as e:
            bad.append(str(e.at(rows.where(i))))
            continue
        texts.append(normalised(example_text(item)))
        index.append(i)
        size += len(texts[-1])
        if tokenizer is not None:
            lengths.append(_token_length(tokenizer, transform, row_text, row, item))
        if size >= _CHUNK_BYTES:
            yield _Chunk(np.array(index, np.int64), *word_hashes(texts, byte_hash), lengths if tokenizer else None)
            texts, index, lengths, size = [], [], [], 0
    if texts:
        yield _Chunk(np.array(index, np.int64), *word_hashes(texts, byte_hash), lengths if tokenizer else None)


def _token_length(tokenizer, transform, row_text, row, item) -> int:
    if isinstance(item, str):
        return len(tokenizer.encode(item))
    templated = transform(row) if row_text is not transform else item
    if isinstance(templated, tuple):  # a pair: the chosen conversation; KTO: prompt + completion
        templated = templated[0] if len(templated) == 2 else templated[0] + templated[1]
    return len(tokenizer.tokenize_messages(templated)[0])


def _canonical(rows, row_text, i: int) -> bytes:
    return b" ".join(normalised(example_text(row_text(rows[i]))).split())


class _EvalSet:
    """One evaluation set's n-grams, looked up by every chunk of training rows."""

    def __init__(self, name: str, rows, row_text, bad: list[str], byte_hash: PolyHash, word_poly: PolyHash):
        self.name, self.rows, self.row_text, self.word_poly = name, rows, row_text, word_poly
        chunks = list(_chunks(rows, row_text, row_text, bad, byte_hash)) if row_text else []
        self.num_rows = len(rows)
        self.index = np.concatenate([c.index for c in chunks]) if chunks else np.zeros(0, np.int64)
        counts = np.concatenate([c.counts for c in chunks]) if chunks else np.zeros(0, np.int64)
        self.n = int(np.clip(np.percentile(counts, 5), 8, 13)) if len(counts) else 13
        hashes, owners, keys, offset = [], [], [], 0
        for c in chunks:
            prefix = word_poly.prefix(c.words)
            h, owner = window_hashes(prefix, c.counts, self.n, word_poly)
            hashes.append(h)
            owners.append(owner + offset)
            keys.append(_row_keys(prefix, c.counts, word_poly))
            offset += len(c.index)
        h = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        owner = np.concatenate(owners) if owners else np.zeros(0, np.int64)
        order = np.argsort(h, kind="stable")
        self.hashes, self.owner = h[order], owner[order]
        self.bits = max(16, min(28, int(np.ceil(np.log2(16 * len(h) + 1)))))
        self.filter = np.zeros(1 << self.bits, bool)
        self.filter[(self.hashes & np.uint64((1 << self.bits) - 1)).astype(np.int64)] = True
        self.short = np.flatnonzero(counts < self.n)
        self.short_keys = np.concatenate(keys)[self.short] if keys else np.zeros(0, np.uint64)
        self.hit = np.full(len(self.index), np.iinfo(np.int64).max, np.int64)  # first train row per eval row

    def scan(self, prefix: np.ndarray, counts: np.ndarray, first_row: int) -> None:
        """Look up the n-grams of a chunk of training rows (numbered from ``first_row``)."""
        if not len(self.hashes):
            return
        h, owner = window_hashes(prefix, counts, self.n, self.word_poly)
        maybe = self.filter[(h & np.uint64((1 << self.bits) - 1)).astype(np.int64)]
        h, owner = h[maybe], owner[maybe]
        lo = np.searchsorted(self.hashes, h, "left")
        num = np.searchsorted(self.hashes, h, "right") - lo
        found = num > 0
        lo, num, train = lo[found], num[found], owner[found] + first_row
        pos = np.repeat(lo - np.cumsum(num) + num, num) + np.arange(int(num.sum()))
        np.minimum.at(self.hit, self.owner[pos], np.repeat(train, num))

    def finish(self, train_rows, train_row_text, train_index: np.ndarray, train_keys: np.ndarray) -> EvalReport:
        """Short eval rows against whole training rows (confirmed on the texts); the report."""
        order = np.argsort(train_keys, kind="stable")
        sorted_keys = train_keys[order]
        pos = np.searchsorted(sorted_keys, self.short_keys)
        for e, key, p in zip(self.short, self.short_keys, pos):
            if p < len(sorted_keys) and sorted_keys[p] == key:
                t = int(order[p])
                if (_canonical(self.rows, self.row_text, int(self.index[e]))
                        == _canonical(train_rows, train_row_text, int(train_index[t]))):
                    self.hit[e] = min(self.hit[e], t)
        dirty = np.flatnonzero(self.hit < len(train_index))
        return EvalReport(self.name, self.num_rows, self.n,
                          [(self.rows.where(int(self.index[e])), train_rows.where(int(train_index[self.hit[e]])))
                           for e in dirty])


def _row_keys(prefix: np.ndarray, counts: np.ndarray, poly: PolyHash) -> np.ndarray:
    """uint64 hash of each text's whole word sequence."""
    first = np.cumsum(counts) - counts
    with np.errstate(over="ignore"):
        return _mix(poly.spans(prefix, first, counts) ^ counts.astype(np.uint64))


def _exact_groups(rows, row_text, index: np.ndarray, keys: np.ndarray) -> list[list[int]]:
    """Groups (>= 2 rows, ascending) of identical normalised text, by hash then confirmed on the texts."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    first = np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]])
    run = np.cumsum(first) - 1
    shared = np.bincount(run)[run] > 1
    groups = []
    for candidates in np.split(order[shared], np.flatnonzero(first[shared])[1:]) if shared.any() else []:
        by_text: dict[bytes, list[int]] = {}
        for i in candidates.tolist():
            by_text.setdefault(_canonical(rows, row_text, int(index[i])), []).append(i)
        groups += [g for g in by_text.values() if len(g) > 1]
    groups.sort()
    return groups


def check_data(train, eval=None, *, evals: Mapping[str, Mapping[str, Any]] | None = None, tokenizer=None,
               format: str = "auto", column_map: Mapping[str, str] | None = None, max_seq_len: int | None = None,
               near_dup_threshold: float = 0.8, text_split: str = "file", label: str | None = None,
               max_leaders: int = MAX_LEADERS) -> CheckReport:
    """Check training data (and optionally evaluation data); see the module docstring for the methods.

    ``eval``: one evaluation source, reported as ``eval``. ``evals``: named evaluation sets, each
    ``{"source": ..., "format": ..., "column_map": ..., "text_split": ..., "label": ...}`` (format,
    column_map and text_split, when absent, are the training data's). ``label`` prefixes errors opening
    the training source (e.g. the config key it came from).
    """
    sets = dict({"eval": {"source": eval}} if eval is not None else {}, **(evals or {}))
    byte_hash, word_poly = PolyHash(_BYTE_P), PolyHash(_WORD_P)
    rows = _open(train, text_split, label)
    fmt, transform, row_text = _row_text(rows, format, column_map)
    bad: list[str] = []
    eval_sets = []  # read first: their n-grams are what each chunk of training rows is looked up in
    for name, spec in sets.items():
        eval_rows = _open(spec["source"], spec.get("text_split", text_split), spec.get("label"))
        _, _, eval_text = _row_text(eval_rows, spec.get("format", format), spec.get("column_map", column_map))
        eval_bad: list[str] = []
        eval_sets.append(_EvalSet(name, eval_rows, eval_text, eval_bad, byte_hash, word_poly))
        bad += eval_bad
    n = len(rows)
    sig = np.empty((n, NUM_BINS), np.uint32)
    keys, index = np.empty(n, np.uint64), np.empty(n, np.int64)
    lengths, train_bad, done = np.empty(n, np.int64), [], 0
    for chunk in _chunks(rows, transform, row_text, train_bad, byte_hash, tokenizer) if row_text else []:
        m, prefix = len(chunk.index), word_poly.prefix(chunk.words)
        block = slice(done, done + m)
        index[block], lengths[block] = chunk.index, chunk.lengths if tokenizer is not None else chunk.counts
        keys[block] = _row_keys(prefix, chunk.counts, word_poly)
        sig[block] = minhash_signatures(*window_hashes(prefix, chunk.counts, SHINGLE, word_poly, whole_short=True), m)
        for e in eval_sets:
            e.scan(prefix, chunk.counts, done)
        done += m
    sig, keys, index, lengths = sig[:done], keys[:done], index[:done], lengths[:done]
    report = CheckReport(format=fmt, length_unit="tokens" if tokenizer is not None else "words",
                         num_rows=done + len(train_bad), bad_rows=train_bad + bad, lengths=lengths,
                         max_seq_len=max_seq_len, near_dup_threshold=near_dup_threshold, max_leaders=max_leaders)
    where = rows.where
    groups = _exact_groups(rows, row_text, index, keys)
    report.exact_duplicates = [[where(int(index[i])) for i in g] for g in groups]
    # One representative per exact group: exact copies are reported above.
    is_rep = np.ones(done, bool)
    for g in groups:
        is_rep[g[1:]] = False
    reps = np.flatnonzero(is_rep)
    near = near_duplicate_clusters(sig[reps], near_dup_threshold, max_leaders=max_leaders)
    report.near_duplicates = [[where(int(index[reps[i]])) for i in c] for c in near.clusters]
    report.near_dup_comparisons, report.near_dup_uncompared = near.comparisons, near.uncompared
    report.evals = [e.finish(rows, row_text, index, keys) for e in eval_sets]
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
           "rows: " + ", ".join([f"{report.num_rows} train"] + [f"{e.num_rows} {e.name}" for e in report.evals]),
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
    clusters = report.near_duplicates
    out.append(f"near duplicates (MinHash, word 5-grams, Jaccard >= {report.near_dup_threshold:g}): "
               f"{sum(len(c) - 1 for c in clusters)} row(s) close to an earlier one ({len(clusters)} cluster(s)"
               + (f", largest {len(clusters[0])} rows)" if clusters else ")"))
    out += [f"  {len(c)} rows: {' ~ '.join(c[:4])}{' ...' if len(c) > 4 else ''}" for c in clusters[:max_items]]
    if report.near_dup_uncompared:
        out.append(f"  note: {report.near_dup_uncompared} (band, row) entries of large LSH buckets were left "
                   f"after comparing with {report.max_leaders} leaders per bucket (bounded work; "
                   "their near duplicates can be missed)")
    for e in report.evals:
        pct = 100 * len(e.contaminated) / max(1, e.num_rows)
        out.append(f"{e.name} contamination ({e.ngram}-gram overlap with train): "
                   f"{len(e.contaminated)} of {e.num_rows} rows ({pct:.1f}%)")
        out += [f"  {a} overlaps {t}" for a, t in e.contaminated[:max_items]]
    return "\n".join(out)
