"""Try to reproduce the gloo native crash without tunekit: pure torch (+ torchao NF4), 2 ranks.

    python scripts/repro_gloo_crash.py --launches 10 --variant gather-loop --steps 120 --timeout 1200
    python scripts/repro_gloo_crash.py --launches 100 --variant sharded

Result (2026-12-03, torch 2.13.0+cpu, torchao 0.18.0, glibc 2.36, 2 cores under load; the numbers
are in docs/distributed.md, "Native crash rate under gloo"): reproduced without tunekit. Ranks abort
with "malloc(): unaligned tcache chunk detected" or SIGSEGV inside
``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` (DTensor redistribute ->
``_c10d_functional.wait_tensor``), only with NF4 bases: about one gather in 50 in the
``gather-loop`` variants, none in 300 gathers with fp32 bases. For NF4 DTensors that call returns
with torchao's three inner all-gathers per weight still in flight, and ranks other than 0 never
wait for them (they stay in torch's functional-collective work registry); ``gather-loop-waited``
waits every gathered value on every rank.

The driver repeats ``torchrun --nproc_per_node 2`` launches of this file in worker mode and
classifies each like scripts/stress_distributed.py (the signatures of tests/native_crash.py). A
worker mirrors what the distributed recipes do on CPU, written here with torch calls only:
glibc mallopt as tunekit.training.cpu_allocator sets it, a small decoder-like stack (embedding,
blocks of attention + MLP projections with LoRA-style adapters on frozen bases, output
projection) built on rank 0 and on the meta device elsewhere, materialised layer by layer
(``broadcast_object_list`` of the layout + ``broadcast`` of each parameter), optionally NF4
bases (torchao), ``fully_shard`` per block and root with a plain SUM gradient reduction,
steps with a global token count all-reduce, clipping over DTensors and fused AdamW, evaluation
every 2 steps and a save every 2 steps (a full-state-dict gather to rank 0 written with
safetensors, a DCP save of the trainable state and optimizer, per-rank torch.save, barriers),
then ``destroy_process_group`` and ``os._exit(0)`` (``--normal-exit``: interpreter finalization).

Variants: ``plain`` (FSDP2 steps only: no mallopt, no eval, no save, no object collectives),
``patterns`` (everything above, fp32 bases), ``qlora`` (everything above, NF4 bases), ``sharded``
(qlora, but each rank evaluates its rows ``rank::world_size`` of every global eval batch, as tunekit's
reverted commit a7cb211 did, after which 3 of 7 suite runs crashed). ``gather-loop*``: one training
step, then only evaluation + the full-state-dict gather every 2 steps (many gathers per launch, e.g.
``--steps 120``): NF4 with sharded evaluation, fp32 bases, NF4 with every rank evaluating everything,
and NF4 with every gathered value waited on every rank (the proposed fix).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # train: an optimizer step every step (else only the first); save: full / gather only / none
    "plain": {"mallopt": False, "eval": False, "save": None, "nf4": False, "sharded_eval": False, "train": True},
    "patterns": {"mallopt": True, "eval": True, "save": "full", "nf4": False, "sharded_eval": False, "train": True},
    "qlora": {"mallopt": True, "eval": True, "save": "full", "nf4": True, "sharded_eval": False, "train": True},
    "sharded": {"mallopt": True, "eval": True, "save": "full", "nf4": True, "sharded_eval": True, "train": True},
    "gather-loop": {"mallopt": True, "eval": True, "save": "gather", "nf4": True, "sharded_eval": True, "train": False},
    "gather-loop-fp32": {"mallopt": True, "eval": True, "save": "gather", "nf4": False, "sharded_eval": True,
                         "train": False},
    "gather-loop-same-eval": {"mallopt": True, "eval": True, "save": "gather", "nf4": True, "sharded_eval": False,
                              "train": False},
    "gather-loop-waited": {"mallopt": True, "eval": True, "save": "gather-waited", "nf4": True,
                           "sharded_eval": False, "train": False},
}
DIM, HIDDEN, VOCAB, LAYERS, RANK = 256, 512, 1024, 2, 16


def worker(args) -> None:
    import faulthandler

    faulthandler.enable(all_threads=True)  # an abort prints the Python stack of every thread
    opts = VARIANTS[args.variant]
    if opts["mallopt"]:  # M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD "never": large blocks live in the heap
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt(-3, 1 << 30)
        libc.mallopt(-1, 2**31 - 1)
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import torch.nn.functional as F
    from torch import nn
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict
    from torch.distributed.fsdp import fully_shard

    class LoRALinear(nn.Module):
        def __init__(self, d_in, d_out):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5, requires_grad=False)
            self.lora_a = nn.Parameter(torch.randn(RANK, d_in) / d_in**0.5)
            self.lora_b = nn.Parameter(torch.zeros(d_out, RANK) + 1e-3)

        def forward(self, x):
            return F.linear(x, self.weight) + F.linear(F.linear(x, self.lora_a), self.lora_b)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (LoRALinear(DIM, DIM) for _ in range(4))
            self.w1, self.w3, self.w2 = LoRALinear(DIM, HIDDEN), LoRALinear(DIM, HIDDEN), LoRALinear(HIDDEN, DIM)

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = (p(x).view(b, s, 4, DIM // 4).transpose(1, 2) for p in (self.q, self.k, self.v))
            x = x + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, DIM))
            return x + self.w2(F.silu(self.w1(x)) * self.w3(x))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(VOCAB, DIM)
            self.layers = nn.ModuleList(Block() for _ in range(LAYERS))
            self.out = nn.Linear(DIM, VOCAB, bias=False)

        def forward(self, tokens):
            x = self.tok(tokens)
            for layer in self.layers:
                x = layer(x)
            return self.out(x)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with torch.device("cpu" if rank == 0 else "meta"):
        model = Model()
    for unit in [*model.layers, model.tok, model.out]:  # as a memory-lean start: one unit at a time
        unit.to("cpu") if rank == 0 else unit.to_empty(device="cpu")
        layout = [[(n, str(p.dtype), tuple(p.shape)) for n, p in unit.named_parameters()]]
        dist.broadcast_object_list(layout, src=0)
        for p in unit.parameters():
            dist.broadcast(p.data, src=0)
        if opts["nf4"] and isinstance(unit, Block):
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4
            for m in unit.modules():
                if isinstance(m, LoRALinear):
                    m.weight = nn.Parameter(to_nf4(m.weight.data, 64, 256), requires_grad=False)
        if isinstance(unit, Block):
            fully_shard(unit, reshard_after_forward=False)
    fully_shard(model, reshard_after_forward=False)
    for m in model.modules():
        if hasattr(m, "set_gradient_divide_factor"):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    model.tok.weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, fused=True)
    gen = torch.Generator().manual_seed(rank)

    def batch(n):
        tokens = torch.randint(0, VOCAB, (n, 128), generator=gen)
        labels = tokens.roll(-1, 1)
        labels[:, torch.randint(32, 128, (1,), generator=gen).item():] = -100  # ragged label counts
        return tokens, labels

    out = Path(args.out_dir)

    def phase(what):  # where a crash happened: the last marker before the abort
        print(f"rank {rank} step {step}: {what}", file=sys.stderr, flush=True)

    for step in range(1, args.steps + 1):
        if opts["train"] or step == 1:
            tokens, labels = batch(16)
            count = torch.tensor((labels != -100).sum().item())
            dist.all_reduce(count)
            loss = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            (loss / count).backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            metrics = torch.tensor([loss.item(), float(count)], dtype=torch.float64)
            dist.all_reduce(metrics)
            stop = torch.tensor(0)
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if opts["eval"] and step % 2 == 0:
            phase("eval")
            model.eval()
            with torch.no_grad():
                for _ in range(2):
                    tokens, labels = batch(32)
                    if opts["sharded_eval"]:  # each rank its rows of the global batch (strided views)
                        tokens, labels = tokens[rank::world], labels[rank::world]
                    F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), ignore_index=-100)
            model.train()
        if opts["save"] == "gather" and step % 2 == 0:  # the save's first collective, alone
            phase("full state dict gather")
            get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if opts["save"] == "gather-waited" and step % 2 == 0:
            # NF4 values come back with their all-gathers still in flight (torchao's wrapper of the
            # functional all-gather; nothing waits on ranks that drop them): wait on every rank
            phase("full state dict gather, waited")
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
            for value in full.values():
                torch.ops._c10d_functional.wait_tensor(value)
            del full
        if opts["save"] == "full" and step % 2 == 0:
            holder = [str(out / f".step_{step}.tmp") if rank == 0 else None]
            dist.broadcast_object_list(holder, src=0)
            folder = Path(holder[0])
            if rank == 0:
                folder.mkdir(parents=True, exist_ok=True)
            dist.barrier()
            phase("full state dict gather")
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                from safetensors.torch import save_file
                save_file({k: (v.get_original_weight() if hasattr(v, "get_original_weight") else v).contiguous()
                           for k, v in full.items()}, str(folder / "model.safetensors"))
            del full
            phase("DCP save")
            msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
            dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=folder / "recipe_state")
            torch.save({"rng": torch.get_rng_state()}, folder / "recipe_state" / f"rank{rank}.pt")
            dist.barrier()
            if rank == 0:
                os.rename(folder, out / f"step_{step}")
            dist.barrier()
    print(f"rank {rank}: done {args.steps} steps", flush=True)
    dist.destroy_process_group()
    if not args.normal_exit:
        sys.stdout.flush()
        os._exit(0)


def driver(args) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from free_port import free_port
    from native_crash import crash_signature

    logs_dir = Path(args.out) / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    counts = {"ok": 0, "crash": 0, "other": 0, "timeout": 0}
    for i in range(args.launches):
        work = Path(tempfile.mkdtemp(prefix=f"repro{i}_"))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), __file__, "--worker", "--variant", args.variant, "--steps", str(args.steps),
               "--out-dir", str(work), *(["--normal-exit"] if args.normal_exit else [])]
        load, start = os.getloadavg()[0], time.monotonic()
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout,
                                  check=False)
            rc, logs = done.returncode, done.stdout + done.stderr
        except subprocess.TimeoutExpired as e:  # its output comes as bytes even with text=True
            rc, logs = None, b"".join(x or b"" for x in (e.stdout, e.stderr)).decode(errors="replace")
        found = crash_signature(logs)
        status = "timeout" if rc is None else "ok" if rc == 0 else "crash" if found else "other"
        counts[status] += 1
        if status != "ok":
            (logs_dir / f"{args.variant}-{i:04d}-{status}.log").write_text(str(logs))
        shutil.rmtree(work, ignore_errors=True)
        print(json.dumps({"variant": args.variant, "index": i, "status": status, "rc": rc,
                          "seconds": round(time.monotonic() - start, 1), "load1": round(load, 2),
                          "signature": found}), flush=True)
    print(json.dumps({"variant": args.variant, "normal_exit": args.normal_exit, "launches": args.launches, **counts}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=list(VARIANTS), default="qlora")
    parser.add_argument("--launches", type=int, default=50)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--normal-exit", action="store_true", help="leave through interpreter finalization")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", default="/tmp/tunekit_repro", help="logs of launches that were not ok")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    worker(args) if args.worker else driver(args)
