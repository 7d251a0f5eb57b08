"""Distributed helpers: real torchrun launches on CPU/gloo (tests/assets/distributed/train_check.py
compares sharded training with single-process math in-process and raises on any mismatch), DCP
resharding 1 -> 2 and 2 -> 1 processes, two-"node" c10d rendezvous, and in-process checks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tunekit.checkpoint.errors import CheckpointError
from tunekit.training.activation_offloading import offload_activations
from tunekit.training.process_group import (
    destroy_distributed,
    get_world_size_and_rank,
    global_token_count,
    init_distributed,
    is_distributed,
    is_rank_zero,
    local_device,
    log_rank_zero,
)
from tunekit.training.fsdp import shard_model
from tunekit.training.distributed_checkpoint import load_sharded_state, save_sharded_state
from tunekit.training.train_step import clip_gradients

ASSETS = Path(__file__).parent / "assets" / "distributed"
sys.path.insert(0, str(ASSETS))
from tiny_decoder import TinyDecoder, global_micro_batches, token_loss_sum  # noqa: E402

from free_port import free_port  # noqa: E402
from native_crash import NativeCrash, check_launch, retry_after_native_crash  # noqa: E402

SCRIPT = ASSETS / "train_check.py"
LAUNCH_TIMEOUT = 150




def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _check(proc: subprocess.CompletedProcess | subprocess.Popen, out: str, err: str) -> None:
    check_launch(proc.returncode, f"{out[-3000:]}\n{err}", "torchrun")


def _optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Two torchrun launches (``--nnodes 2 --nproc_per_node 1``, c10d rendezvous on 127.0.0.1),
    started early so their start-up overlaps the 2-process launch below."""
    root = tmp_path_factory.mktemp("nodes")
    procs = _launch_two_nodes(root)
    yield root, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _launch_two_nodes(root):
    port = free_port()
    procs = []
    for node_rank in (0, 1):
        out = root / f"node{node_rank}"
        out.mkdir()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node_rank), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
               "--rdzv_id", "tunekit-test", str(SCRIPT), "--out", str(out), "--quick"]
        # output to files, not pipes: nobody reads these pipes while the other launch runs
        with open(root / f"node{node_rank}.log", "w") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env()))
    return procs


def _wait_two_nodes(root, procs, attempt=0):
    """Both node launches finished cleanly (launched again once after a native crash)."""
    for p in procs:
        p.wait(timeout=LAUNCH_TIMEOUT)
    logs = "".join(f"--- node{i} ---\n{(root / f'node{i}.log').read_text()}" for i in (0, 1))
    try:
        for p in procs:
            _check(p, "", logs)
    except NativeCrash:
        if attempt:
            raise
        retry_root = root / "retry"
        retry_root.mkdir()
        return _wait_two_nodes(retry_root, _launch_two_nodes(retry_root), attempt=1)
    return root


@pytest.fixture(scope="module")
def launch(tmp_path_factory, two_nodes):
    """One 2-process torchrun: every check of train_check.py, resuming a 1-process checkpoint."""
    root = tmp_path_factory.mktemp("dist")
    one = root / "one_process"
    one.mkdir()
    torch.manual_seed(3)
    model = TinyDecoder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(2):
        tokens, labels = global_micro_batches(step, 1, 4)[0]
        (token_loss_sum(model, tokens, labels) / (labels != -100).sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    extra = {"step": 2, "sampler": {"epoch": 0, "index": 17}}
    assert not is_distributed()
    save_sharded_state(one / "dcp", model, optimizer, extra)
    torch.save({"model": model.state_dict(), "optimizer": _optimizer_state_by_name(model, optimizer),
                "extra": extra}, one / "expected.pt")

    return retry_after_native_crash(_two_process_launch, root, one)


def _two_process_launch(root, one, attempt):
    out = root / f"two_process{attempt}"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), str(SCRIPT), "--out", str(out), "--load-from", str(one)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=LAUNCH_TIMEOUT)
    _check(proc, proc.stdout, proc.stderr)
    return out


def test_sharded_training_matches_single_process(launch):
    r0 = json.loads((launch / "results_rank0.json").read_text())
    r1 = json.loads((launch / "results_rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    # the script raises above 1e-5; these are the measured differences (fp32)
    for tag in ("fp32", "reshard_after_forward=False", "cpu_offload=True", "offload=True",
                "activation_checkpointing=True"):
        assert r0[f"loss_diff[{tag}]"] <= 1e-5 and r1[f"loss_diff[{tag}]"] <= 1e-5
        assert r0[f"norm_diff[{tag}]"] <= 1e-5
        assert r0[f"param_diff[{tag}]"] <= 1e-5


def test_memory_lean_full_state_dict_load_and_qlora(launch):
    r0 = json.loads((launch / "results_rank0.json").read_text())
    assert r0["local_numel_fraction"] == pytest.approx(0.5, abs=0.02)  # each rank holds half
    assert r0["load_full_diff"] == 0.0 and r0["load_full_all_ranks_diff"] == 0.0
    assert r0["qlora_loss_diff"] <= 1e-5 and r0["qlora_adapter_diff"] <= 1e-5
    assert r0["qlora_base_gather_diff"] == 0.0
    assert r0["bf16_loss_rel_diff"] <= 2e-2


def test_resume_one_process_checkpoint_on_two(launch):
    r0 = json.loads((launch / "results_rank0.json").read_text())
    assert r0["resume_model_diff"] == 0.0
    assert r0["resume_optim_diff"] == 0.0


def test_resume_two_process_checkpoint_on_one(launch):
    expected = torch.load(launch / "expected_saved.pt", weights_only=True)
    torch.manual_seed(9)
    model = TinyDecoder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    extra = load_sharded_state(launch / "dcp_saved", model, optimizer)
    assert extra == {"step": 3, "note": "hello"}
    for k, v in expected["model"].items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)
    loaded = _optimizer_state_by_name(model, optimizer)
    assert loaded.keys() == expected["optimizer"].keys()
    for fqn, state in expected["optimizer"].items():
        for name, value in state.items():
            torch.testing.assert_close(torch.as_tensor(loaded[fqn][name]), torch.as_tensor(value), rtol=0, atol=0)


def test_two_node_c10d_rendezvous(two_nodes):
    root = _wait_two_nodes(*two_nodes)
    results = [json.loads(f.read_text()) for f in sorted(root.glob("node*/results_rank*.json"))]
    assert len(results) == 2 and all(r["world_size"] == 2 for r in results)
    assert results[0]["losses"] == results[1]["losses"]
    assert results[0]["norms"] == results[1]["norms"]
    assert results[0]["loss_diff[fp32]"] <= 1e-5


def test_activation_offloading_gives_identical_gradients():
    torch.manual_seed(0)
    model = TinyDecoder()
    tokens, labels = global_micro_batches(0, 1, 3)[0]
    token_loss_sum(model, tokens, labels).backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with offload_activations("cpu", min_bytes=0):
        loss = token_loss_sum(model, tokens, labels)
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, reference[n], rtol=0, atol=0)


def test_activation_offloading_moves_saved_tensors_and_skips_parameters():
    x = torch.randn(64, 64, requires_grad=True)
    weight = nn.Parameter(torch.randn(64, 64))
    with offload_activations("cpu", min_bytes=0):
        y = x * weight
    # reading a saved tensor runs the unpack hook: the activation comes back as a host copy,
    # the parameter is kept as is
    assert y.grad_fn._saved_self.data_ptr() != x.data_ptr()
    torch.testing.assert_close(y.grad_fn._saved_self, x)
    assert y.grad_fn._saved_other.data_ptr() == weight.data_ptr()
    with offload_activations("cpu", enabled=False):
        z = x * weight
    assert z.grad_fn._saved_self.data_ptr() == x.data_ptr()


def test_single_process_helpers_without_process_group():
    assert not is_distributed()
    assert get_world_size_and_rank() == (1, 0)
    labels = torch.tensor([[1, -100, 3], [-100, -100, 5]])
    assert global_token_count([labels, labels[:1]]) == 5
    torch.manual_seed(0)
    a, b = TinyDecoder(), TinyDecoder()
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        tokens, labels = global_micro_batches(0, 1, 2)[0]
        token_loss_sum(m, tokens, labels).backward()
    norm = clip_gradients(a.parameters(), 0.1)
    expected = nn.utils.clip_grad_norm_(b.parameters(), 0.1)
    assert norm == pytest.approx(expected.item(), rel=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)


def test_one_process_group_without_torchrun_and_errors(tmp_path, monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="init_distributed"):
        shard_model(TinyDecoder())
    try:
        assert init_distributed("cpu") == (0, 1)
        assert init_distributed("cpu") == (0, 1)  # idempotent
        with pytest.raises(ValueError, match="no non-empty nn.ModuleList `layers`"):
            shard_model(nn.Linear(4, 4))
        model = shard_model(TinyDecoder())
        with pytest.raises(ValueError, match="already sharded"):
            shard_model(model)
        tokens, labels = global_micro_batches(0, 1, 2)[0]
        token_loss_sum(model, tokens, labels).backward()
    finally:
        destroy_distributed()
        torch.set_num_threads(threads)
    assert not is_distributed()
    with pytest.raises(CheckpointError, match="not a complete sharded recipe state"):
        load_sharded_state(tmp_path, TinyDecoder(), torch.optim.SGD(TinyDecoder().parameters(), lr=0.1))


def test_unshardable_nf4_weight_is_reported():
    from tunekit.modules.peft import apply_lora
    from tunekit.training.fsdp import _check_nf4_shardable

    model = apply_lora(TinyDecoder(), ["w1"], rank=2, alpha=4.0, quantize_base=True)  # [128, 64]: 1 scale block
    _check_nf4_shardable(model, 1)
    with pytest.raises(ValueError, match=r"NF4 weight 'layers.0.w1.weight' \[128, 64\] cannot be split across 2"):
        _check_nf4_shardable(model, 2)


def test_rank_zero_logging_and_local_device(caplog, monkeypatch):
    import logging

    logger = logging.getLogger("tunekit.test_distributed")
    monkeypatch.setenv("RANK", "1")  # torchrun sets RANK before any process group exists
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not is_rank_zero()
    with caplog.at_level(logging.INFO, logger=logger.name):
        log_rank_zero(logger, "from rank one")
    assert "from rank one" not in caplog.text
    assert local_device("cuda") == torch.device("cuda", 1)
    assert local_device("cpu") == torch.device("cpu")
    monkeypatch.setenv("RANK", "0")
    with caplog.at_level(logging.INFO, logger=logger.name):
        log_rank_zero(logger, "from rank zero")
    assert "from rank zero" in caplog.text
    monkeypatch.delenv("LOCAL_RANK")
    assert local_device("cuda:2") == torch.device("cuda", 2)


def test_sampler_position_converts_to_another_process_count():
    from tunekit.training.sampler import ResumableSampler

    order = list(ResumableSampler(20, seed=4))  # one process: the epoch's order
    two = [ResumableSampler(20, rank=r, world_size=2, seed=4) for r in range(2)]
    for s in two:
        it = iter(s)
        [next(it) for _ in range(3)]  # each rank consumed 3: the first 6 examples of the order
    state = two[0].state_dict()
    one = ResumableSampler(20, seed=4)
    one.load_state_dict(state)
    assert list(one) == order[6:]
    three = [ResumableSampler(20, rank=r, world_size=3, seed=4) for r in range(3)]
    for s in three:
        s.load_state_dict(state)
    resumed = [i for group in zip(*(list(s) for s in three)) for i in group]
    assert resumed[:14] == order[6:]  # (then wrap-around padding for the uneven last round)
    with pytest.raises(ValueError, match="do not split over 4 processes"):
        ResumableSampler(20, rank=0, world_size=4, seed=4).load_state_dict(state)
