"""Launched by tests/test_distributed.py under torchrun (gloo, CPU). Every rank also trains an
unsharded reference copy on the whole global batch, so each check compares sharded training with
single-process math inside one launch. Any mismatch raises (non-zero exit)."""

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
from tiny_decoder import TinyDecoder, global_micro_batches, token_loss_sum

from tunekit.training.activation_offloading import offload_activations
from tunekit.training.train_step import clip_gradients
from tunekit.training.process_group import exit_after_clean_run, global_token_count, init_distributed
from tunekit.training.fsdp import gather_full_state_dict, load_full_state_dict, no_grad_sync, shard_model
from tunekit.training.distributed_checkpoint import load_sharded_state, save_sharded_state

STEPS, N_MICRO, ROWS_PER_RANK, MAX_NORM, LR = 3, 2, 2, 0.5, 1e-3


def close(a, b, what, tol=1e-5):
    diff = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    if diff > tol:
        raise AssertionError(f"rank {dist.get_rank()}: {what} differs by {diff:.3e} (tol {tol})")
    return diff


def train_reference(model, world_size, steps=STEPS):
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, norms = [], []
    for step in range(steps):
        micro = global_micro_batches(step, N_MICRO, ROWS_PER_RANK * world_size)
        n_tokens = sum((lab != -100).sum() for _, lab in micro)
        total = 0.0
        for tokens, labels in micro:
            loss = token_loss_sum(model, tokens, labels) / n_tokens
            loss.backward()
            total += loss.item()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, norms, opt


def train_sharded(model, rank, world_size, steps=STEPS, offload=False):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses, norms = [], []
    for step in range(steps):
        micro = global_micro_batches(step, N_MICRO, ROWS_PER_RANK * world_size)
        mine = [(t[rank * ROWS_PER_RANK:(rank + 1) * ROWS_PER_RANK], lab[rank * ROWS_PER_RANK:(rank + 1) * ROWS_PER_RANK])
                for t, lab in micro]
        n_tokens = global_token_count([lab for _, lab in mine])
        total = torch.zeros(())
        for i, (tokens, labels) in enumerate(mine):
            with no_grad_sync(model, enabled=i < len(mine) - 1):
                with offload_activations("cpu", enabled=offload, min_bytes=0):
                    loss = token_loss_sum(model, tokens, labels) / n_tokens
                loss.backward()
            total += loss.detach()
            if i < len(mine) - 1:  # accumulated locally: nothing reduced into the sharded grads yet
                assert all(p.grad is None for p in model.parameters()), "no_grad_sync still reduced"
        dist.all_reduce(total)
        norm = clip_gradients(model.parameters(), MAX_NORM)
        assert type(norm) is float, type(norm)
        norms.append(norm)
        opt.step()
        opt.zero_grad()
        losses.append(total.item())
    return losses, norms, opt


def check_training(rank, world_size, results, offload=False, **shard_kwargs):
    torch.manual_seed(0)
    model = TinyDecoder()
    ref = copy.deepcopy(model)
    ref_losses, ref_norms, ref_opt = train_reference(ref, world_size)
    shard_model(model, **shard_kwargs)
    losses, norms, opt = train_sharded(model, rank, world_size, offload=offload)
    tag = ",".join(f"{k}={v}" for k, v in dict(shard_kwargs, **({"offload": True} if offload else {})).items()) or "fp32"
    results[f"loss_diff[{tag}]"] = close(torch.tensor(losses), torch.tensor(ref_losses), f"losses ({tag})")
    results[f"norm_diff[{tag}]"] = close(torch.tensor(norms), torch.tensor(ref_norms), f"grad norms ({tag})")
    full = gather_full_state_dict(model)
    if rank == 0:
        ref_sd = ref.state_dict()
        assert full.keys() == ref_sd.keys(), (sorted(full), sorted(ref_sd))
        results[f"param_diff[{tag}]"] = max(close(full[k], ref_sd[k], f"param {k} ({tag})") for k in full)
        assert all(v.device.type == "cpu" and type(v) is torch.Tensor for v in full.values())
    else:
        assert full == {}
    return model, opt, ref, ref_opt, losses, norms


def check_load_full_state_dict(rank, results):
    torch.manual_seed(1)
    source = TinyDecoder()
    full = {k: v.clone() for k, v in source.state_dict().items()} if rank == 0 else None
    kept = {k: v.clone() for k, v in source.state_dict().items()}
    with torch.device("meta"):
        model = TinyDecoder()
    shard_model(model)
    load_full_state_dict(model, full, device="cpu")
    if rank == 0:  # the caller's dict must still hold its plain tensors
        for k, v in full.items():
            assert type(v) is torch.Tensor, f"caller's tensor {k} was replaced by {type(v)}"
            close(v, kept[k], f"caller's tensor {k}")
    # each rank holds only its shard
    local = sum(p.to_local().numel() for p in model.parameters())
    results["local_numel_fraction"] = local / sum(v.numel() for v in kept.values())
    gathered = gather_full_state_dict(model)
    if rank == 0:
        results["load_full_diff"] = max(close(gathered[k], kept[k], f"loaded {k}") for k in kept)
    # every rank holding the full dict (no broadcast): each keeps its own shard
    with torch.device("meta"):
        replicated = shard_model(TinyDecoder())
    load_full_state_dict(replicated, kept, device="cpu", from_rank0=False)
    gathered = gather_full_state_dict(replicated)
    if rank == 0:
        results["load_full_all_ranks_diff"] = max(close(gathered[k], kept[k], f"loaded {k}") for k in kept)
    # the loaded model computes the same function
    tokens, labels = global_micro_batches(7, 1, 2)[0]
    close(token_loss_sum(model, tokens, labels), token_loss_sum(source, tokens, labels), "loss after load")


def check_qlora(rank, world_size, results):
    from tunekit.modules.peft import apply_lora, lora_state_dict

    def build():
        torch.manual_seed(2)
        # hidden 512: a [512, 64] weight has 512 absmax blocks in 2 second-level scale blocks,
        # which split evenly over 2 ranks (FSDP shards NF4 with its scales)
        return apply_lora(TinyDecoder(hidden=512), ["w1", "w2"], rank=4, alpha=8.0, quantize_base=True)

    model, ref = build(), build()
    ref_losses, _, _ = train_reference(ref, world_size, steps=2)
    shard_model(model)
    losses, _, _ = train_sharded(model, rank, world_size, steps=2)
    results["qlora_loss_diff"] = close(torch.tensor(losses), torch.tensor(ref_losses), "QLoRA losses")
    adapters = gather_full_state_dict(model, trainable_only=True)
    if rank == 0:
        ref_adapters = {k: v for k, v in ref.state_dict().items()
                        if k in {n for n, p in ref.named_parameters() if p.requires_grad}}
        assert adapters.keys() == ref_adapters.keys(), (sorted(adapters), sorted(ref_adapters))
        assert set(lora_state_dict(ref)) <= set(adapters)
        results["qlora_adapter_diff"] = max(close(adapters[k], ref_adapters[k], f"adapter {k}") for k in adapters)
    # the full gather returns the frozen bases as NF4 again (dequantize before writing safetensors)
    full = gather_full_state_dict(model)
    if rank == 0:
        base = full["layers.0.w1.weight"]
        assert type(base).__name__ == "NF4Tensor", type(base)
        results["qlora_base_gather_diff"] = close(
            base.get_original_weight(), ref.layers[0].w1.weight.get_original_weight(), "gathered NF4 base")


def check_bf16(rank, world_size, results):
    torch.manual_seed(0)
    model = TinyDecoder()
    tokens, labels = global_micro_batches(0, 1, ROWS_PER_RANK * world_size)[0]
    ref_loss = token_loss_sum(model, tokens, labels) / (labels != -100).sum()
    shard_model(model, mp_dtype=torch.bfloat16)
    mine = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    loss = token_loss_sum(model, tokens[mine], labels[mine]) / global_token_count(labels[mine])
    loss.backward()
    dist.all_reduce(loss := loss.detach())
    results["bf16_loss_rel_diff"] = close(loss / ref_loss, torch.ones(()), "bf16 loss ratio", tol=2e-2)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def check_resume(rank, world_size, out, load_from, results):
    model, opt, ref, ref_opt, _, _ = check_training(rank, world_size, results)
    save_sharded_state(out / "dcp_saved", model, opt, extra={"step": STEPS, "note": "hello"})
    # what a resume must reproduce exactly: the sharded run's own state, gathered
    full = gather_full_state_dict(model)
    optim_full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"model": full, "optimizer": optim_full["state"]}, out / "expected_saved.pt")
    if load_from is None:
        return
    # resume a checkpoint written by a different number of processes (the test wrote it from one)
    torch.manual_seed(5)
    fresh = shard_model(TinyDecoder())
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=LR)
    extra = load_sharded_state(load_from / "dcp", fresh, fresh_opt)
    expected = torch.load(load_from / "expected.pt", weights_only=True)
    assert extra == expected["extra"], extra
    full = gather_full_state_dict(fresh)
    optim_full = get_optimizer_state_dict(fresh, fresh_opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        results["resume_model_diff"] = max(close(full[k], v, f"resumed {k}") for k, v in expected["model"].items())
        diffs = []
        for fqn, state in expected["optimizer"].items():
            for name, value in state.items():
                diffs.append(close(torch.as_tensor(optim_full["state"][fqn][name]), value, f"resumed optim {fqn}.{name}"))
        results["resume_optim_diff"] = max(diffs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--load-from", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="training check only (multi-node test)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank, world_size = init_distributed("cpu")
    torch.set_num_threads(1)
    results = {"world_size": world_size}
    if args.quick:
        _, _, _, _, losses, norms = check_training(rank, world_size, results)
        results.update(losses=losses, norms=norms)
    else:
        check_resume(rank, world_size, args.out, args.load_from, results)
        check_training(rank, world_size, results, reshard_after_forward=False)
        check_load_full_state_dict(rank, results)
        check_bf16(rank, world_size, results)
        check_qlora(rank, world_size, results)
        check_training(rank, world_size, results, cpu_offload=True)
        check_training(rank, world_size, results, offload=True)
        check_training(rank, world_size, results, activation_checkpointing=True)
    (args.out / f"results_rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_after_clean_run()
