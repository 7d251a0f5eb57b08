"""Training throughput of the real recipes on the bench-llama-tiny workload: tokens/s, MFU, peak RSS.

    python benchmarks/bench_train.py --recipe lora_finetune_single_device --dtype bf16 --steps 20
    python benchmarks/bench_train.py --recipe full_finetune_single_device --dtype fp32
    python benchmarks/bench_train.py --recipe lora_finetune_distributed --nproc 2
    python benchmarks/bench_train.py --recipe lora_dpo_single_device [--precompute-reference] [--packed]

The workload (docs/benchmarks.md): a random-init (seed 0) Llama 3 architecture with vocab 32000,
8 layers, 8 heads / 4 kv heads, dim 512, MLP 1536 (57,942,528 parameters), uniform random token
sequences of exactly 512 tokens, batch 4 (2048 tokens per optimizer step, no accumulation),
AdamW at a constant lr (3e-4 LoRA, 2e-5 full), LoRA rank 8 / alpha 16 / dropout 0 on q, k, v and
output projections, 2 threads. The DPO workload (shared/bench-llama-tiny-dpo.md): 4 pairs per step
of a 256-token prompt and two 256-token completions (two 512-token sequences per pair, 4,096
tokens through the policy), DPO ``sigmoid`` with beta 0.1, lr 5e-6, the reference the base with
the adapters off (``--precompute-reference``: its log-probs computed before the timed steps);
``--packed`` lays each pair out with its prompt once (3 x 256 tokens per pair, one pair per row).

Nothing of the training loop is re-implemented here: the model is written as an HF checkpoint
folder, and the recipe runs in a child process through the real CLI (``tunekit run <recipe>
--config tiny/lora|tiny/full <overrides>``; with ``--nproc N``, ``tunekit run --nproc_per_node N``)
with the synthetic dataset component ``tunekit.data.synthetic.random_token_dataset``. Step times
are the wall-clock gaps between the rows of ``<output_dir>/logs/metrics.jsonl`` (data loading and
logging included). In the same run this script measures the 2048^3 matmul peak of the same
dtype with 2 threads (before and after training; the higher one is the MFU denominator), the
peak RSS of each training process (until the last step is logged, i.e. without the final
checkpoint save) and the CPU time other processes used meanwhile.
Ends with one JSON line: tokens_per_second, mfu, peak_rss_mib, ...
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VOCAB, LAYERS, HEADS, KV_HEADS, DIM, HIDDEN, MAX_SEQ_LEN = 32_000, 8, 8, 4, 512, 1536, 2048
SEQ_LEN, BATCH = 512, 4
PARAMS, NON_EMBEDDING_PARAMS = 57_942_528, 41_558_528  # bench-llama-tiny.md
LORA = {"rank": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "output_proj"]}
LR = {"lora": 3e-4, "full": 2e-5, "dpo": 5e-6}
PROMPT_LEN = COMPLETION_LEN = 256  # bench-llama-tiny-dpo.md
MATMUL_N = 2048
HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": DIM,
    "intermediate_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS, "head_dim": DIM // HEADS, "max_position_embeddings": MAX_SEQ_LEN,
    "rms_norm_eps": 1e-5, "rope_parameters": {"rope_type": "default", "rope_theta": 500_000.0},
    "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
    "bos_token_id": 1, "eos_token_id": 2,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="lora_finetune_single_device",
                   help="lora_* or full_* recipe name (a *_distributed one with --nproc > 1)")
    p.add_argument("--config", default=None, help="config to start from (default tiny/lora or tiny/full)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    p.add_argument("--threads", type=int, default=2, help="torch threads in total (split over ranks)")
    p.add_argument("--nproc", type=int, default=1, help="ranks, launched with tunekit run --nproc_per_node")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--keep", metavar="DIR", default=None, help="keep the checkpoint and run folders in DIR")
    p.add_argument("--precompute-reference", action="store_true",
                   help="DPO recipes: reference log-probs computed once before training")
    p.add_argument("--packed", action="store_true", help="DPO recipes: pairs in the packed shared-prompt layout")
    p.add_argument("overrides", nargs="*", help="extra recipe key=value overrides (e.g. activation_checkpointing=true)")
    args = p.parse_args(argv)
    if args.steps <= args.warmup + 1:
        p.error(f"--steps must be larger than --warmup + 1 ({args.warmup + 1})")
    if args.nproc < 1 or BATCH % args.nproc:
        p.error(f"--nproc must divide the global batch {BATCH}")
    if args.nproc > 1 and not args.recipe.endswith("_distributed"):
        p.error(f"--nproc {args.nproc} needs a *_distributed recipe, got {args.recipe}")
    if not args.recipe.startswith(("lora_", "full_")):
        p.error(f"--recipe must be a lora_* or full_* recipe, got {args.recipe}")
    return args


def is_dpo(recipe: str) -> bool:
    return "_dpo_" in recipe


def tokens_per_step(recipe: str) -> int:
    """Tokens through the policy per optimizer step (counted as the workloads define them: a DPO
    pair is two full 512-token sequences, also in the packed layout, which computes fewer)."""
    return BATCH * 2 * (PROMPT_LEN + COMPLETION_LEN) if is_dpo(recipe) else BATCH * SEQ_LEN


def dpo_flops_per_token(live_reference: bool) -> float:
    """bench-llama-tiny-dpo.md: the LoRA policy's 4N + adapters + attention per token, plus, with a
    live reference, its forward: 2N + 4 L d s."""
    reference = 2 * NON_EMBEDDING_PARAMS + 4 * LAYERS * DIM * SEQ_LEN if live_reference else 0
    return flops_per_token("lora") + reference


def flops_per_token(kind: str) -> float:
    """bench-llama-tiny.md: full 6N + 12 L d s; LoRA 4N (forward + input gradients of the frozen
    weights) + 6 x adapter parameters + the same attention term (N = non-embedding parameters
    including the output projection)."""
    attention = 12 * LAYERS * DIM * SEQ_LEN
    if kind == "full":
        return 6 * NON_EMBEDDING_PARAMS + attention
    head_dim = DIM // HEADS
    out_dims = {"q_proj": HEADS * head_dim, "k_proj": KV_HEADS * head_dim, "v_proj": KV_HEADS * head_dim,
                "output_proj": DIM}
    lora_params = LAYERS * sum(LORA["rank"] * (DIM + out_dims[t]) for t in LORA["targets"])
    return 4 * NON_EMBEDDING_PARAMS + 6 * lora_params + attention


def matmul_peak(dtype: torch.dtype, threads: int, repeats: int = 10, clock=time.perf_counter) -> float:
    """Best FLOP/s of a 2048^3 matmul in ``dtype`` with ``threads`` threads (FLOP per CPU-second
    with ``clock=time.process_time``)."""
    torch.set_num_threads(threads)
    a = torch.randn(MATMUL_N, MATMUL_N).to(dtype)
    b = torch.randn(MATMUL_N, MATMUL_N).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        a @ b
        best = min(best, clock() - start)
    return 2 * MATMUL_N**3 / best


def write_checkpoint(folder: Path) -> None:
    """The bench model, random init with seed 0, as an fp32 HF checkpoint folder (tokenizer files
    from the shipped tiny_llama asset: the recipes build a tokenizer even for token-id data)."""
    from tunekit.checkpoint.hf_checkpoint import save_hf_checkpoint
    from tunekit.config.resolvers import asset_path
    from tunekit.models.from_hf import build_from_hf_config

    torch.manual_seed(0)
    model = build_from_hf_config(HF_CONFIG, device="cpu")
    total = sum(p.numel() for p in model.parameters())
    if total != PARAMS:
        raise SystemExit(f"bench model has {total:,} parameters, bench-llama-tiny.md says {PARAMS:,}")
    save_hf_checkpoint(model.state_dict(), folder, hf_config=HF_CONFIG, source_dir=asset_path("tiny_llama"))


def recipe_overrides(args: argparse.Namespace, kind: str, checkpoint_dir: Path, output_dir: Path) -> list[str]:
    dataset = ("{_component_: tunekit.data.synthetic.random_token_dataset, "
               f"vocab_size: {VOCAB}, seq_len: {SEQ_LEN}, num_samples: {args.steps * BATCH}, seed: 0}}")
    if is_dpo(args.recipe):
        # rows of one pair (768 tokens), what dataset.max_seq_len: 768 gives: longer rows put
        # several pairs under one dense mask, whose attention grows with the row length squared
        packed = f", packed_len: {PROMPT_LEN + 2 * COMPLETION_LEN}" if args.packed else ""
        dataset = ("{_component_: tunekit.data.synthetic.random_preference_dataset, "
                   f"vocab_size: {VOCAB}, prompt_len: {PROMPT_LEN}, completion_len: {COMPLETION_LEN}, "
                   f"num_pairs: {args.steps * BATCH}, seed: 0{packed}}}")
    never = 10 * args.steps  # eval and checkpoints only at the end (after the timed steps)
    overrides = [
        f"checkpoint_dir={checkpoint_dir}", f"output_dir={output_dir}", "device=cpu", f"dtype={args.dtype}",
        "seed=0", "resume=false", f"dataset={dataset}", "val_dataset=null", "forget_dataset=null",
        "shuffle=false", "num_workers=0", f"batch_size={BATCH // args.nproc}", "gradient_accumulation_steps=1",
        "epochs=1", f"max_steps={args.steps}", f"optimizer.lr={LR['dpo' if is_dpo(args.recipe) else kind]}",
        "optimizer.weight_decay=0.0",
        "lr_scheduler=tunekit.training.lr_schedules.constant_with_warmup", "lr_scheduler.num_warmup_steps=0",
        f"activation_checkpointing={str(args.activation_checkpointing).lower()}",
        f"compile={str(args.compile).lower()}", f"eval_every_n_steps={never}", f"save_every_n_steps={never}",
        "activation_offloading=false", "keep_last_n=1", "log_every_n_steps=1", "metric_logging.tensorboard=false",
        "metric_logging.progress_bar=false",  # stdout and metrics.jsonl (read for step times) stay on
    ]
    if is_dpo(args.recipe):
        overrides += ["loss.loss_type=sigmoid", "loss.beta=0.1", "loss.label_smoothing=0.0",
                      f"precompute_reference={str(args.precompute_reference).lower()}",
                      f"reference_cache_dir={output_dir / 'reference_logps'}"]
    if kind == "lora":
        overrides += [f"lora.targets=[{','.join(LORA['targets'])}]", f"lora.rank={LORA['rank']}",
                      f"lora.alpha={LORA['alpha']}", "lora.dropout=0.0", "lora.use_dora=false",
                      "lora.quantize_base=false"]
    return overrides + list(args.overrides)


def _busy_jiffies() -> int:
    """CPU time (clock ticks) spent by all processes, from /proc/stat (0 where unavailable)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return user + nice + system + irq + softirq + steal


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            out += children
            todo += children
    return out


def _rank_and_hwm(pid: int) -> tuple[int, int] | None:
    """(rank, peak RSS in KiB) of a training process (one with LOCAL_RANK in its environment
    under torchrun); None for launchers and processes already gone."""
    try:
        env = dict(e.split("=", 1) for e in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in e)
        if "LOCAL_RANK" not in env:
            return None
        status = Path(f"/proc/{pid}/status").read_text()
    except (OSError, ValueError):
        return None
    hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
    return int(env.get("RANK", env["LOCAL_RANK"])), hwm


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip().endswith("}")]


def run_recipe(args: argparse.Namespace, overrides: list[str], output_dir: Path, config: str) -> dict:
    """Run the recipe in a child process; return its metric rows, per-rank peak RSS during the
    training steps (KiB), the whole run's peak RSS (KiB) and outside CPU use."""
    threads_per_rank = max(1, args.threads // args.nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_rank), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", "from tunekit.cli.main import main; raise SystemExit(main())", "run"]
    if args.nproc > 1:
        cmd += ["--nproc_per_node", str(args.nproc), "--standalone"]
    else:
        env["LOCAL_RANK"], env["RANK"] = "0", "0"  # marks the training process for the RSS poll
    cmd += [args.recipe, "--config", config, *overrides]
    print("$ tunekit " + " ".join(cmd[4:]), flush=True)
    log_path = output_dir.parent / "recipe.log"
    metrics_path = output_dir / "logs" / "metrics.jsonl"
    busy0, own0, wall0 = _busy_jiffies(), os.times(), time.monotonic()
    hwm_training: dict[int, int] = {}
    hwm_all: dict[int, int] = {}
    training_done = False
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            for pid in [proc.pid, *_descendants(proc.pid)]:
                found = _rank_and_hwm(pid)
                if found is not None:
                    rank, hwm = found
                    hwm_all[rank] = max(hwm_all.get(rank, 0), hwm)
                    if not training_done:
                        hwm_training[rank] = hwm_all[rank]
            if not training_done:
                rows = _read_rows(metrics_path)
                training_done = bool(rows) and rows[-1]["step"] >= args.steps
            time.sleep(1.0)  # VmHWM is the kernel's high-water mark: polling rarely loses nothing and steals less CPU
    wall = time.monotonic() - wall0
    own1 = os.times()
    if proc.returncode != 0:
        sys.stdout.write(log_path.read_text()[-4000:])
        raise SystemExit(f"recipe failed with exit code {proc.returncode} (log: {log_path})")
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    ours = sum(own1[i] - own0[i] for i in range(4))  # this process + the finished recipe tree
    outside = max(0.0, (_busy_jiffies() - busy0) / ticks - ours) / wall
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"rows": _read_rows(metrics_path), "hwm_training": hwm_training, "hwm_all": hwm_all,
            "children_peak_kib": children_peak, "outside_cores": outside, "wall": wall}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kind = "lora" if args.recipe.startswith("lora_") else "full"
    config = args.config or ("tiny/dpo" if is_dpo(args.recipe) and kind == "lora" else
                              "tiny/full_dpo" if is_dpo(args.recipe) else f"tiny/{kind}")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    loadavg = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"] * 3
    print(f"load average before: {' '.join(loadavg)} (on {os.cpu_count()} CPUs)")
    peak_before = matmul_peak(dtype, args.threads)
    print(f"matmul peak before ({args.dtype}, {args.threads} threads): {peak_before / 1e9:.1f} GFLOP/s")

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tunekit_bench_"))
    try:
        checkpoint_dir, output_dir = root / "checkpoint", root / "run"
        if not (checkpoint_dir / "model.safetensors").is_file():
            write_checkpoint(checkpoint_dir)
        shutil.rmtree(output_dir, ignore_errors=True)
        result = run_recipe(args, recipe_overrides(args, kind, checkpoint_dir, output_dir), output_dir, config)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    peak_after = matmul_peak(dtype, args.threads)
    print(f"matmul peak after: {peak_after / 1e9:.1f} GFLOP/s")
    peak = max(peak_before, peak_after)

    rows = result["rows"]
    if [r["step"] for r in rows] != list(range(1, args.steps + 1)):
        raise SystemExit(f"expected metric rows for steps 1..{args.steps}, got {[r['step'] for r in rows]}")
    tokens = tokens_per_step(args.recipe)
    # wall-clock gap to the previous row; step 1 has none, so its in-step time is shown
    seconds = [tokens / rows[0]["tokens_per_second"]]  # the recipes count the tokens of all ranks
    seconds += [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
    print("step  seconds   loss")
    for r, s in zip(rows, seconds):
        print(f"{r['step']:4d}  {s:7.3f}  {r['loss']:.4f}")
    timed = seconds[args.warmup:]
    median = statistics.median(timed)
    tokens_per_second = tokens / median
    flops = dpo_flops_per_token(not args.precompute_reference) if is_dpo(args.recipe) else flops_per_token(kind)
    mfu = tokens_per_second * flops / peak
    rss_training = {rank: kib / 1024 for rank, kib in sorted(result["hwm_training"].items())}
    rss_all = {rank: kib / 1024 for rank, kib in sorted(result["hwm_all"].items())}
    peak_rss = max(rss_training.values()) if rss_training else result["children_peak_kib"] / 1024
    print(f"median step (steps {args.warmup + 1}-{args.steps}): {median:.3f} s "
          f"(min {min(timed):.3f}, max {max(timed):.3f})")
    print(f"tokens/s: {tokens_per_second:.0f}")
    print(f"FLOPs/token ({kind}): {flops:.4g}; achieved {tokens_per_second * flops / 1e9:.1f} GFLOP/s")
    print(f"MFU: {100 * mfu:.1f}% of {peak / 1e9:.1f} GFLOP/s")
    print("peak RSS during training (MiB, per rank): " + ", ".join(f"{r}: {v:.0f}" for r, v in rss_training.items()))
    print("peak RSS incl. final checkpoint save (MiB, per rank): "
          + ", ".join(f"{r}: {v:.0f}" for r, v in rss_all.items()))
    print(f"outside CPU use during the run: {result['outside_cores']:.2f} cores "
          f"(load average before {loadavg[0]})")
    summary = {
        "recipe": args.recipe, "dtype": args.dtype, "nproc": args.nproc, "threads": args.threads,
        "precompute_reference": args.precompute_reference, "packed": args.packed,
        "pairs_per_second": round(tokens_per_second / (2 * (PROMPT_LEN + COMPLETION_LEN)), 2) if is_dpo(args.recipe)
        else None,
        "activation_checkpointing": args.activation_checkpointing, "compile": args.compile,
        "steps": args.steps, "median_step_seconds": round(median, 4),
        "tokens_per_second": round(tokens_per_second, 1), "mfu": round(mfu, 4),
        "flops_per_token": flops, "matmul_peak_gflops": round(peak / 1e9, 1),
        "matmul_peak_gflops_before_after": [round(peak_before / 1e9, 1), round(peak_after / 1e9, 1)],
        "peak_rss_mib": round(peak_rss, 1), "peak_rss_mib_per_rank": {str(k): round(v, 1) for k, v in rss_training.items()},
        "loadavg_before": float(loadavg[0]) if loadavg[0] != "?" else None,
        "outside_cpu_cores": round(result["outside_cores"], 2), "final_loss": rows[-1]["loss"],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
