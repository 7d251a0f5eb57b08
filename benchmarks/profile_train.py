"""Where a training step of the bench-llama-tiny workload spends its time (torch.profiler).

    python benchmarks/profile_train.py --kind lora --dtype bf16 [--steps 6] [--rows 25]

Builds the same model, data and optimizer as benchmarks/bench_train.py (in this process, with
the recipes' own building blocks: ``from_hf``, ``apply_lora`` and the recipe's ``train_step``), runs a few
warm-up steps, then profiles ``--steps`` steps and prints (1) the wall time of forward, backward
and optimizer phases (median over the steps) and (2) the profiler's op table sorted by self CPU
time. The op table lists where the time goes beyond the matmuls (``aten::mm``/``addmm``/``bmm``).
"""

from __future__ import annotations

import argparse
import runpy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402  (the workload's constants and checkpoint writer)


def build(kind: str, dtype: torch.dtype, checkpoint_dir: Path, activation_checkpointing: bool, fused_adamw: bool):
    from tunekit.models import from_hf
    from tunekit.modules.peft import apply_lora
    from tunekit.training.activation_checkpointing import apply_activation_checkpointing

    model = from_hf(checkpoint_dir, dtype=dtype, device="cpu")
    if kind == "lora":
        lora = bench_train.LORA
        apply_lora(model, lora["targets"], rank=lora["rank"], alpha=lora["alpha"], dropout=0.0)
    else:
        model.requires_grad_(True)
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=bench_train.LR[kind], weight_decay=0.0, fused=fused_adamw or None)
    return model, trainable, optimizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=("lora", "full"), default="lora")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) (optimizer.fused=true in a config)")
    p.add_argument("--checkpoint-dir", default=None, help="reuse a bench checkpoint folder")
    args = p.parse_args(argv)

    from tunekit.data.synthetic import RandomTokenDataset
    from tunekit.training.cpu_allocator import keep_freed_cpu_memory
    from tunekit.training.lr_schedules import constant_with_warmup
    from omegaconf import OmegaConf

    from tunekit.config.catalog import find_recipe

    recipe_file = find_recipe("lora_finetune_single_device" if args.kind == "lora" else "full_finetune_single_device")
    recipe = runpy.run_path(str(recipe_file), run_name="profiled_recipe")  # the recipe's own train_step

    torch.set_num_threads(args.threads)
    keep_freed_cpu_memory()  # as the recipes do on the CPU
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    checkpoint_dir = Path(args.checkpoint_dir or tempfile.mkdtemp(prefix="tunekit_profile_"))
    if not (checkpoint_dir / "model.safetensors").is_file():
        bench_train.write_checkpoint(checkpoint_dir)
    model, trainable, optimizer = build(args.kind, dtype, checkpoint_dir, args.activation_checkpointing,
                                       args.fused_adamw)
    scheduler = constant_with_warmup(optimizer, num_warmup_steps=0)
    data = RandomTokenDataset(vocab_size=bench_train.VOCAB, seq_len=bench_train.SEQ_LEN,
                              num_samples=bench_train.BATCH * (args.steps + args.warmup))
    batches = [data.collate([data[i * bench_train.BATCH + j] for j in range(bench_train.BATCH)])
               for i in range(args.steps + args.warmup)]
    cfg = OmegaConf.create({"activation_offloading": False, "max_grad_norm": 1.0, "output_dir": str(checkpoint_dir)})
    extra = {"trainable": trainable} if args.kind == "lora" else {}

    def step(batch):
        recipe["train_step"](cfg, model, [batch], optimizer=optimizer, lr_scheduler=scheduler,
                             device=torch.device("cpu"), step=0, epoch=0, **extra)
    for batch in batches[:args.warmup]:
        step(batch)
    wall, cpu = [time.perf_counter()], [time.process_time()]
    for batch in batches[args.warmup:]:
        step(batch)
        wall.append(time.perf_counter())
        cpu.append(time.process_time())
    seconds = [b - a for a, b in zip(wall, wall[1:])]
    cpu_seconds = [b - a for a, b in zip(cpu, cpu[1:])]
    print(f"unprofiled step: median {statistics.median(seconds):.3f} s wall, {statistics.median(cpu_seconds):.3f} s "
          f"CPU over {len(seconds)} steps ({[round(s, 3) for s in seconds]})")
    # CPU time is what the step costs this process whatever else runs on the machine; with one
    # thread (no spinning thread pool) it gives an MFU that outside load barely moves.
    peak_cpu = bench_train.matmul_peak(dtype, args.threads, clock=time.process_time)
    flops = bench_train.flops_per_token(args.kind) * bench_train.BATCH * bench_train.SEQ_LEN
    print(f"CPU-time MFU: {100 * flops / statistics.median(cpu_seconds) / peak_cpu:.1f}% "
          f"({flops / statistics.median(cpu_seconds) / 1e9:.1f} GFLOP per CPU-second; 2048^3 matmul "
          f"{peak_cpu / 1e9:.1f} GFLOP per CPU-second){'' if args.threads == 1 else ' (meaningful with --threads 1)'}")

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for batch in batches[args.warmup:]:
            with record_function("## step"):
                step(batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"profiled: {total / 1e6 / args.steps:.3f} s of self CPU time per step")
    print(f"{'op':45s} {'ms/step':>9s} {'share':>7s} {'calls/step':>10s}")
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.rows]:
        print(f"{e.key[:45]:45s} {e.self_cpu_time_total / 1e3 / args.steps:9.1f} "
              f"{100 * e.self_cpu_time_total / total:6.1f}% {e.count / args.steps:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
