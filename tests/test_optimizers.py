"""tunekit.training.optimizers.AdamW: fp32 parameters bit-identical to torch.optim.AdamW; bf16
parameters keep their updates (stochastic rounding, fp32 master weights) where plain bf16 AdamW
rounds most of them away; exact resume from ``state_dict``; FSDP2 DTensor parameters and DCP."""

import io
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tunekit.config.errors import UserError
from tunekit.models.decoder_lm import decoder_lm
from tunekit.training.distributed_checkpoint import (
    load_sharded_state,
    save_sharded_state,
)
from tunekit.training.fsdp import shard_model
from tunekit.training.optimizers import AdamW, stochastic_round_to_bf16
from tunekit.training.process_group import destroy_distributed, init_distributed

sys.path.insert(0, str(Path(__file__).parent / "assets" / "distributed"))
from tiny_decoder import TinyDecoder, global_micro_batches, token_loss_sum

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 256
LR = 2e-5


def tiny_llama(dtype: torch.dtype) -> torch.nn.Module:
    """A 2-layer llama-shaped decoder (107k parameters) initialised like a Hugging Face checkpoint:
    matrices ~ N(0, 0.02), norm weights 1 (weight magnitudes, hence bf16 spacing, as in real models)."""
    torch.manual_seed(0)
    model = decoder_lm(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                       intermediate_dim=128, max_seq_len=64)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    return model.to(dtype)


# A tiny task: map each of 256 positions to a fixed token. Every token is an input once, so every
# embedding row gets a gradient at every step (rows without one move only by weight decay, in no
# dtype, which would say nothing about rounding).
_g = torch.Generator().manual_seed(1)
TOKENS = torch.randperm(VOCAB, generator=_g).view(4, 64)
TARGETS = torch.randperm(VOCAB, generator=_g).view(4, 64)


def fine_tune(dtype: torch.dtype, make_optimizer, steps: int) -> tuple[torch.Tensor, list[float]]:
    """(flat change of every weight after ``steps`` steps, in fp32; loss before each step)."""
    model = tiny_llama(dtype)
    start = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    optimizer = make_optimizer(model.parameters())
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(TOKENS).float().flatten(0, 1), TARGETS.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    end = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    return end - start, losses


def torch_adamw(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.01, fused=True)


def ours(bf16_update):
    return lambda params: AdamW(params, lr=LR, weight_decay=0.01, fused=True, bf16_update=bf16_update)


def test_stochastic_rounding_is_unbiased_and_keeps_representable_values():
    a = 1.0 + 2 ** -7  # a bf16 value; the next one up is 1 + 2^-6
    for x in (a + 2 ** -9, -(a + 3 * 2 ** -9), 3.1e-6, -1234.567):
        samples = torch.full((200_000,), x)
        rounded = stochastic_round_to_bf16(samples, torch.Generator().manual_seed(0)).float()
        low, high = rounded.unique().tolist()  # only the two bf16 neighbours of x
        assert low < x < high
        # the mean is x (float64 arithmetic) within 5 standard errors of a Bernoulli step
        p_up = (x - low) / (high - low)
        stderr = (high - low) * (p_up * (1 - p_up) / samples.numel()) ** 0.5
        assert abs(rounded.double().mean().item() - x) < 5 * stderr
    exact = torch.tensor([0.0, -0.0, 1.0, -3.5, float("inf"), -float("inf"), 2.0 ** -130])
    exact = exact.bfloat16().float()
    assert torch.equal(stochastic_round_to_bf16(exact).float(), exact)
    assert stochastic_round_to_bf16(torch.tensor([float("nan")])).isnan().all()


@pytest.mark.parametrize("kernel", [{}, {"foreach": True}, {"fused": True}], ids=["for-loop", "foreach", "fused"])
def test_fp32_parameters_are_updated_exactly_like_torch_adamw(kernel):
    torch.manual_seed(0)
    shapes = [(17, 5), (5,), (3, 4, 2)]
    ref = [torch.randn(s, requires_grad=True) for s in shapes]
    mine = [p.detach().clone().requires_grad_() for p in ref]

    def groups(ps):  # two groups with their own lr / weight decay
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0}]

    reference = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, **kernel)
    optimizer = AdamW(groups(mine), lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, **kernel)
    for _ in range(4):
        for p, q in zip(ref, mine):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        reference.step()
        optimizer.step()
    for p, q in zip(ref, mine):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(reference.state[p][key], optimizer.state[q][key])


def test_bf16_weights_keep_their_updates():
    """Pure-bf16 full fine-tune, lr 2e-5, 10 AdamW steps, compared with the same run in fp32.

    "Kept" is the projection of the bf16 run's weight change on the fp32 run's change,
    <d_bf16, d_fp32> / |d_fp32|^2: 1 when the updates arrive in full. Plain bf16 AdamW keeps about
    a third (0.36 measured) and moves about 30% of the weights; stochastic rounding keeps them all
    (1.00 measured) and fp32 master weights too (1.07: the bf16 copy is the master rounded, so its
    change is the master's plus up to half a bf16 step).

    The fraction of weights that moved: fp32 master weights move 99% (a weight moves once its
    accumulated update passes half a bf16 step). Stochastic rounding moves each weight at a step
    with probability |update| / bf16 step, so after 10 steps a weight stays with probability
    prod_k (1 - |u_k| / step): for N(0, 0.02) weights and |u_k| <= lr that is >= 11% -- the 95%
    of the issue cannot be reached by any unbiased per-step rounding at this lr and magnitude
    (88.8% measured; the bound from |u_k| = lr is 89%). Those weights did not lose their update:
    they carry it in expectation, which "kept" measures.
    """
    fp32_change, _ = fine_tune(torch.float32, torch_adamw, 10)
    results = {}
    for name, make in (("stochastic_round", ours("stochastic_round")), ("fp32_master", ours("fp32_master")),
                       ("torch_bf16", torch_adamw)):
        change, _ = fine_tune(torch.bfloat16, make, 10)
        results[name] = ((change != 0).double().mean().item(), (change @ fp32_change / fp32_change.square().sum()).item())
    moved, kept = {k: v[0] for k, v in results.items()}, {k: v[1] for k, v in results.items()}
    assert moved["torch_bf16"] < 0.35 and kept["torch_bf16"] < 0.5, results
    assert moved["stochastic_round"] > 0.85 and abs(kept["stochastic_round"] - 1) < 0.05, results
    assert moved["fp32_master"] >= 0.95 and abs(kept["fp32_master"] - 1) < 0.1, results


def test_bf16_loss_curve_tracks_fp32():
    """20 steps at lr 2e-5 on the tiny task: the fp32 loss falls by 0.059. Tolerance: every bf16 loss
    within 2e-3 of the fp32 loss at the same step (measured: 2.3e-4; the bf16 forward rounds
    activations to 8 significant bits and the random rounding adds noise, hence not tighter), and
    the total fall within 5% of fp32's (measured: 100.0%). A run that lost a tenth of its updates
    would be 6e-3 behind at the end; plain bf16 AdamW falls only 36% as far (asserted < 50%)."""
    _, fp32 = fine_tune(torch.float32, torch_adamw, 20)
    _, rounded = fine_tune(torch.bfloat16, ours("stochastic_round"), 20)
    _, plain = fine_tune(torch.bfloat16, torch_adamw, 20)
    fall = fp32[0] - fp32[-1]
    assert fall > 0.05
    assert max(abs(a - b) for a, b in zip(rounded, fp32)) < 2e-3, (rounded, fp32)
    assert abs((rounded[0] - rounded[-1]) / fall - 1) < 0.05
    assert (plain[0] - plain[-1]) / fall < 0.5


def _bf16_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g) * 0.02).bfloat16().requires_grad_() for s in [(33, 7), (7,), (2 ** 10,)]]


def _set_grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).mul_(1e-3).to(p.dtype)


@pytest.mark.parametrize("bf16_update", ["stochastic_round", "fp32_master", "nearest"])
def test_state_dict_round_trip_continues_bit_for_bit(bf16_update):
    params = _bf16_params()
    optimizer = AdamW(params, lr=1e-3, bf16_update=bf16_update, seed=7)
    for step in range(3):
        _set_grads(params, step)
        optimizer.step()
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [p.requires_grad_() for p in saved["params"]]
    other = AdamW(resumed, lr=1e-3, bf16_update=bf16_update, seed=7)
    other.load_state_dict(saved["optimizer"])
    if bf16_update == "fp32_master":  # torch's load would have cast the master to bf16
        assert all(other.state[p]["master"].dtype == torch.float32 for p in resumed)
        assert torch.equal(other.state[resumed[0]]["master"], optimizer.state[params[0]]["master"])
    for step in range(3, 6):
        for ps in (params, resumed):
            _set_grads(ps, step)
        optimizer.step()
        other.step()
    assert all(torch.equal(p, q) for p, q in zip(params, resumed))
    assert all(torch.equal(optimizer.state[p]["exp_avg_sq"], other.state[q]["exp_avg_sq"])
               for p, q in zip(params, resumed))


def test_rounding_depends_on_seed_and_step_not_on_global_rng():
    def run(seed, global_seed):
        params = _bf16_params()
        optimizer = AdamW(params, lr=1e-3, seed=seed)
        torch.manual_seed(global_seed)
        _set_grads(params, 0)
        optimizer.step()
        return params[2].detach().clone(), torch.rand(1)

    (a, ra), (b, rb), (c, _) = run(0, 0), run(0, 1), run(1, 0)
    assert torch.equal(a, b) and not torch.equal(ra, rb)  # global RNG neither used nor consumed
    assert torch.equal(run(0, 0)[1], ra)
    assert not torch.equal(a, c)


def test_fp32_master_is_exactly_torch_adamw_on_fp32_weights():
    params = _bf16_params()
    fp32 = [p.detach().float().requires_grad_() for p in params]
    optimizer = AdamW(params, lr=1e-3, weight_decay=0.1, bf16_update="fp32_master", fused=True)
    reference = torch.optim.AdamW(fp32, lr=1e-3, weight_decay=0.1, fused=True)
    for step in range(5):
        _set_grads(params, step)
        for p, q in zip(params, fp32):
            q.grad = p.grad.float()  # the same (bf16) gradients
        optimizer.step()
        reference.step()
    for p, q in zip(params, fp32):
        assert torch.equal(optimizer.state[p]["master"], q.detach())
        assert torch.equal(p.detach(), q.detach().bfloat16())  # the weight is the master's nearest bf16
        assert optimizer.state[p]["exp_avg"].dtype == torch.float32


def test_mixed_dtypes_and_bad_mode():
    fp32 = torch.randn(5, requires_grad=True)
    bf16 = torch.randn(5).bfloat16().requires_grad_()
    optimizer = AdamW([fp32, bf16], lr=1e-3)
    fp32.grad, bf16.grad = torch.ones(5), torch.ones(5, dtype=torch.bfloat16)
    optimizer.step()
    assert optimizer.state[fp32]["exp_avg"].dtype == torch.float32
    assert optimizer.state[bf16]["exp_avg"].dtype == torch.bfloat16
    with pytest.raises(UserError, match="optimizer.bf16_update must be one of stochastic_round, fp32_master"):
        AdamW([fp32], bf16_update="kahan")


def test_fsdp2_dtensor_parameters_and_dcp_resume(tmp_path, monkeypatch):
    """FSDP2 (fully_shard, one gloo process) on bf16 parameters: the update of each DTensor's local
    shard equals the unsharded update bit for bit (same rank and positions, so the same random
    bits), and a DCP save/load of model + optimizer (fp32 master kept in fp32) continues exactly."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    threads = torch.get_num_threads()

    def batch_step(model, optimizer, step):
        tokens, labels = global_micro_batches(step, 1, 2)[0]
        token_loss_sum(model, tokens, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    plain = TinyDecoder().bfloat16()
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    plain_opt = AdamW(plain.parameters(), lr=1e-3, bf16_update="fp32_master")
    for step in range(4):
        batch_step(plain, plain_opt, step)
    try:
        init_distributed("cpu")
        for mode in ("stochastic_round", "fp32_master"):
            sharded = TinyDecoder().bfloat16()
            sharded.load_state_dict(state)
            shard_model(sharded)
            optimizer = AdamW(sharded.parameters(), lr=1e-3, bf16_update=mode)
            reference = TinyDecoder().bfloat16()
            reference.load_state_dict(state)
            ref_opt = AdamW(reference.parameters(), lr=1e-3, bf16_update=mode)
            for step in range(2):
                batch_step(sharded, optimizer, step)
                batch_step(reference, ref_opt, step)
            for (name, p), q in zip(sharded.named_parameters(), reference.parameters()):
                assert type(p).__name__ == "DTensor" and p.dtype == torch.bfloat16, name
                assert torch.equal(p.to_local(), q.detach()), (mode, name)
        save_sharded_state(tmp_path, sharded, optimizer)  # fp32_master, after 2 steps
        resumed = TinyDecoder().bfloat16()
        shard_model(resumed)
        resumed_opt = AdamW(resumed.parameters(), lr=1e-3, bf16_update="fp32_master")
        load_sharded_state(tmp_path, resumed, resumed_opt)
        masters = [resumed_opt.state[p]["master"] for p in resumed.parameters()]
        assert all(m.dtype == torch.float32 for m in masters)
        for step in range(2, 4):
            batch_step(resumed, resumed_opt, step)
    finally:
        destroy_distributed()
        torch.set_num_threads(threads)
    for (name, p), q in zip(resumed.named_parameters(), plain.parameters()):
        assert torch.equal(p.to_local(), q.detach()), name
