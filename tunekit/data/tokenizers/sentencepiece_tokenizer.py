"""Sentencepiece tokenizer (Llama 2, Mistral, Gemma ``tokenizer.model``)."""

from __future__ import annotations

from bisect import bisect_left
from itertools import accumulate
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from tunekit.checkpoint.errors import CheckpointError
from tunekit.data.tokenizers.base import BaseTokenizer, count_tokens_before
from tunekit.data.tokenizers.chat_formats import ChatFormat


def _piece_byte_lengths(proto) -> list[int] | None:
    """UTF-8 length in the input text of every piece, or None when the model's normalizer
    rewrites text (then piece lengths say nothing about input offsets).

    With an identity normalizer a piece is the input with spaces written as "▁" (byte pieces
    ``<0xAB>`` are one byte, control pieces none), so token offsets are a running sum of these
    lengths instead of sentencepiece's proto output, which is twice as slow to produce.
    """
    spec = proto.normalizer_spec
    if (spec.precompiled_charsmap or spec.remove_extra_whitespaces
            or proto.trainer_spec.treat_whitespace_as_suffix):
        return None
    piece = type(proto.pieces[0]) if proto.pieces else None
    lengths = []
    for p in proto.pieces:
        if p.type == piece.BYTE:
            lengths.append(1)
        elif p.type in (piece.NORMAL, piece.USER_DEFINED):
            lengths.append(len(p.piece.replace("\u2581", " ").encode("utf-8")))
        else:  # control pieces; unknown pieces are caught by the caller
            lengths.append(0)
    return lengths


def _proto_cut(sp: spm.SentencePieceProcessor, text: str, byte_cuts: list[int]
               ) -> tuple[list[int], list[int]]:
    pieces = sp.encode(text, return_type="proto").pieces
    begins = [p.begin for p in pieces]  # UTF-8 byte offsets into text
    return [p.id for p in pieces], [bisect_left(begins, c) for c in byte_cuts]


class SentencePieceTokenizer(BaseTokenizer):
    """A sentencepiece model with HF's handling of special tokens around it.

    Like transformers (``legacy=False``, Metaspace ``prepend_scheme="first"``), the dummy prefix
    space is added only to text at the very start of the input, not to text that follows a
    special token such as ``<s>`` or ``<start_of_turn>``, and not when the text already starts
    with a space (so, as in HF, ``decode(encode(" x"))`` loses that leading space).

    ``legacy=True`` is HF's ``legacy`` flag of ``tokenizer_config.json`` (Metaspace
    ``prepend_scheme="always"``): every text chunk, also one right after a special token, gets the
    dummy prefix (still not when it starts with a space).

    ``added_tokens`` adds/overrides token strings -> ``(id, special)`` (from
    ``tokenizer_config.json``); control and user-defined pieces of the model are always added.
    """

    def __init__(self, path: str | Path, *, added_tokens: dict[str, tuple[int, bool]] | None = None,
                 bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_format: ChatFormat | None = None,
                 max_seq_len: int | None = None, legacy: bool = False):
        path = Path(path)
        self._legacy = legacy
        try:
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(path.read_bytes())
            self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except Exception as e:  # protobuf and sentencepiece raise assorted types
            raise CheckpointError(f"{path}: not a sentencepiece model ({e})") from None
        self._dummy_prefix = proto.normalizer_spec.add_dummy_prefix
        self._piece_len = _piece_byte_lengths(proto)
        proto.normalizer_spec.add_dummy_prefix = False
        self._sp_inner = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        sp = self._sp

        tokens: dict[str, int] = {}
        special: set[int] = set()
        for i in range(sp.get_piece_size()):
            if sp.is_control(i) or sp.is_unknown(i):
                tokens[sp.id_to_piece(i)] = i
                special.add(i)
            elif proto.pieces[i].type == proto.pieces[i].USER_DEFINED:
                tokens[sp.id_to_piece(i)] = i
        for content, (idx, is_special) in (added_tokens or {}).items():
            tokens[content] = idx
            (special.add if is_special else special.discard)(idx)

        def token_id(name: str | None, default: int, role: str) -> int | None:
            if name is None:
                return default if default >= 0 else None
            if name in tokens:
                return tokens[name]
            raise CheckpointError(f"{path}: {role} {name!r} is not a token of this model")

        eos_id = token_id(eos_token, sp.eos_id(), "eos_token")
        if eos_id is None:
            raise CheckpointError(f"{path}: the model has no EOS piece; set eos_token in "
                                  "tokenizer_config.json")
        pad_id = token_id(pad_token, sp.pad_id(), "pad_token")
        super().__init__(added_tokens=tokens, special_ids=special,
                         bos_id=token_id(bos_token, sp.bos_id(), "bos_token"), eos_id=eos_id,
                         pad_id=eos_id if pad_id is None else pad_id,
                         vocab_size=max([sp.get_piece_size() - 1, *tokens.values()]) + 1,
                         chat_format=chat_format, max_seq_len=max_seq_len)

    def _prefixed(self, text: str, at_start: bool) -> bool:
        # HF's Metaspace prepends "▁" only when the text does not already start with a space.
        return (at_start or self._legacy) and not text.startswith(" ")

    def _encode_chunk(self, text, at_start):
        return (self._sp if self._prefixed(text, at_start) else self._sp_inner).encode(text)

    def _encode_chunk_cut(self, text, at_start, cuts):
        prefixed = self._prefixed(text, at_start)
        sp = self._sp if prefixed else self._sp_inner
        if not text.isascii():
            cuts = [len(text[:c].encode("utf-8")) for c in cuts]  # in UTF-8 bytes from here on
        if self._piece_len is None or "\u2581" in text:
            return _proto_cut(sp, text, cuts)
        ids = sp.encode(text)
        if self._sp.unk_id() in ids:  # an unknown piece stands for text of unknown length
            return _proto_cut(sp, text, cuts)
        # The dummy prefix "▁" counts one byte that is not in text: shift the cuts past it.
        shift = int(prefixed and self._dummy_prefix)
        ends = accumulate(map(self._piece_len.__getitem__, ids[:-1]))
        return ids, count_tokens_before(ends, [c + shift for c in cuts])

    def _decode_chunk(self, ids, at_start):
        return (self._sp if at_start else self._sp_inner).decode(ids)
