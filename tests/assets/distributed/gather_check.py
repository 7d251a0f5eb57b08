"""Launched by tests/test_fsdp_gather.py under torchrun (2 ranks, gloo, CPU): shard a small QLoRA
model (NF4 bases), gather it with ``gather_full_state_dict`` (full, then adapters only) and record
on every rank how many functional collectives are still pending in torch's work registry right
after each gather; rank 0 also compares the gathered values with an unsharded copy of the model.
Writes ``results_rank<r>.json`` to ``--out``; the pytest side asserts on them.

Every collective runs before any check, so a failed check cannot leave the other rank waiting in
a collective."""

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

from tunekit.models.llama import llama
from tunekit.modules.peft import apply_lora
from tunekit.modules.peft.nf4 import is_nf4, nf4_dequantize
from tunekit.training.fsdp import gather_full_state_dict, shard_model
from tunekit.training.process_group import exit_after_clean_run, init_distributed

TARGETS = ["q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3"]


def build() -> torch.nn.Module:
    """The same QLoRA model on every call (and every rank). dim 256 / hidden 512: each NF4 weight
    ([256, 256], [512, 256], [256, 512]) has 4 or 8 second-level scale blocks, so it splits
    evenly over 2 ranks together with its scales."""
    torch.manual_seed(0)
    model = llama(vocab_size=1024, num_layers=2, num_heads=4, num_kv_heads=4, embed_dim=256,
                  intermediate_dim=512, max_seq_len=64)
    apply_lora(model, TARGETS, rank=4, alpha=8.0, quantize_base=True)
    with torch.no_grad():  # LoRA B starts at zero; give every adapter distinct values to compare
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p))
    return model


def registry_size() -> int:
    """Functional collectives issued but not yet waited on by this rank."""
    return torch._C._distributed_c10d._get_work_registry_size()


def max_diff(gathered: dict, reference: dict) -> float:
    """Largest |gathered - reference| over all entries, NF4 values compared dequantized."""
    worst = 0.0
    for name, ref in reference.items():
        got = gathered[name]
        got = nf4_dequantize(got) if is_nf4(got) else got
        ref = nf4_dequantize(ref) if is_nf4(ref) else ref
        worst = max(worst, (got.float() - ref.float()).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rank, world_size = init_distributed("cpu")

    reference = build()
    model = build()
    shard_model(model)
    results = {"rank": rank, "world_size": world_size, "registry_before": registry_size()}
    full = gather_full_state_dict(model)
    results["registry_after_full"] = registry_size()
    adapters = gather_full_state_dict(model, trainable_only=True)
    results["registry_after_trainable"] = registry_size()
    dist.barrier()

    if rank == 0:
        ref_full = reference.state_dict()
        ref_adapters = {n: p for n, p in reference.named_parameters() if p.requires_grad}
        results["full_keys_match"] = list(full) == list(ref_full)
        results["adapter_keys_match"] = list(adapters) == list(ref_adapters)
        results["nf4_keys"] = sorted(k for k, v in full.items() if is_nf4(v))
        results["expected_nf4_keys"] = sorted(k for k, v in ref_full.items() if is_nf4(v))
        results["all_cpu"] = all(v.device.type == "cpu" for v in [*full.values(), *adapters.values()])
        results["shapes_and_dtypes_match"] = all(
            full[k].shape == v.shape and full[k].dtype == v.dtype for k, v in ref_full.items())
        results["full_max_diff"] = max_diff(full, ref_full)
        results["adapter_max_diff"] = max_diff(adapters, ref_adapters)
    else:
        results["empty_on_other_ranks"] = full == {} and adapters == {}
    (args.out / f"results_rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()
    exit_after_clean_run()


if __name__ == "__main__":
    main()
