"""Byte-level BPE on tiktoken's Rust core, and Llama 3's ``original/tokenizer.model`` loader."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from itertools import accumulate
from pathlib import Path

import tiktoken

from tunekit.checkpoint.errors import CheckpointError
from tunekit.data.tokenizers.base import BaseTokenizer, count_tokens_before
from tunekit.data.tokenizers.chat_formats import ChatFormat

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                  r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Llama 3.1 layout of the 256 ids after the BPE ranks (Llama 3.0 differs only in which reserved
# slots got names; the ids of begin/end_of_text, header and eot tokens are the same).
_LLAMA3_NAMED = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
                 6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>",
                 9: "<|eot_id|>", 10: "<|python_tag|>"}
LLAMA3_NUM_SPECIAL = 256


def llama3_special_tokens(base: int) -> dict[str, int]:
    """The 256 Llama 3 special tokens, numbered from ``base`` (128000 for the real vocab)."""
    out: dict[str, int] = {}
    reserved = 0
    for k in range(LLAMA3_NUM_SPECIAL):
        name = _LLAMA3_NAMED.get(k)
        if name is None:
            name = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
        out[name] = base + k
    return out


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file (``<base64 token> <rank>`` per line)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise CheckpointError(f"{path}:{n}: not a tiktoken BPE line (expected "
                                      "'<base64 token> <rank>')") from None
    if not ranks:
        raise CheckpointError(f"{path}: empty tiktoken BPE file")
    return ranks


class TiktokenTokenizer(BaseTokenizer):
    """Byte-level BPE whose merge priority is the token rank (tiktoken's rule).

    Used for Llama 3's tiktoken file and for HF ``tokenizer.json`` byte-level BPE vocabularies
    whose merges are rank-consistent (see ``tunekit.data.tokenizers.hf_json``).
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], pat_str: str, *,
                 added_tokens: dict[str, int], special_ids: set[int], bos_id: int | None,
                 eos_id: int, pad_id: int | None = None, chat_format: ChatFormat | None = None,
                 max_seq_len: int | None = None, normalize: Callable[[str], str] | None = None,
                 name: str = "tunekit_bpe"):
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing:
            raise CheckpointError(f"BPE vocabulary lacks {len(missing)} single-byte tokens (e.g. byte "
                                  f"{missing[0]}); tiktoken needs all 256 bytes")
        self._enc = tiktoken.Encoding(name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                                      special_tokens={})
        vocab_size = max(max(mergeable_ranks.values()), max(added_tokens.values(), default=0)) + 1
        super().__init__(added_tokens=added_tokens, special_ids=special_ids, bos_id=bos_id,
                         eos_id=eos_id, pad_id=eos_id if pad_id is None else pad_id,
                         vocab_size=vocab_size, chat_format=chat_format,
                         max_seq_len=max_seq_len, normalize=normalize)

        # Byte length of every token, so token offsets are a running sum (tiktoken's
        # decode_with_offsets does the same per token in Python, several times slower).
        self._token_len = [0] * (max(mergeable_ranks.values()) + 1)
        for token, rank in mergeable_ranks.items():
            self._token_len[rank] = len(token)

        # Encodings of short chunks (role names, "\n\n", ...): every call into tiktoken costs
        # about a microsecond however short the text, as much as BPE-encoding five tokens.
        self._short_chunks: dict[str, list[int]] = {}

    def _encode_ordinary(self, text: str) -> list[int]:
        # tiktoken's core directly; its Python wrapper adds a frame and a try per call. Lone
        # surrogates fail there, and the wrapper replaces them as tiktoken always does.
        try:
            return self._enc._core_bpe.encode_ordinary(text)
        except (UnicodeEncodeError, AttributeError):
            return self._enc.encode_ordinary(text)

    def _encode_chunk(self, text, at_start):
        if len(text) > 16:
            return self._encode_ordinary(text)
        ids = self._short_chunks.get(text)
        if ids is None:
            ids = self._encode_ordinary(text)
            if len(self._short_chunks) < 65536:
                self._short_chunks[text] = ids
        return ids.copy()

    def _encode_chunk_cut(self, text, at_start, cuts):
        ids = self._encode_ordinary(text)
        if not text.isascii():
            cuts = [len(text[:c].encode("utf-8")) for c in cuts]
        # A token whose first byte lies before the cut's first byte starts before the cut.
        return ids, count_tokens_before(accumulate(map(self._token_len.__getitem__, ids[:-1])), cuts)

    def _decode_chunk(self, ids, at_start):
        return self._enc.decode(ids, errors="replace")


def llama3_tokenizer(path: str | Path, *, bos_token: str = "<|begin_of_text|>",
                     eos_token: str = "<|end_of_text|>",
                     pad_token: str = "<|finetune_right_pad_id|>",
                     chat_format: ChatFormat | None = None,
                     max_seq_len: int | None = None) -> TiktokenTokenizer:
    """Llama 3 tokenizer from its tiktoken file (``original/tokenizer.model``). Instruct models
    end turns with ``eos_token="<|eot_id|>"``."""
    ranks = load_tiktoken_ranks(path)
    specials = llama3_special_tokens(max(ranks.values()) + 1)

    def token_id(name: str, role: str) -> int:
        if name not in specials:
            raise CheckpointError(f"{path}: {role} {name!r} is not a Llama 3 special token")
        return specials[name]

    return TiktokenTokenizer(
        ranks, LLAMA3_PATTERN, added_tokens=specials, special_ids=set(specials.values()),
        bos_id=token_id(bos_token, "bos_token"), eos_id=token_id(eos_token, "eos_token"),
        pad_id=token_id(pad_token, "pad_token"), chat_format=chat_format,
        max_seq_len=max_seq_len, name=f"llama3:{path}")
