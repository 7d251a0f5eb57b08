"""HF ``tokenizer.json`` byte-level BPE (Qwen2/2.5/3, Llama 3, GPT-2 style) on tiktoken's core.

tiktoken merges the adjacent pair whose concatenation has the lowest rank; HF BPE merges the pair
listed first in ``merges``. Both give the same ids when (1) merge order follows the ids of the
merged tokens and (2) every split of a vocabulary token into two vocabulary tokens is a listed
merge (otherwise tiktoken could build a token from a pair HF never merges). ``load_tokenizer_json``
checks both; when a file fails them it falls back to the ``tokenizers`` library itself (exact, also
Rust; an optional dependency, asked for by name when missing), logging why. Normalizers and
pre-tokenizers other than the ones below raise a ValueError instead of silently encoding
differently.
"""

from __future__ import annotations

import json
from bisect import bisect_left
import logging
import unicodedata
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

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


def _bpe_ranks(model: dict, where: str) -> tuple[dict[bytes, int], str | None]:
    """Byte vocabulary of an HF BPE model and, if it is not rank-consistent, the reason."""
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
    by_id = {i: t for t, i in ranks.items()}
    merges = []
    for m in model.get("merges", []):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        merges.append((bytes(decode[c] for c in a), bytes(decode[c] for c in b)))
    return ranks, _rank_inconsistency(ranks, by_id, merges)


def _rank_inconsistency(ranks: dict[bytes, int], by_id: dict[int, bytes],
                        merges: list[tuple[bytes, bytes]]) -> str | None:
    previous = -1
    for n, (a, b) in enumerate(merges):
        rank = ranks.get(a + b)
        if rank is None:
            return f"merge {n} ({a!r}, {b!r}) produces a token missing from the vocab"
        if rank < previous:
            return (f"merge {n} ({a!r}, {b!r}) yields id {rank}, lower than the id {previous} "
                    "of an earlier merge (merge order is not id order)")
        previous = rank
    merge_set = set(merges)
    for token in by_id.values():
        for k in range(1, len(token)):
            pair = (token[:k], token[k:])
            if pair[0] in ranks and pair[1] in ranks and pair not in merge_set:
                return (f"token {token!r} can be formed from ({pair[0]!r}, {pair[1]!r}), which "
                        "is not a listed merge")
    return None


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
    ``(id, special)``.
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
    ranks, problem = _bpe_ranks(spec["model"], where)

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

    kwargs = dict(added_tokens=added, special_ids=special_ids,
                  bos_id=token_id(bos_token, "bos_token"), eos_id=token_id(eos_token, "eos_token"),
                  chat_format=chat_format, max_seq_len=max_seq_len, normalize=normalize)
    pad_id = token_id(pad_token, "pad_token")
    if problem is None:
        return TiktokenTokenizer(ranks, pattern, pad_id=pad_id, name=f"hf:{where}", **kwargs)
    try:
        import tokenizers  # noqa: F401  (an optional dependency: only these files need it)
    except ImportError:
        raise ImportError(f"{where}: merges are not rank-consistent ({problem}), so tiktoken "
                          "cannot reproduce this tokenizer; it needs the Hugging Face tokenizers "
                          "library: pip install tokenizers") from None
    log.warning("%s: merges are not rank-consistent (%s); using the tokenizers library "
                "instead of tiktoken", where, problem)
    vocab_size = max(max(ranks.values()), max(added.values(), default=0)) + 1
    kwargs["pad_id"] = kwargs["eos_id"] if pad_id is None else pad_id
    return HFTokenizersBPE(path, vocab_size=vocab_size, **kwargs)
