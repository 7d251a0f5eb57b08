"""Optimizer step time and optimizer-state memory on the bench-llama-tiny parameter set.

    PYTHONPATH=. python benchmarks/bench_optimizers.py [--steps 5] [--threads 2] [--no-torchao]

The parameters are those of the training benchmark's model (docs/benchmarks.md: Llama 3 shapes,
vocab 32000, 8 layers, dim 512, MLP 1536; 57,942,528 parameters), N(0, 0.02) values, random
N(0, 1e-3) gradients, lr 2e-5, weight decay 0.01, fused kernels where the optimizer has them.
In one run, side by side:

- step time (fastest of ``--steps`` after two warm-up steps) of ``torch.optim.AdamW`` and
  ``tunekit.training.optimizers.AdamW`` on fp32 parameters, and on bf16 parameters of torch's
  AdamW (rounds to nearest) and ours with each ``bf16_update``; ratios to torch's AdamW on the
  same parameters. The optimizer step is elementwise: the cost relative to a whole training
  step is this time over the recipe's step time (bench_train.py).
- optimizer-state bytes (every tensor in ``optimizer.state``, inner tensors of torchao's
  quantized states included) per parameter, for the above and torchao's ``AdamW8bit`` /
  ``AdamW4bit`` (with ``bf16_stochastic_round=True``, as the shipped 7B/8B full configs use it),
  and scaled to an 8B model. torchao's step is torch.compile'd per parameter shape on first use
  (its time is reported separately, ``first_step_s``; ``--no-torchao`` skips it).
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tunekit.models.decoder_lm import decoder_lm
from tunekit.training.cpu_allocator import keep_freed_cpu_memory
from tunekit.training.optimizers import AdamW

LR, WEIGHT_DECAY = 2e-5, 0.01


def bench_parameters(dtype: torch.dtype) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = decoder_lm(vocab_size=32_000, num_layers=8, num_heads=8, num_kv_heads=4, embed_dim=512,
                       intermediate_dim=1536, max_seq_len=2048)
    params = [p.detach().normal_(0.0, 0.02).to(dtype).requires_grad_() for p in model.parameters()]
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).mul_(1e-3).to(dtype)
    return params


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    def nbytes(t) -> int:
        if not torch.is_tensor(t):
            return 0
        if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):  # torchao's quantized states
            return sum(nbytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
        return t.numel() * t.element_size()
    return sum(nbytes(v) for state in optimizer.state.values() for v in state.values())


def interleaved_step_times(optimizers: dict, rounds: int) -> dict[str, float]:
    """Each optimizer's fastest step over ``rounds`` rounds (after one warm-up round); every round
    steps every optimizer once, in turn, so the neighbours' load on a shared machine falls on all
    of them alike, and the minimum is the cost of the work itself."""
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for round_ in range(rounds + 1):
        for name, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-torchao", action="store_true", help="skip torchao (its first step compiles for minutes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_cpu_memory()  # as the recipes do on the CPU: chunk temporaries reuse their pages
    # one parameter set per dtype, shared by the optimizers (each keeps its own state for it)
    fp32, bf16 = bench_parameters(torch.float32), bench_parameters(torch.bfloat16)
    n = sum(p.numel() for p in fp32)
    print(f"{n:,} parameters, {args.threads} threads, fastest of {args.steps} interleaved rounds")
    kw = {"lr": LR, "weight_decay": WEIGHT_DECAY, "fused": True}
    optimizers = {
        "fp32 torch.optim.AdamW": torch.optim.AdamW(fp32, **kw),
        "fp32 tunekit AdamW": AdamW(fp32, **kw),
        "bf16 torch.optim.AdamW (nearest)": torch.optim.AdamW(bf16, **kw),
        **{f"bf16 tunekit AdamW {mode}": AdamW(bf16, **kw, bf16_update=mode)
           for mode in ("stochastic_round", "fp32_master", "nearest")},
    }
    first_step = {}
    if not args.no_torchao:
        from torchao.optim import AdamW4bit, AdamW8bit

        for cls in (AdamW8bit, AdamW4bit):
            name = f"bf16 torchao.optim.{cls.__name__} (stochastic round)"
            optimizers[name] = cls(bf16, lr=LR, weight_decay=WEIGHT_DECAY, bf16_stochastic_round=True)
            start = time.perf_counter()
            optimizers[name].step()  # creates the quantized state; torch.compile's each parameter shape
            first_step[name] = round(time.perf_counter() - start, 1)
    seconds = interleaved_step_times(optimizers, args.steps)
    results = {}
    for name, optimizer in optimizers.items():
        base = "fp32 torch.optim.AdamW" if name.startswith("fp32") else "bf16 torch.optim.AdamW (nearest)"
        results[name] = {"step_s": round(seconds[name], 4), "vs_torch_same_dtype": round(seconds[name] / seconds[base], 2),
                         "state_bytes_per_param": round(state_bytes(optimizer) / n, 3)}
        if name in first_step:
            results[name]["first_step_s"] = first_step[name]
    width = max(map(len, results))
    print(f"{'optimizer':<{width}}  step (s)  x torch  state B/param  state GiB @ 8B params")
    for name, row in results.items():
        gib = row["state_bytes_per_param"] * 8e9 / 2 ** 30
        print(f"{name:<{width}}  {row['step_s']:8.3f}  {row['vs_torch_same_dtype']:6.2f}x  "
              f"{row['state_bytes_per_param']:13.3f}  {gib:8.1f}")
    print(json.dumps({"parameters": n, "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
