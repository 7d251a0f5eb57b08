"""HF ``tokenizer.json`` byte-level BPE (Qwen2/2.5/3, Llama 3, GPT-2 style) on tiktoken's core.

tiktoken merges the adjacent pair whose concatenation has the lowest rank (id); HF BPE merges the
adjacent pair listed first in ``merges`` (leftmost on ties). ``load_tokenizer_json`` runs a file
on tiktoken only when it can show the two rules give the same ids on every text; otherwise it
uses an exact implementation of HF's rule: the ``tokenizers`` library when it is installed
(Rust), else :class:`MergeRankBPE` (pure Python, no extra dependency), logging why.

Two sufficient conditions are checked (``_tiktoken_mismatch``):

* **One merge per token** (how HF writes GPT-2 and Qwen2/2.5/3: merge ``k`` builds token
  ``256 + k``): merges in increasing order of the id they build, every non-byte token either built
  by a merge or an added token, and every merged token ``t`` rebuilt by HF's own rule from its
  bytes alone (``HF(t) = [t]``). Proof sketch: both rules then merge in increasing id order. They
  could only differ where tiktoken merges an unlisted pair ``(x, y)``, ``x + y = t``, while HF has
  done every merge below ``id(t)``. No merge crossed the edges of that span, so it evolved as HF's
  run on ``t`` alone, which by the condition is then ``[l, r]``, the listed pair: a contradiction.
  Files made by a BPE trainer satisfy it (the trainer only merges pairs it sees in the text
  segmented by the earlier merges); it fails e.g. for merges ``[b c], [a b], [ab c]``, where HF
  gives ``[a, bc]`` for ``abc`` and tiktoken ``[abc]``.
* **Every split listed** (how HF converts tiktoken files, e.g. Llama 3): merges in non-decreasing
  order of the id they build and every split of a token into two tokens is a listed merge, so both
  rules see the same pairs in the same order.

Normalizers and pre-tokenizers other than the ones below raise a ValueError instead of silently
encoding differently.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from bisect import bisect_left
from collections.abc import Callable
from functools import partial
from heapq import heapify, heappop, heappush
from itertools import pairwise
from pathlib import Path
from typing import Any

import regex

from tunekit.checkpoint.errors import CheckpointError
from tunekit.data.tokenizers.base import BaseTokenizer
from tunekit.data.tokenizers.chat_formats import ChatFormat
from tunekit.data.tokenizers.tiktoken_tokenizer import TiktokenTokenizer

log = logging.getLogger(__name__)

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD")


def byte_decoder() -> dict[str, int]:
    """GPT-2's printable character for each byte, inverted: character -> byte value."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) +
                 list(range(ord("®"), ord("ÿ") + 1)))
    chars = {b: b for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + n
            n += 1
    return {chr(c): b for b, c in chars.items()}


def _normalizer(spec: dict | None, where: str) -> Callable[[str], str] | None:
    if spec is None:
        return None
    kind = spec.get("type")
    if kind in _UNICODE_FORMS:
        return partial(unicodedata.normalize, kind)
    if kind == "Sequence":
        steps = [_normalizer(s, where) for s in spec.get("normalizers", [])]
        steps = [s for s in steps if s is not None]

        def run(text: str) -> str:
            for step in steps:
                text = step(text)
            return text
        return run if steps else None
    raise CheckpointError(f"{where}: normalizer type {kind!r} is not supported (only "
                          f"{', '.join(_UNICODE_FORMS)} and Sequence of them)")


def _pattern(spec: dict | None, where: str) -> str:
    """The pre-tokenizer regex of a byte-level BPE ``pre_tokenizer`` spec."""
    if spec is None:
        raise CheckpointError(f"{where}: pre_tokenizer is null; a byte-level BPE needs ByteLevel")
    steps = spec["pretokenizers"] if spec.get("type") == "Sequence" else [spec]
    kinds = [s.get("type") for s in steps]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    splits = [s for s in steps if s.get("type") == "Split"]
    if len(byte_level) != 1 or len(splits) > 1 or len(steps) != len(byte_level) + len(splits):
        raise CheckpointError(f"{where}: pre_tokenizer {kinds} is not supported (expected ByteLevel, "
                              "optionally after one Split regex)")
    bl = byte_level[0]
    if bl.get("add_prefix_space"):
        raise CheckpointError(f"{where}: ByteLevel add_prefix_space=true is not supported")
    if splits:
        sp = splits[0]
        regex = (sp.get("pattern") or {}).get("Regex")
        if regex is None or sp.get("behavior") != "Isolated" or sp.get("invert"):
            raise CheckpointError(f"{where}: Split pre-tokenizer must use a Regex pattern, "
                                  "behavior Isolated and invert false")
        if bl.get("use_regex", True):
            raise CheckpointError(f"{where}: Split followed by ByteLevel(use_regex=true) is not "
                                  "supported")
        return regex
    if not bl.get("use_regex", True):
        raise CheckpointError(f"{where}: ByteLevel(use_regex=false) without a Split regex")
    return GPT2_PATTERN


def post_processor_tokens(spec: dict | None, where: str) -> tuple[list[str], list[str]]:
    """The special tokens a ``post_processor`` puts before and after a single text, e.g.
    ``(["<|begin_of_text|>"], [])`` for Llama 3's ``TemplateProcessing``."""
    kind = None if spec is None else spec.get("type")
    if kind in (None, "ByteLevel"):
        return [], []
    if kind == "Sequence":
        before: list[str] = []
        after: list[str] = []
        for step in spec.get("processors", []):  # each step wraps the previous one's output
            b, a = post_processor_tokens(step, where)
            before, after = b + before, after + a
        return before, after
    if kind == "TemplateProcessing":
        items = spec.get("single", [])
        text_at = [k for k, item in enumerate(items) if "Sequence" in item]
        if len(text_at) != 1 or any("SpecialToken" not in item for k, item in enumerate(items)
                                    if k != text_at[0]):
            raise CheckpointError(f"{where}: post_processor TemplateProcessing single={items!r} "
                                  "is not special tokens around one text")
        names = [item.get("SpecialToken", {}).get("id") for item in items]
        return names[:text_at[0]], names[text_at[0] + 1:]
    raise CheckpointError(f"{where}: post_processor {kind!r} is not supported (ByteLevel, "
                          "TemplateProcessing or a Sequence of them)")


def _bpe_model(model: dict, where: str) -> tuple[dict[bytes, int], list[tuple[bytes, bytes]]]:
    """Byte vocabulary (token bytes -> id) and merges (as byte pairs) of an HF BPE model."""
    if model.get("type") != "BPE":
        raise CheckpointError(f"{where}: model type {model.get('type')!r} is not byte-level BPE")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise CheckpointError(f"{where}: BPE option {key}={model[key]!r} is not supported")
    if model.get("byte_fallback"):
        raise CheckpointError(f"{where}: byte_fallback BPE is a sentencepiece-style model; load it "
                              "from tokenizer.model instead")
    decode = byte_decoder()
    ranks: dict[bytes, int] = {}
    for token, idx in model["vocab"].items():
        try:
            ranks[bytes(decode[c] for c in token)] = idx
        except KeyError:
            raise CheckpointError(f"{where}: vocab token {token!r} is not in GPT-2 byte-to-unicode "
                                  "form, so this is not a byte-level BPE") from None
    merges = []
    for n, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        try:
            merges.append((bytes(decode[c] for c in a), bytes(decode[c] for c in b)))
        except KeyError:
            raise CheckpointError(f"{where}: merge {n} {m!r} is not in GPT-2 byte-to-unicode "
                                  "form") from None
    return ranks, merges


def _tiktoken_mismatch(ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]],
                       added_ids: set[int]) -> str | None:
    """None when tiktoken's rule provably gives HF's ids for this vocab and merge list (see the
    module docstring), else why it may not."""
    built = []
    for n, (a, b) in enumerate(merges):
        if a + b not in ranks or a not in ranks or b not in ranks:
            return f"merge {n} ({a!r}, {b!r}) uses or produces a token missing from the vocab"
        built.append(ranks[a + b])
    if all(x < y for x, y in pairwise(built)):
        return _one_merge_per_token_mismatch(ranks, merges, added_ids)
    return _unlisted_split(ranks, merges, built)


def merge_table(ranks: dict[bytes, int],
                merges: list[tuple[bytes, bytes]]) -> dict[tuple[int, int], tuple[int, int]]:
    """``(left id, right id) -> (merge rank, merged id)``; a repeated pair keeps its last rank,
    as in ``tokenizers``."""
    return {(ranks[a], ranks[b]): (rank, ranks[a + b]) for rank, (a, b) in enumerate(merges)}


def _one_merge_per_token_mismatch(ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]],
                                  added_ids: set[int]) -> str | None:
    """Why a file with one merge per token, in id order, may not be reproduced by tiktoken: a
    non-byte token that HF's rule does not rebuild from its own bytes (and that is not an added
    token, which never reaches the BPE). About 12 us per token on one core."""
    table = merge_table(ranks, merges)
    byte_ids = [ranks.get(bytes([b])) for b in range(256)]
    if None in byte_ids:
        return "the vocab lacks some of the 256 single-byte tokens"
    for token, idx in ranks.items():
        if len(token) > 1 and idx not in added_ids:
            rebuilt = hf_bpe([byte_ids[b] for b in token], table)
            if rebuilt != [idx]:
                return (f"HF's merges turn token {token!r} (id {idx}) into {len(rebuilt)} "
                        f"tokens, so tiktoken may merge pairs HF does not")
    return None


def _unlisted_split(ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]],
                    built: list[int]) -> str | None:
    """Why a file with several merges per token may not be reproduced by tiktoken."""
    for n in range(1, len(built)):
        if built[n] < built[n - 1]:
            return (f"merge {n} {merges[n]!r} yields id {built[n]}, lower than the id "
                    f"{built[n - 1]} of an earlier merge (merge order is not id order)")
    merge_set = set(merges)
    for token in ranks:
        for k in range(1, len(token)):
            pair = (token[:k], token[k:])
            if pair[0] in ranks and pair[1] in ranks and pair not in merge_set:
                return (f"token {token!r} can be formed from ({pair[0]!r}, {pair[1]!r}), which "
                        "is not a listed merge")
    return None


def hf_bpe(symbols: list[int], merges: dict[tuple[int, int], tuple[int, int]]) -> list[int]:
    """HF's BPE rule on one pre-token: repeatedly merge the adjacent pair with the lowest merge
    rank, the leftmost one on ties (as ``tokenizers``' ``Word::merge_all``, without dropout).

    ``symbols``: the ids of the pre-token's bytes; ``merges``: ``(left id, right id) -> (rank,
    merged id)``. A heap of candidate pairs keeps long pre-tokens (a 10k-letter run) O(n log n);
    popped entries whose pair has changed since they were pushed are skipped.
    """
    n = len(symbols)
    sym = list(symbols)
    heap = [(m[0], i) for i in range(n - 1) if (m := merges.get((sym[i], sym[i + 1])))]
    if not heap:
        return sym
    heapify(heap)
    nxt, prv = list(range(1, n + 1)), list(range(-1, n - 1))
    while heap:
        rank, i = heappop(heap)
        j = nxt[i]
        if sym[i] < 0 or j >= n:
            continue
        m = merges.get((sym[i], sym[j]))
        if m is None or m[0] != rank:
            continue
        sym[i], sym[j] = m[1], -1
        nxt[i] = k = nxt[j]
        if k < n:
            prv[k] = i
            if m := merges.get((sym[i], sym[k])):
                heappush(heap, (m[0], i))
        if prv[i] >= 0 and (m := merges.get((sym[prv[i]], sym[i]))):
            heappush(heap, (m[0], prv[i]))
    return [s for s in sym if s >= 0]


class MergeRankBPE(TiktokenTokenizer):
    """Exact HF byte-level BPE in pure Python, for ``tokenizer.json`` files tiktoken cannot
    reproduce when the ``tokenizers`` library is not installed.

    Pre-tokenizes with the file's regex (``regex`` module, matches and the text between them, as
    HF's ``Split(behavior="isolated")``), then runs :func:`hf_bpe` on each pre-token, with a cache
    per pre-token. Everything else (decode, offsets for chat masks) is the tiktoken tokenizer's.
    """

    _CACHE_SIZE = 100_000

    def __init__(self, mergeable_ranks: dict[bytes, int], pat_str: str,
                 merges: list[tuple[bytes, bytes]], *, ignore_merges: bool = False, **kwargs: Any):
        super().__init__(mergeable_ranks, pat_str, **kwargs)
        self._ranks = mergeable_ranks
        self._byte_ids = [mergeable_ranks[bytes([b])] for b in range(256)]
        self._merges = merge_table(mergeable_ranks, merges)
        self._ignore_merges = ignore_merges  # HF: a pre-token that is a token is not merged
        self._regex = regex.compile(pat_str)
        self._cache: dict[str, list[int]] = {}

    def _pieces(self, text: str):
        pos = 0
        for m in self._regex.finditer(text):
            if m.start() > pos:
                yield text[pos:m.start()]
            if m.end() > m.start():
                yield m.group()
            pos = m.end()
        if pos < len(text):
            yield text[pos:]

    def _encode_piece(self, piece: str) -> list[int]:
        raw = piece.encode("utf-8")
        if self._ignore_merges and raw in self._ranks:
            return [self._ranks[raw]]
        return hf_bpe([self._byte_ids[b] for b in raw], self._merges)

    def _encode_ordinary(self, text: str) -> list[int]:
        if not text.isascii():  # lone surrogates become U+FFFD, as tiktoken does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        ids: list[int] = []
        cache = self._cache
        for piece in self._pieces(text):
            cached = cache.get(piece)
            if cached is None:
                cached = self._encode_piece(piece)
                if len(cache) < self._CACHE_SIZE:
                    cache[piece] = cached
            ids += cached
        return ids


class HFTokenizersBPE(BaseTokenizer):
    """Fallback for ``tokenizer.json`` files tiktoken cannot reproduce: the ``tokenizers``
    library runs the model (added tokens are still split out by ``BaseTokenizer``)."""

    def __init__(self, path: str | Path, **kwargs: Any):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))
        super().__init__(**kwargs)

    def _encode_chunk(self, text, at_start):
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_chunk_cut(self, text, at_start, cuts):
        enc = self._tok.encode(text, add_special_tokens=False)
        char_starts = [o[0] for o in enc.offsets]
        return enc.ids, [bisect_left(char_starts, c) for c in cuts]

    def _decode_chunk(self, ids, at_start):
        return self._tok.decode(ids, skip_special_tokens=False)


def load_tokenizer_json(path: str | Path, *, bos_token: str | None, eos_token: str,
                        pad_token: str | None = None,
                        extra_added_tokens: dict[str, tuple[int, bool]] | None = None,
                        chat_format: ChatFormat | None = None,
                        max_seq_len: int | None = None) -> BaseTokenizer:
    """Build a tokenizer from a byte-level BPE ``tokenizer.json``.

    ``bos_token`` / ``eos_token`` / ``pad_token`` are token strings (from
    ``tokenizer_config.json``); ``extra_added_tokens`` maps more token strings to
    ``(id, special)``. ``add_bos_token`` / ``add_eos_token`` of the result say whether the
    file's ``post_processor`` adds BOS / EOS (none when it is null).
    """
    path = Path(path)
    where = str(path)
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: cannot read tokenizer.json ({e})") from None
    if not isinstance(spec, dict) or "model" not in spec:
        raise CheckpointError(f"{where}: no 'model' section; not an HF tokenizer.json")
    normalize = _normalizer(spec.get("normalizer"), where)
    pattern = _pattern(spec.get("pre_tokenizer"), where)
    decoder = spec.get("decoder")
    if decoder is not None and decoder.get("type") != "ByteLevel":
        raise CheckpointError(f"{where}: decoder {decoder.get('type')!r} is not ByteLevel")
    ranks, merges = _bpe_model(spec["model"], where)

    added: dict[str, int] = {}
    special_ids: set[int] = set()
    for tok in spec.get("added_tokens", []):
        for flag in ("lstrip", "rstrip", "single_word"):
            if tok.get(flag):
                raise CheckpointError(f"{where}: added token {tok['content']!r} sets {flag}=true, "
                                      "which is not supported")
        added[tok["content"]] = tok["id"]
        if tok.get("special"):
            special_ids.add(tok["id"])
    for content, (idx, special) in (extra_added_tokens or {}).items():
        added[content] = idx
        if special:
            special_ids.add(idx)

    def token_id(name: str | None, role: str) -> int | None:
        if name is None:
            return None
        if name in added:
            return added[name]
        raw = name.encode("utf-8")
        if raw in ranks:
            return ranks[raw]
        raise CheckpointError(f"{where}: {role} {name!r} is not a token of this vocabulary")

    kwargs = {"added_tokens": added, "special_ids": special_ids,
              "bos_id": token_id(bos_token, "bos_token"), "eos_id": token_id(eos_token, "eos_token"),
              "chat_format": chat_format, "max_seq_len": max_seq_len, "normalize": normalize}
    pad_id = token_id(pad_token, "pad_token")
    before, after = post_processor_tokens(spec.get("post_processor"), where)
    for tokens, name, key in ((before, bos_token, "bos_token"), (after, eos_token, "eos_token")):
        if tokens and tokens != [name]:
            raise CheckpointError(f"{where}: the post_processor adds {tokens} where only the "
                                  f"{key} ({name!r}) is supported")
    tok = _bpe_tokenizer(path, ranks, merges, pattern, pad_id, spec["model"], added, kwargs)
    tok.add_bos_token, tok.add_eos_token = bool(before), bool(after)
    return tok


def _bpe_tokenizer(path: Path, ranks: dict[bytes, int], merges: list[tuple[bytes, bytes]],
                   pattern: str, pad_id: int | None, model: dict, added: dict[str, int],
                   kwargs: dict[str, Any]) -> BaseTokenizer:
    """tiktoken when it provably gives HF's ids, else the exact rule (``tokenizers`` if
    installed, else pure Python)."""
    where = str(path)
    problem = _tiktoken_mismatch(ranks, merges, set(added.values()))
    if problem is None:
        return TiktokenTokenizer(ranks, pattern, pad_id=pad_id, name=f"hf:{where}", **kwargs)
    try:
        import tokenizers  # noqa: F401  (optional: faster than the pure-Python rule)
    except ImportError:
        log.warning("%s: tiktoken may not reproduce these merges (%s); using the exact pure-Python "
                    "BPE (slower; pip install tokenizers makes it fast)", where, problem)
        return MergeRankBPE(ranks, pattern, merges, pad_id=pad_id, name=f"hf:{where}",
                            ignore_merges=bool(model.get("ignore_merges")), **kwargs)
    log.warning("%s: tiktoken may not reproduce these merges (%s); using the tokenizers library "
                "instead", where, problem)
    vocab_size = max(max(ranks.values()), max(added.values(), default=0)) + 1
    kwargs["pad_id"] = kwargs["eos_id"] if pad_id is None else pad_id
    return HFTokenizersBPE(path, vocab_size=vocab_size, **kwargs)
