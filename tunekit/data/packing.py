"""Greedy packing of tokenized examples into fixed-length rows.

Examples are tokenized once, concatenated into one flat token array (labels computed over it
without a per-token Python loop) and cut into rows of at most ``max_seq_len`` tokens: documents are
taken in dataset order and a new row starts when the next document does not fit. Each row keeps
its document lengths so the collate can build per-document ``input_pos`` and a block-causal mask.

Documents longer than ``max_seq_len``: ``long_examples="truncate"`` (default) keeps the first
``max_seq_len`` tokens; ``"split"`` cuts them into ``max_seq_len`` chunks that become separate
documents. With ``"split"`` the last token of a chunk keeps its real target, the first token of
the next chunk (it conditions only on earlier tokens of its own chunk, so that is a valid
next-token target); only the last token of the whole document gets -100.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tunekit.data.collate import packed_collate
from tunekit.data.datasets import SFTDataset, log_skipped
from tunekit.data.errors import DataError
from tunekit.data.labels import shift_labels_flat
from tunekit.data.parallel import map_ranges

logger = logging.getLogger(__name__)


def greedy_pack(lengths: np.ndarray, max_seq_len: int) -> np.ndarray:
    """Row index of each document, filling rows in order (a new row when the next one does not fit).

    lengths: int[d]. Returns int64[d], non-decreasing. A document longer than max_seq_len gets a
    row of its own (preference pairs may; SFT packing cuts documents to max_seq_len first).
    """
    rows = np.empty(len(lengths), dtype=np.int64)
    row = used = 0
    for i, n in enumerate(lengths.tolist()):  # one step per document, not per token
        if used and used + n > max_seq_len:
            row, used = row + 1, 0
        rows[i] = row
        used += n
    return rows


def split_lengths(lengths: np.ndarray, max_seq_len: int) -> np.ndarray:
    """Document lengths with every length > max_seq_len replaced by chunks of max_seq_len + rest."""
    chunks = -(-lengths // max_seq_len)
    out = np.full(int(chunks.sum()), max_seq_len, dtype=np.int64)
    last = np.cumsum(chunks) - 1
    out[last] = lengths - (chunks - 1) * max_seq_len
    return out


class PackedDataset(torch.utils.data.Dataset):
    """Packed rows: ``dataset[i] = {"tokens": LongTensor[n], "labels": LongTensor[n],
    "seq_lens": LongTensor[k]}`` with n <= max_seq_len (padding is added by :meth:`collate`).

    tokens, labels: int[total] flat arrays of all documents; doc_lengths: int[d].
    """

    def __init__(self, tokens: np.ndarray, labels: np.ndarray, doc_lengths: np.ndarray,
                 max_seq_len: int, pad_id: int):
        if len(doc_lengths) and int(doc_lengths.max()) > max_seq_len:
            raise ValueError(f"a document of {int(doc_lengths.max())} tokens exceeds max_seq_len={max_seq_len}")
        self.max_seq_len, self.pad_id = max_seq_len, pad_id
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int32))
        self.labels = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int32))
        self.doc_lengths = torch.from_numpy(np.asarray(doc_lengths, dtype=np.int64))
        row_of_doc = greedy_pack(np.asarray(doc_lengths), max_seq_len)
        n_rows = int(row_of_doc[-1]) + 1 if len(row_of_doc) else 0
        docs_per_row = np.bincount(row_of_doc, minlength=n_rows)
        self._doc_start = np.concatenate([[0], np.cumsum(docs_per_row)])
        self._tok_start = np.concatenate([[0], np.cumsum(doc_lengths)])[self._doc_start]
        self.num_skipped = 0
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self._doc_start) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += len(self)
        t0, t1 = int(self._tok_start[i]), int(self._tok_start[i + 1])
        d0, d1 = int(self._doc_start[i]), int(self._doc_start[i + 1])
        return {"tokens": self.tokens[t0:t1].long(), "labels": self.labels[t0:t1].long(),
                "seq_lens": self.doc_lengths[d0:d1]}

    @property
    def num_documents(self) -> int:
        return len(self.doc_lengths)

    @property
    def efficiency(self) -> float:
        """Fraction of non-pad tokens over all rows of max_seq_len tokens."""
        return len(self.tokens) / max(1, len(self) * self.max_seq_len)

    def collate(self, batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Fixed-length batch with input_pos and block-causal mask (see
        :func:`~tunekit.data.collate.packed_collate`)."""
        return packed_collate(batch, self.pad_id, self.max_seq_len)


def _tokenize_range(dataset: SFTDataset, lo: int, hi: int, truncate_to: int | None,
                    skip_bad_rows: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Items lo..hi-1 as flat arrays (tokens int64, mask uint8, lengths int64) + skipped rows."""
    token_parts, mask_parts, lengths = [], [], []
    skipped = []
    for i in range(lo, hi):
        try:
            toks, mask = dataset.tokenize(i)
        except DataError as e:
            if not skip_bad_rows:
                raise
            skipped.append(str(e))
            continue
        n = len(toks) if truncate_to is None else min(len(toks), truncate_to)
        # One C-level conversion per example (np.fromiter / bytes(list) are the fastest ways from
        # Python lists; array.extend(list) is several times slower per element).
        token_parts.append(np.fromiter(toks, np.int64, n))
        mask_parts.append(bytes(n) if mask is None else bytes(mask[:n]))
        lengths.append(n)
    tokens = np.concatenate(token_parts) if token_parts else np.zeros(0, np.int64)
    mask = np.frombuffer(b"".join(mask_parts), np.uint8)
    return tokens, mask, np.asarray(lengths, dtype=np.int64), skipped


def tokenize_flat(dataset: SFTDataset, *, truncate_to: int | None = None, skip_bad_rows: bool = False,
                  num_workers: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Tokenize every item of ``dataset`` into flat arrays.

    Returns (tokens int64[n], labels int64[n], doc_lengths int64[d], skipped row messages). With
    ``truncate_to`` documents are cut before their labels are computed. ``num_workers > 1`` splits
    the items into contiguous ranges tokenized by forked processes (the parent takes the first),
    so the result is identical to ``num_workers=1``.
    """
    parts = map_ranges(lambda lo, hi: _tokenize_range(dataset, lo, hi, truncate_to, skip_bad_rows),
                       len(dataset), num_workers)
    tokens = np.concatenate([p[0] for p in parts])
    mask = np.concatenate([p[1] for p in parts]).astype(bool)
    lengths = np.concatenate([p[2] for p in parts])
    labels = shift_labels_flat(tokens, mask, np.cumsum(lengths))
    return tokens, labels, lengths, [s for p in parts for s in p[3]]


def pack_dataset(dataset: SFTDataset, max_seq_len: int, *, long_examples: str = "truncate",
                 skip_bad_rows: bool = False, num_workers: int = 1) -> PackedDataset:
    """Tokenize all of ``dataset`` (in ``num_workers`` processes) and pack it into rows of at most
    ``max_seq_len`` tokens."""
    if long_examples not in ("truncate", "split"):
        raise ValueError(f"long_examples must be 'truncate' or 'split', got {long_examples!r}")
    tokens, labels, lengths, skipped = tokenize_flat(
        dataset, truncate_to=max_seq_len if long_examples == "truncate" else None,
        skip_bad_rows=skip_bad_rows, num_workers=num_workers)
    if long_examples == "split":
        lengths = split_lengths(lengths, max_seq_len)
    packed = PackedDataset(tokens, labels, lengths, max_seq_len, dataset.tokenizer.pad_id)
    packed.skipped, packed.num_skipped = skipped, len(skipped)
    log_skipped(skipped, dataset.rows)
    logger.info("packed %d documents (%d tokens) into %d rows of %d: %.1f%% of tokens are not padding",
                packed.num_documents, len(tokens), len(packed), max_seq_len, 100 * packed.efficiency)
    return packed
