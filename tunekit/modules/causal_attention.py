"""Causal self-attention: PyTorch's SDPA, or on the CPU for short sequences a block-causal kernel.

Why a kernel of our own: on the CPU, SDPA's flash kernel runs its small per-block GEMMs at about
a third of the matmul peak and, for a 512-token row, computes the masked half of the scores too;
it took 20-28% of a bench-llama-tiny training step. Cut into query blocks of 64 rows, each block
only needs the keys up to its own end, and a handful of large batched matmuls (oneDNN/MKL) does
the work: forward + backward of the bench's attention (bf16, batch 4, 8 heads / 4 kv heads, 512
tokens, head dim 64) takes 56-61 ms of CPU time instead of 100-123 ms with one thread, 34 ms
instead of 52-57 ms wall clock with two (benchmarks/bench_attention.py).

The price is memory: the probabilities of each block are kept for backward (about
``batch * heads * seq^2`` bytes in bf16, where flash attention keeps ``O(seq)``: 9 MiB per layer
for the bench), and from 768 tokens SDPA's kernel catches up, so the kernel is used only up to
``MAX_SEQ_LEN`` tokens. Scores, softmax and the score gradients are computed in
fp32 (as flash attention does); probabilities and score gradients enter their matmuls in the
input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_SEQ_LEN = 512  # from 768 tokens SDPA's kernel takes 256-row query blocks and ours stops gaining
#                   (bench_attention.py: 0.96-1.17x at 768-1024 tokens with 2 threads); memory grows as seq^2
MAX_SCORES = 2**26  # batch * heads * seq^2 above this: SDPA. Keeps the saved probabilities (about half
#                   the scores, bf16) under ~64 MiB per layer; the bench has 2^23 scores
BLOCK = 64  # query rows per block: the fastest of 64/128/256 at 512 tokens on Zen 4


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of ``q [b, h, s, d]`` over ``k, v [b, kv_h, s, d]`` (``kv_h`` divides ``h``)
    -> ``[b, h, s, d]``, query ``i`` seeing keys ``0..i``."""
    if use_block_causal_kernel(q, k, v):
        return BlockCausalAttention.apply(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def use_block_causal_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The CPU kernel is used when autograd will need a backward (training), for CPU tensors of up to
    ``MAX_SEQ_LEN`` tokens and ``MAX_SCORES`` scores in fp32/bf16, outside ``torch.compile`` (which
    fuses SDPA itself).

    Without a backward (evaluation, generation) SDPA runs, so inference stays bit-identical to
    transformers' SDPA attention in bf16; our kernel rounds in other places (same accuracy).
    """
    b, h, s, _ = q.shape
    return (q.device.type == "cpu" and s <= MAX_SEQ_LEN and b * h * s * s <= MAX_SCORES
            and q.dtype in (torch.float32, torch.bfloat16)
            and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            and not torch.compiler.is_compiling())


class BlockCausalAttention(torch.autograd.Function):
    """Block-causal attention with the probabilities kept for backward (see the module docstring).

    forward(q [b, h, s, d], k [b, kv_h, s, d], v [b, kv_h, s, d], scale) -> [b, h, s, d]
    """

    @staticmethod
    def forward(ctx, q, k, v, scale):
        b, h, s, d = q.shape
        groups = h // k.shape[1]
        if groups > 1:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        q3, k3, v3 = q.reshape(b * h, s, d), k.reshape(b * h, s, d), v.reshape(b * h, s, d)
        q_scaled = q3.float() * scale  # not in place: for fp32 input q3 is q itself
        k_t = k3.float().transpose(1, 2).contiguous()  # [b*h, d, s]: a strided view runs the bmm 2.5x slower
        above_diagonal = torch.ones(BLOCK, BLOCK, dtype=torch.bool, device=q.device).triu_(1)
        diagonal_bias = torch.zeros(BLOCK, BLOCK, device=q.device).masked_fill_(above_diagonal, float("-inf"))
        probs, outs = [], []
        for start in range(0, s, BLOCK):
            end = min(start + BLOCK, s)
            scores = torch.bmm(q_scaled[:, start:end], k_t[:, :, :end])  # fp32 [b*h, rows, end]
            scores[:, :, start:] += diagonal_bias[:end - start, :end - start]
            p = torch.softmax(scores, dim=-1).to(q.dtype)
            probs.append(p)  # contiguous per block: its matmuls need no copy
            outs.append(torch.bmm(p, v3[:, :end]))
        out = torch.cat(outs, dim=1)
        ctx.save_for_backward(q3, k3, v3, out, *probs)
        ctx.shape, ctx.groups, ctx.scale = (b, h, s, d), groups, scale
        return out.view(b, h, s, d)

    @staticmethod
    def backward(ctx, grad_out):
        q3, k3, v3, out, *probs = ctx.saved_tensors
        b, h, s, d = ctx.shape
        grad_out = grad_out.reshape(b * h, s, d)
        grad_out32 = grad_out.float()
        # rowsum(dP * P) computed as rowsum(dO * O): one [s, d] product instead of [s, s]
        delta = (grad_out32 * out).sum(-1, keepdim=True)
        v_t = v3.float().transpose(1, 2).contiguous()
        grad_q = []
        grad_k = torch.zeros(b * h, s, d, device=q3.device)  # fp32 sums over the query blocks
        grad_v = torch.zeros(b * h, s, d, device=q3.device)
        for block, start in enumerate(range(0, s, BLOCK)):
            end = min(start + BLOCK, s)
            p = probs[block]
            # dS = P * (dP - delta); the softmax scale is applied to dQ and dK at the end
            grad_scores = torch.bmm(grad_out32[:, start:end], v_t[:, :, :end]).sub_(delta[:, start:end]).mul_(p)
            grad_scores = grad_scores.to(q3.dtype)
            grad_q.append(torch.bmm(grad_scores, k3[:, :end]))
            grad_k[:, :end] += torch.bmm(grad_scores.transpose(1, 2), q3[:, start:end])
            grad_v[:, :end] += torch.bmm(p.transpose(1, 2), grad_out[:, start:end])
        grad_q = torch.cat(grad_q, dim=1).mul_(ctx.scale).view(b, h, s, d)
        grad_k.mul_(ctx.scale)
        kv_heads = h // ctx.groups
        grad_k = grad_k.view(b, kv_heads, ctx.groups, s, d).sum(2).to(q3.dtype)
        grad_v = grad_v.view(b, kv_heads, ctx.groups, s, d).sum(2).to(q3.dtype)
        return grad_q, grad_k, grad_v, None
