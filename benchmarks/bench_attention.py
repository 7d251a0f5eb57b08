"""Causal attention forward + backward on the CPU: PyTorch's SDPA flash kernel vs tunekit's
block-causal kernel (tunekit/modules/causal_attention.py).

    python benchmarks/bench_attention.py [--threads 1] [--dtype bf16] [--repeats 10]

Prints, per shape, the median time of forward + backward for each implementation (wall clock
and process CPU time), the speed-up, and the achieved FLOP/s counting the causal half of the
score matrix (forward 2 matmuls, backward 4, each 2*s*s*d/2 multiply-adds per head); ends with
one JSON line. The first shape is bench-llama-tiny's attention (batch 4, 8 heads / 4 kv heads,
512 tokens, head dim 64).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from tunekit.modules.causal_attention import BlockCausalAttention
from tunekit.training.cpu_allocator import keep_freed_cpu_memory

SHAPES = [  # batch, heads, kv heads, tokens, head dim
    (4, 8, 4, 512, 64),
    (4, 8, 4, 256, 64),
    (2, 14, 2, 512, 64),   # Qwen2.5-0.5B heads
    (1, 32, 8, 512, 128),  # Llama 3 8B heads
    (1, 16, 8, 768, 64),
    (1, 16, 8, 1024, 64),  # longer than the kernel's limit: shown for the trend
    (1, 32, 8, 1024, 128),
]


def sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def time_fwd_bwd(fn, q, k, v, grad_out, repeats: int) -> tuple[float, float]:
    """Median (wall seconds, CPU seconds) of one forward + backward."""
    wall, cpu = [], []
    for i in range(repeats + 2):
        q.grad = k.grad = v.grad = None
        w0, c0 = time.perf_counter(), time.process_time()
        fn(q, k, v, q.shape[-1] ** -0.5).backward(grad_out)
        if i >= 2:
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_cpu_memory()  # as the recipes do
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    results = []
    print(f"{'b h kv s d':>20s} {'sdpa ms':>9s} {'ours ms':>9s} {'speed-up':>8s} {'ours GFLOP/s':>12s}  (wall; CPU ms)")
    for b, h, kv, s, d in SHAPES:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(b, h, s, d, generator=g).to(dtype).requires_grad_()
        k, v = (torch.randn(b, kv, s, d, generator=g).to(dtype).requires_grad_() for _ in range(2))
        grad_out = torch.randn(b, h, s, d, generator=g).to(dtype)
        base = time_fwd_bwd(sdpa, q, k, v, grad_out, args.repeats)
        ours = time_fwd_bwd(BlockCausalAttention.apply, q, k, v, grad_out, args.repeats)
        flops = 6 * 2 * b * h * s * s * d / 2
        row = {"shape": [b, h, kv, s, d], "sdpa_ms": round(base[0] * 1e3, 1), "ours_ms": round(ours[0] * 1e3, 1),
               "sdpa_cpu_ms": round(base[1] * 1e3, 1), "ours_cpu_ms": round(ours[1] * 1e3, 1),
               "speedup": round(base[0] / ours[0], 2)}
        results.append(row)
        print(f"{str((b, h, kv, s, d)):>20s} {row['sdpa_ms']:9.1f} {row['ours_ms']:9.1f} {row['speedup']:7.2f}x "
              f"{flops / ours[0] / 1e9:12.1f}  ({row['sdpa_cpu_ms']}; {row['ours_cpu_ms']})")
    print(json.dumps({"threads": args.threads, "dtype": args.dtype, "results": results}))


if __name__ == "__main__":
    main()
