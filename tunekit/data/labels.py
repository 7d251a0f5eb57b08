"""Shifted labels: ``labels[i]`` is the target of the logits at position ``i`` (the next token)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CROSS_ENTROPY_IGNORE_INDEX = -100


def shift_labels(tokens: Sequence[int], mask: Sequence[bool]) -> list[int]:
    """``labels[i] = tokens[i + 1]`` unless token ``i + 1`` is masked (``mask`` True = not trained
    on); the last position has no next token and gets -100."""
    ignore = CROSS_ENTROPY_IGNORE_INDEX
    labels = [ignore if m else t for t, m in zip(tokens[1:], mask[1:])]
    labels.append(ignore)
    return labels


def shift_labels_flat(tokens: np.ndarray, mask: np.ndarray, doc_ends: np.ndarray) -> np.ndarray:
    """:func:`shift_labels` for many documents concatenated in one array, without a Python loop.

    tokens: int[n], mask: bool[n], doc_ends: int[d] exclusive end offset of each document.
    Returns int[n]; the last token of every document gets -100, never the next document's first.
    """
    labels = np.empty_like(tokens)
    labels[:-1] = tokens[1:]
    np.putmask(labels[:-1], mask[1:], CROSS_ENTROPY_IGNORE_INDEX)
    labels[-1:] = CROSS_ENTROPY_IGNORE_INDEX
    if len(doc_ends):
        labels[np.asarray(doc_ends) - 1] = CROSS_ENTROPY_IGNORE_INDEX
    return labels
