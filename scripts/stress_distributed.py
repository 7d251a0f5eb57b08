"""Repeat short torchrun launches of the distributed recipes on CPU/gloo and count native crashes.

    python scripts/stress_distributed.py --launches 100 --out /tmp/stress
    python scripts/stress_distributed.py --launches 20 --configs qlora,nodes --jobs 2

Why: torch 2.13's gloo has rarely aborted ranks natively ("malloc(): unaligned tcache chunk
detected", "terminate called without an active exception"; tests/native_crash.py), and the test
fixtures start a launch set over once on that signature. This script measures how often it happens.

Configurations (2 ranks each, through the real CLI: ``python -m tunekit.cli.main run ...``):
  lora   lora_finetune_distributed --config tiny/lora, --nproc_per_node 2
  qlora  lora_finetune_distributed --config tiny/qlora, --nproc_per_node 2
  full   full_finetune_distributed --config tiny/full, --nproc_per_node 2
  nodes  tiny/qlora on two torchrun "nodes" (--nnodes 2 --nproc_per_node 1, c10d rendezvous on
         127.0.0.1), as tests/test_recipes_distributed.py launches it
Each launch trains 4 steps (fp32, as the test fixtures) and evaluates and saves at steps 2 and 4, so
evaluation, the HF/PEFT gather, the DCP save and the exit path all run. The QLoRA configurations use
a random dim-256 Llama written by this script (the shipped tiny Llama's NF4 scale blocks do not split
over 2 ranks), so they also override ``checkpoint_dir``.

Every launch is classified ok / crash (a native signature of tests/native_crash.py in a failed
launch) / other (failed without one) / timeout; logs of launches that were not ok are kept in
``<out>/logs``, one JSON row per launch (with the load average) goes to ``<out>/launches.jsonl``.
Launches of the configurations are interleaved so outside load drifts over all of them alike.
Ends with a table and one JSON line: counts and the crash rate with its 95 % Wilson interval
(SIGINT / SIGTERM: after the running launches, for what finished). Runs with the same ``--out``
append to its launches.jsonl; ``--report`` prints the table of all of them.
Set PYTHONPATH to choose the tunekit every rank imports; the probe line at the start shows it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from free_port import free_port  # noqa: E402  (ports below the ephemeral range, see its docstring)
from native_crash import crash_signature  # noqa: E402  (the signatures the test retry acts on)

CONFIGS = {  # name: (recipe, config, uses the dim-256 QLoRA model, two nodes)
    "lora": ("lora_finetune_distributed", "tiny/lora", False, False),
    "qlora": ("lora_finetune_distributed", "tiny/qlora", True, False),
    "full": ("full_finetune_distributed", "tiny/full", False, False),
    "nodes": ("lora_finetune_distributed", "tiny/qlora", True, True),
}
COMMON = ("device=cpu", "dtype=fp32", "max_steps=4", "eval_every_n_steps=2", "eval_max_batches=2",
          "save_every_n_steps=2", "keep_last_n=null", "log_every_n_steps=1",
          "metric_logging.tensorboard=false", "metric_logging.progress_bar=false")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launch_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"  # a native abort then prints every thread's Python stack: where it died
    return {**env, **extra}


def write_qlora_model(out: Path) -> Path:
    """A random Llama whose NF4 weights split over 2 ranks (dim 256), with the shipped tokenizer."""
    import torch
    import transformers

    import tunekit

    if (out / "config.json").is_file():
        return out
    config = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    shipped = Path(tunekit.__file__).parent / "assets" / "tiny_llama"
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(shipped / name, out / name)
    return out


def probe(env: dict[str, str]) -> str:
    """Which tunekit (and torch) each rank of a 2-process torchrun imports with this environment."""
    code = "import os, torch, tunekit; print('rank', os.environ['RANK'], tunekit.__file__, torch.__version__)"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "--no-python", sys.executable, "-c", code]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    return "; ".join(sorted(line for line in done.stdout.splitlines() if line.startswith("rank")))


def run_one(name: str, index: int, args, qlora_model: Path, env: dict[str, str]) -> dict:
    recipe, config, qlora, nodes = CONFIGS[name]
    work = Path(tempfile.mkdtemp(prefix=f"{name}{index}_", dir=args.out / "runs"))
    overrides = [f"output_dir={work / 'out'}", *COMMON, *([f"checkpoint_dir={qlora_model}"] if qlora else [])]
    port = free_port()
    if nodes:
        torchruns = [["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
                      f"127.0.0.1:{port}", "--rdzv_id", f"stress-{name}-{index}"] for _ in range(2)]
    else:
        torchruns = [["--nproc_per_node", "2", "--master_port", str(port)]]
    load_before = os.getloadavg()[0]
    start = time.monotonic()
    procs = []
    for i, torchrun in enumerate(torchruns):
        cmd = [sys.executable, "-m", "tunekit.cli.main", "run", *torchrun, recipe, "--config", config, *overrides]
        with open(work / f"launch{i}.log", "w") as log:  # the child keeps its own copy of the descriptor
            # own session: on a timeout the whole launch (agent and ranks) is killed by its group id
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
    timed_out = False
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, args.timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.monotonic() - start
    logs = "\n".join(f"--- launch{i} (rc {p.returncode}) ---\n{(work / f'launch{i}.log').read_text(errors='replace')}"
                     for i, p in enumerate(procs))
    failed = any(p.returncode != 0 for p in procs)
    found = crash_signature(logs)
    status = "timeout" if timed_out else "crash" if failed and found else "other" if failed else "ok"
    row = {"config": name, "index": index, "status": status, "rc": [p.returncode for p in procs],
           "seconds": round(seconds, 1), "load1_before": round(load_before, 2),
           "load1_after": round(os.getloadavg()[0], 2), "signature": found}
    if status != "ok":
        log_path = args.out / "logs" / f"{name}-{index:04d}-{status}.log"
        log_path.write_text(logs)
        row["log"] = str(log_path)
    shutil.rmtree(work, ignore_errors=True)
    return row


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion k / n (sensible also for k = 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def summarise(rows: list[dict], names: list[str]) -> dict:
    print(f"\n{'config':8} {'launches':>8} {'ok':>5} {'crash':>6} {'other':>6} {'timeout':>8}"
          f" {'crash rate (95% CI)':>26} {'median s':>9} {'load1':>10}")
    for name in [*names, "all"]:
        mine = [r for r in rows if name in ("all", r["config"])]
        n, counts = len(mine), {s: sum(r["status"] == s for r in mine) for s in ("ok", "crash", "other", "timeout")}
        lo, hi = wilson(counts["crash"], n)
        seconds = sorted(r["seconds"] for r in mine) or [0.0]
        loads = [r["load1_before"] for r in mine] or [0.0]
        print(f"{name:8} {n:8d} {counts['ok']:5d} {counts['crash']:6d} {counts['other']:6d} {counts['timeout']:8d}"
              f" {counts['crash'] / max(n, 1):9.2%} ({lo:6.2%}-{hi:6.2%}) {seconds[len(seconds) // 2]:9.1f}"
              f" {min(loads):4.1f}-{max(loads):4.1f}")
    n, crashes = len(rows), sum(r["status"] == "crash" for r in rows)
    lo, hi = wilson(crashes, n)
    return {"launches": n, **{s: sum(r["status"] == s for r in rows) for s in ("ok", "crash", "other", "timeout")},
            "crash_rate": round(crashes / max(n, 1), 5), "crash_rate_ci95": [round(lo, 5), round(hi, 5)],
            "per_config": {name: {s: sum(r["status"] == s and r["config"] == name for r in rows)
                                  for s in ("ok", "crash", "other", "timeout")} for name in names}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launches", type=int, default=20, help="launches per configuration")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    parser.add_argument("--jobs", type=int, default=1, help="launches running at the same time")
    parser.add_argument("--out", type=Path, default=Path("/tmp/tunekit_stress"), help="logs and launches.jsonl")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a launch counts as hung")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the launches (e.g. GLIBC_TUNABLES=... to test a hypothesis)")
    parser.add_argument("--report", action="store_true",
                        help="launch nothing: the table of every row in <out>/launches.jsonl (runs appended there)")
    args = parser.parse_args()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    if unknown := set(names) - set(CONFIGS):
        parser.error(f"unknown configs {sorted(unknown)}; choose from {list(CONFIGS)}")
    if args.report:
        rows = [json.loads(line) for line in (args.out / "launches.jsonl").read_text().splitlines()]
        print(json.dumps(summarise([r for r in rows if r["config"] in names], names)))
        return
    # SIGTERM, and SIGINT even where a background start ignores it, stop after the running launches
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    for sub in ("logs", "runs"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    env = launch_env(dict(kv.split("=", 1) for kv in args.env))
    qlora_model = write_qlora_model(args.out / "qlora_model256") if any(CONFIGS[n][2] for n in names) else None
    print(f"probe: {probe(env)}", flush=True)
    print(f"{args.launches} launches x {names}, jobs {args.jobs}, extra env {args.env}, load {os.getloadavg()}",
          flush=True)

    todo = [(name, i) for i, name in itertools.product(range(args.launches), names)]  # interleaved
    rows: list[dict] = []
    with open(args.out / "launches.jsonl", "a") as table, ThreadPoolExecutor(args.jobs) as pool:

        def record(row: dict) -> None:
            rows.append(row)
            table.write(json.dumps(row) + "\n")
            table.flush()
            print(json.dumps(row), flush=True)

        futures = [pool.submit(run_one, name, i, args, qlora_model, env) for name, i in todo]
        try:
            for future in futures:
                record(future.result())
        except KeyboardInterrupt:  # cancel what has not started, keep what is running
            print("interrupted: waiting for the running launches", flush=True)
            for future in futures[len(rows):]:
                if not future.cancel():
                    record(future.result())
    print(json.dumps(summarise(rows, names)))


if __name__ == "__main__":
    main()
