"""Cross-entropy for causal LM training, computed chunk by chunk in fp32.

``linear_cross_entropy`` (the output projection fused with the loss; what
``TransformerDecoder(..., labels=...)`` uses) is the fast path; ``chunked_cross_entropy`` takes
ready logits from any model. Both return the SUM of token losses over labels != -100; the
recipe divides by the number of such labels across all accumulated micro-batches (and ranks), the Batch contract of
docs/design.md. Summing instead of averaging per micro-batch is what makes gradient
accumulation of 4 x 1 equal a batch of 4.

``TransformerDecoder`` computes it inside its forward (so that wrappers such as FSDP2 see the
output weight used there); ``linear_token_log_probs`` is the per-token form preference and RL
losses start from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The Batch contract's tunekit.data.CROSS_ENTROPY_IGNORE_INDEX (a test checks they agree); not
# imported so that the losses do not pull in the whole data package.
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


# Rows of hidden states projected at once by linear_cross_entropy: a chunk's fp32 logits are
# about LOGIT_CHUNK_ELEMENTS * 4 bytes (32 MiB), which stays in a server CPU's L3 cache and is
# the matmul shape that runs fastest on the 2-core bench machine (docs/benchmarks.md).
LOGIT_CHUNK_ELEMENTS = 2**23


_SMALLEST_EXACT_PROB = 1e-30  # fp32 numbers below ~1.2e-38 lose precision; keep a margin


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         num_chunks: int | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of token cross-entropies of ``hidden @ weight.T`` without materialising the logits.

    Only positions with a label are projected, a chunk of rows at a time; each chunk's logits
    (in the weight dtype, as a plain ``nn.Linear`` would give) go through an fp32 softmax, and
    while the chunk is in cache its gradient (softmax - one-hot) is turned into the gradient of
    ``hidden`` at once, so neither [b, s, vocab] logits nor their fp32 copies are ever held. For a
    trainable ``weight`` the chunks' logit gradients are kept (in the weight dtype, like the
    gradient of full logits would be) for one weight-gradient matmul in backward.

    Args:
        hidden: [b, s, dim] (or [n, dim]), the final-norm output.
        weight: [vocab, dim], the output projection (or the tied token embedding).
        labels: [b, s] (or [n]), already shifted; ``ignore_index`` marks positions without a loss.
        num_chunks: pieces the labelled rows are cut into (default: chunks of about 2^23 logits).
    Returns a float32 scalar.
    """
    h, y, _ = _labelled_rows(hidden, labels, ignore_index, "linear_cross_entropy")
    grad_enabled = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(h, weight, y, _rows_per_chunk(h, weight, num_chunks),
                                     grad_enabled and h.requires_grad, grad_enabled and weight.requires_grad)


def linear_token_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           num_chunks: int | None = None, ignore_index: int = IGNORE_INDEX
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``log p(label)`` of ``hidden @ weight.T`` without materialising the logits: what
    preference and RL losses need (a sum of log-probs per completion), by the same chunked, fused
    projection as :func:`linear_cross_entropy`, with a gradient per token.

    Args:
        hidden: [b, s, dim]; weight: [vocab, dim]; labels: [b, s], already shifted,
            ``ignore_index`` marks positions without a label.
        num_chunks: as in :func:`linear_cross_entropy`.
    Returns ``(log_probs, logit_means)``, both float32 [b, s] and 0 where there is no label:
    ``log_probs`` carries the gradient; ``logit_means`` is the mean over the vocabulary of each
    labelled position's logits (no gradient; TRL's ``logits/chosen`` metric is their mean), from
    one matrix-vector product with the vocabulary-mean of ``weight``.
    """
    h, y, index = _labelled_rows(hidden, labels, ignore_index, "linear_token_log_probs")
    grad_enabled = torch.is_grad_enabled()
    nll = _LinearTokenNLL.apply(h, weight, y, _rows_per_chunk(h, weight, num_chunks),
                                grad_enabled and h.requires_grad, grad_enabled and weight.requires_grad)
    with torch.no_grad():
        means = (h @ weight.mean(0, dtype=torch.float32).to(h.dtype)).float()
    shape = labels.shape
    if index is None:
        return -nll.view(shape), means.view(shape)
    log_probs = nll.new_zeros(labels.numel()).index_put((index,), -nll).view(shape)
    return log_probs, means.new_zeros(labels.numel()).index_put_((index,), means).view(shape)


def _labelled_rows(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int, caller: str
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """hidden [.., d] / labels [..] -> the rows with a label ([n, d], [n]) and their flat index
    (None when every position has one)."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"{caller}: hidden {list(hidden.shape)} does not match labels {list(labels.shape)}")
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    keep = y != ignore_index
    if bool(keep.all()):
        return h, y, None
    index = keep.nonzero().squeeze(1)
    return h.index_select(0, index), y.index_select(0, index), index


def _rows_per_chunk(h: torch.Tensor, weight: torch.Tensor, num_chunks: int | None) -> int:
    if num_chunks is not None:
        return max(1, -(-h.shape[0] // num_chunks))
    return max(1, LOGIT_CHUNK_ELEMENTS // weight.shape[0])


def _fused_forward(hidden, weight, labels, rows, need_hidden_grad, need_weight_grad):
    """The chunk loop shared by the fused functions: (-log p_y [n] fp32, d(-log p_y)/d hidden
    [n, d] or None, d(-log p_y)/d logits [n, V] in the weight dtype or None), for each row on its own."""
    label_probs = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
    grad_logits = hidden.new_empty(hidden.shape[0], weight.shape[0]) if need_weight_grad else None
    for start in range(0, hidden.shape[0], rows):
        h, y = hidden[start:start + rows], labels[start:start + rows]
        # softmax rather than log-softmax: its probabilities are the gradient (no second exp
        # pass over the chunk), and the loss comes from p_y (below)
        probs = torch.softmax(h @ weight.t(), dim=-1, dtype=torch.float32)
        p_y = probs.gather(1, y[:, None]).squeeze(1)
        label_probs[start:start + rows] = p_y
        if not (need_hidden_grad or need_weight_grad):
            continue
        # d(-log p_y)/d logits = softmax - one_hot(y), kept in the weight dtype
        if grad_logits is not None:
            g = grad_logits[start:start + rows]
            g.copy_(probs)
        else:
            g = probs.to(hidden.dtype)  # no copy in fp32
        g[torch.arange(len(y), device=y.device), y] = (p_y - 1.0).to(g.dtype)
        if grad_hidden is not None:
            torch.mm(g, weight, out=grad_hidden[start:start + rows])
    # log(p_y) is as exact as the log-softmax while p_y is a normal fp32 number; rows where it
    # is not (a loss above ~69 nats) are projected again for their log-softmax. Checked once
    # after the loop: one host sync per call, not one per chunk.
    logp_y = label_probs.log()
    tiny = (label_probs < _SMALLEST_EXACT_PROB).nonzero().squeeze(1)
    if len(tiny):
        logp = torch.log_softmax(hidden[tiny] @ weight.t(), dim=-1, dtype=torch.float32)
        logp_y[tiny] = logp.gather(1, labels[tiny, None]).squeeze(1)
    return -logp_y, grad_hidden, grad_logits


class _LinearCrossEntropy(torch.autograd.Function):
    """hidden [n, d], weight [V, d], labels [n] (all valid) -> summed cross-entropy (fp32)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, rows, need_hidden_grad, need_weight_grad):
        nll, grad_hidden, grad_logits = _fused_forward(hidden, weight, labels, rows, need_hidden_grad,
                                                       need_weight_grad)
        ctx.save_for_backward(grad_hidden, grad_logits, hidden if need_weight_grad else None)
        return nll.sum()

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_logits, hidden = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(grad_hidden.dtype)
        grad_weight = None
        if grad_logits is not None:
            grad_weight = (grad_logits.t() @ hidden) * grad_output.to(grad_logits.dtype)
        return grad_hidden, grad_weight, None, None, None, None


class _LinearTokenNLL(torch.autograd.Function):
    """hidden [n, d], weight [V, d], labels [n] (all valid) -> -log p_y per row [n] (fp32). Each
    row's gradient is its own precomputed one scaled by that row's incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, rows, need_hidden_grad, need_weight_grad):
        nll, grad_hidden, grad_logits = _fused_forward(hidden, weight, labels, rows, need_hidden_grad,
                                                       need_weight_grad)
        ctx.save_for_backward(grad_hidden, grad_logits, hidden if need_weight_grad else None)
        return nll

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_logits, hidden = ctx.saved_tensors
        scale = grad_output[:, None]
        if grad_hidden is not None:
            grad_hidden = grad_hidden * scale.to(grad_hidden.dtype)
        grad_weight = None
        if grad_logits is not None:  # scale the [n, d] rows, not the [n, V] logit gradients
            grad_weight = grad_logits.t() @ (hidden * scale.to(hidden.dtype))
        return grad_hidden, grad_weight, None, None, None, None


def count_label_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Number of positions of ``labels`` [b, s] that carry a loss."""
    return int((labels != ignore_index).sum())
