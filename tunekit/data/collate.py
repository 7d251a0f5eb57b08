"""Collate functions: lists of examples -> batches following the Batch contract (docs/design.md).

Unpacked rows are right-padded (``pad_id`` tokens, -100 labels) and need no mask (plain causal).
Packed rows carry per-document ``input_pos`` and a block-causal ``mask``, built by the mask
functions of ``tunekit.modules.masks`` that the attention consumes (one definition of the mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence

from tunekit.data.labels import CROSS_ENTROPY_IGNORE_INDEX
from tunekit.modules.masks import block_causal_mask, document_ids_from_seq_lens, document_positions


def _long(x: Any) -> torch.Tensor:
    return x.long() if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.long)


def _pad_right(seqs: list[torch.Tensor], value: int, length: int) -> torch.Tensor:
    out = pad_sequence(seqs, batch_first=True, padding_value=value)
    if out.shape[1] < length:
        out = torch.nn.functional.pad(out, (0, length - out.shape[1]), value=value)
    return out


def padded_collate(batch: Sequence[dict[str, Any]], pad_id: int, pad_to_multiple_of: int = 1
                   ) -> dict[str, torch.Tensor]:
    """Right-pad ``{"tokens", "labels"}`` examples to the longest one.

    Returns ``tokens``/``labels``: LongTensor[b, s] (s rounded up to ``pad_to_multiple_of``).
    """
    tokens = [_long(ex["tokens"]) for ex in batch]
    labels = [_long(ex["labels"]) for ex in batch]
    longest = max(len(t) for t in tokens)
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return {"tokens": _pad_right(tokens, pad_id, length),
            "labels": _pad_right(labels, CROSS_ENTROPY_IGNORE_INDEX, length)}


def packed_collate(batch: Sequence[dict[str, Any]], pad_id: int, seq_len: int
                   ) -> dict[str, torch.Tensor]:
    """Packed rows ``{"tokens", "labels", "seq_lens"}`` -> a fixed-length batch.

    Returns tokens/labels/input_pos: LongTensor[b, seq_len] and mask: BoolTensor[b, seq_len,
    seq_len]. Padding at the end of a row forms its own causal block (so no row of the mask is all
    False) with positions restarting at 0; its labels are -100.
    """
    doc_ids = document_ids_from_seq_lens([_long(ex["seq_lens"]).tolist() for ex in batch], seq_len)
    return {
        "tokens": _pad_right([_long(ex["tokens"]) for ex in batch], pad_id, seq_len),
        "labels": _pad_right([_long(ex["labels"]) for ex in batch], CROSS_ENTROPY_IGNORE_INDEX, seq_len),
        "input_pos": document_positions(doc_ids),
        "mask": block_causal_mask(doc_ids),
    }
