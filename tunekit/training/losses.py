"""Cross-entropy for causal LM training, computed chunk by chunk in fp32.

Both functions return the SUM of token losses over labels != -100; the recipe divides by the
number of such labels across all accumulated micro-batches (and ranks), the Batch contract of
docs/design.md. Summing instead of averaging per micro-batch is what makes gradient
accumulation of 4 x 1 equal a batch of 4.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The Batch contract's tunekit.data.CROSS_ENTROPY_IGNORE_INDEX (a test checks they agree); not
# imported so that the training helpers do not pull in the whole data package.
IGNORE_INDEX = -100


def chunked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, num_chunks: int = 8,
                          ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of token cross-entropies.

    Args:
        logits: [b, s, vocab] in any float dtype (bf16 logits are upcast one chunk at a time, so
            no full fp32 copy of [b, s, vocab] is ever held).
        labels: [b, s], already shifted; ``ignore_index`` marks positions without a loss.
        num_chunks: pieces the sequence dimension is cut into.

    Returns a float32 scalar.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"chunked_cross_entropy: logits {list(logits.shape)} do not match labels {list(labels.shape)}")
    total = logits.new_zeros((), dtype=torch.float32)
    for logit_chunk, label_chunk in zip(logits.chunk(num_chunks, dim=1), labels.chunk(num_chunks, dim=1)):
        total = total + F.cross_entropy(logit_chunk.reshape(-1, logit_chunk.shape[-1]).float(),
                                        label_chunk.reshape(-1), ignore_index=ignore_index, reduction="sum")
    return total


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, num_chunks: int = 8,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of token cross-entropies of ``hidden @ weight.T`` without materialising full logits.

    Only the positions with a label are projected, one chunk at a time, and each chunk's fp32
    logits are recomputed in backward (checkpointed) instead of being kept alive: peak memory
    is one chunk's [tokens, vocab] instead of [b, s, vocab].

    Args:
        hidden: [b, s, dim], the final-norm output.
        weight: [vocab, dim], the output projection (or the tied token embedding).
        labels: [b, s], already shifted.
    Returns a float32 scalar.
    """
    keep = labels.reshape(-1) != ignore_index
    h = hidden.reshape(-1, hidden.shape[-1])[keep]
    y = labels.reshape(-1)[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for h_chunk, y_chunk in zip(h.chunk(num_chunks), y.chunk(num_chunks)):
        total = total + torch.utils.checkpoint.checkpoint(_project_and_ce, h_chunk, weight, y_chunk,
                                                          use_reentrant=False)
    return total


def _project_and_ce(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((h @ weight.t()).float(), y, reduction="sum")


def count_label_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Number of positions of ``labels`` [b, s] that carry a loss."""
    return int((labels != ignore_index).sum())
