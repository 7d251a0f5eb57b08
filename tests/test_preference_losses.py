"""tunekit.losses.preference against float64 references of each paper's formula (values and
gradients, small and large margins), a few properties, and TRL's own loss code when ``trl`` is
installed (test-only reference, TRL >= 1.0).

The references below are written from the papers (as TRL 1.x reads them, where TRL fixes a
convention: see docs/losses.md) in plain float64 arithmetic; they never call the module.
"""

from __future__ import annotations

import ast
import functools
import math
import warnings
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tunekit.config.errors import UserError
from tunekit.losses import preference as P



pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------------
# inputs


def make_batch(seed: int, scale: float, batch: int = 16, max_tokens: int = 12) -> dict[str, torch.Tensor]:
    """float64 inputs: policy/ref log-probs of chosen/rejected [B] and token counts [B].

    ``scale`` is the spread of the policy-reference log-ratios; with scale > 1 the policy's own
    per-token log-probs also range further (down to -90 nats per token), for the reference-free losses.
    """
    g = torch.Generator().manual_seed(seed)
    nc = torch.randint(1, max_tokens + 1, (batch,), generator=g)
    nr = torch.randint(1, max_tokens + 1, (batch,), generator=g)
    spread = 1.0 if scale <= 1 else 30.0
    avg_c = -(1e-3 + 3 * torch.rand(batch, generator=g, dtype=torch.float64)) * spread
    avg_r = -(1e-3 + 3 * torch.rand(batch, generator=g, dtype=torch.float64)) * spread
    pc, pr = avg_c * nc, avg_r * nr
    rc = pc + scale * torch.randn(batch, generator=g, dtype=torch.float64)
    rr = pr + scale * torch.randn(batch, generator=g, dtype=torch.float64)
    # values representable in fp32, so that the fp32 runs see exactly the reference's inputs
    exact = {k: v.float().double() for k, v in {"pc": pc, "pr": pr, "rc": rc, "rr": rr}.items()}
    return {**exact, "nc": nc, "nr": nr}


def to_logps(x: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[P.PreferenceLogps, torch.Tensor, torch.Tensor]:
    """PreferenceLogps in ``dtype`` whose policy log-probs are fresh leaves (returned too)."""
    pc = x["pc"].to(dtype, copy=True).requires_grad_()
    pr = x["pr"].to(dtype, copy=True).requires_grad_()
    logps = P.PreferenceLogps(pc, pr, x["rc"].to(dtype), x["rr"].to(dtype), x["nc"], x["nr"])
    return logps, pc, pr


# ------------------------------------------------------------------------------------------------
# float64 references, from the papers


def logsig(x):  # log sigma(x) = min(x, 0) - log(1 + exp(-|x|)), exact for any x
    return torch.clamp(x, max=0) - torch.log1p(torch.exp(-x.abs()))


def sig(x):
    return torch.exp(logsig(x))


def f_prime(logratio, kind, alpha):
    if kind == "reverse_kl":  # f(u) = u log u: f'(u) - 1 = log u, the log-ratio itself
        return logratio
    u = torch.exp(logratio)
    if kind == "forward_kl":  # f(u) = u - 1 - log u
        return 1 - 1 / u
    if kind == "js_divergence":  # f(u) = u log u - (1 + u) log((1 + u) / 2)
        return torch.log(2 * u / (1 + u))
    a = 1 - alpha  # the paper's alpha-divergence f'(u) = (1 - u^-a) / a, with a = 1 - TRL's alpha
    return (1 - u ** (-a)) / a


def reference(name: str, x: dict, hp: dict, pc, pr) -> torch.Tensor:
    """Per-example losses of ``name`` in float64 for policy log-probs pc, pr (leaves)."""
    beta = hp.get("beta", 0.1)
    eps = hp.get("label_smoothing", 0.0)
    rc, rr = x["rc"], x["rr"]
    nc, nr = x["nc"].double(), x["nr"].double()
    lr_c, lr_r = pc - rc, pr - rr
    kind, alpha = hp.get("f_divergence_type", "reverse_kl"), hp.get("f_alpha_divergence_coef", 0.5)
    s_c, s_r = f_prime(lr_c, kind, alpha), f_prime(lr_r, kind, alpha)
    z = beta * (s_c - s_r)
    nll = -pc / nc.mean()  # mean over the batch = -sum(pc) / sum(nc): the token-mean NLL

    def cdpo(t):
        return -(1 - eps) * logsig(t) - eps * logsig(-t)

    if name == "sigmoid":
        return cdpo(z)
    if name == "hinge":
        return torch.clamp(1 - z, min=0)
    if name == "ipo":
        return (s_c / nc - s_r / nr - 1 / (2 * beta)) ** 2
    if name == "exo_pair":
        return sig(z) * (logsig(z) - math.log(1 - eps)) + sig(-z) * (logsig(-z) - math.log(eps))
    if name == "nca_pair":
        return -logsig(beta * lr_c) - 0.5 * logsig(-beta * lr_c) - 0.5 * logsig(-beta * lr_r)
    if name == "robust":
        return ((1 - eps) * -logsig(z) - eps * -logsig(-z)) / (1 - 2 * eps)
    if name == "bco_pair":
        delta = hp.get("bco_reward_shift", 0.0)
        return -logsig(beta * lr_c - delta) - logsig(-(beta * lr_r - delta))
    if name == "sppo_hard":
        return (lr_c - 1 / (2 * beta)) ** 2 + (lr_r + 1 / (2 * beta)) ** 2
    if name == "aot":
        return cdpo(beta * (torch.sort(pc - pr).values - torch.sort(rc - rr).values))
    if name == "aot_unpaired":
        return cdpo(beta * (torch.sort(lr_c).values - torch.sort(lr_r).values))
    if name == "apo_zero":
        return (1 - sig(beta * lr_c)) + sig(beta * lr_r)
    if name == "apo_down":
        return sig(beta * lr_c) + (1 - sig(beta * (lr_c - lr_r)))
    if name == "discopop":
        m = sig(z / hp.get("discopop_tau", 0.05))
        return (1 - m) * -logsig(z) + m * torch.exp(-z)
    if name == "sigmoid_norm":
        return -logsig(beta * (s_c / nc - s_r / nr))
    if name == "sft":
        return nll
    if name == "simpo":
        return cdpo(beta * (pc / nc - pr / nr) - hp.get("simpo_gamma", 0.5))
    if name == "cpo":
        return cdpo(beta * (pc - pr)) + hp.get("cpo_alpha", 1.0) * nll
    if name == "orpo":
        prob_c, prob_r = torch.exp(pc / nc), torch.exp(pr / nr)
        log_odds = torch.log(prob_c / (1 - prob_c)) - torch.log(prob_r / (1 - prob_r))
        return nll - beta * logsig(log_odds)
    raise AssertionError(name)


def reference_rewards(name, x, hp, pc, pr):
    beta = hp.get("beta", 0.1)
    if name in ("simpo", "orpo"):
        return beta * pc / x["nc"], beta * pr / x["nr"]
    if name == "cpo":
        return beta * pc, beta * pr
    return beta * (pc - x["rc"]), beta * (pr - x["rr"])


# (loss name, hyper-parameters) for every loss; f-divergence variants use moderate margins only
# (1 - 1/u of forward KL overflows for log-ratios below ~ -88 in fp32, in TRL as here).
CASES = [
    ("sigmoid", {}), ("sigmoid", {"label_smoothing": 0.1}), ("hinge", {}), ("ipo", {"beta": 0.5}),
    ("exo_pair", {"label_smoothing": 1e-3}), ("nca_pair", {}), ("robust", {"label_smoothing": 0.1}),
    ("bco_pair", {}), ("bco_pair", {"bco_reward_shift": 0.3}), ("sppo_hard", {}), ("aot", {}),
    ("aot", {"label_smoothing": 0.05}), ("aot_unpaired", {"label_smoothing": 0.05}), ("apo_zero", {}),
    ("apo_down", {}), ("discopop", {}), ("discopop", {"discopop_tau": 0.5}), ("sigmoid_norm", {"beta": 1.0}),
    ("sft", {}), ("simpo", {"beta": 2.0, "simpo_gamma": 0.5}), ("simpo", {"beta": 2.5, "label_smoothing": 0.1}),
    ("cpo", {}), ("cpo", {"cpo_alpha": 0.0, "label_smoothing": 0.1}), ("orpo", {}),
]
F_KINDS = (("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 2.0))
F_CASES = [
    (name, {"f_divergence_type": kind, "f_alpha_divergence_coef": alpha,
            "label_smoothing": {"exo_pair": 1e-3, "robust": 0.1}.get(name, 0.0)})
    for name in ("sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm")
    for kind, alpha in F_KINDS
]


def _case_id(case):
    name, hp = case
    return name + "".join(f"-{k}={v}" for k, v in hp.items())


def _run(name, hp, logps):
    return P.preference_loss(name, logps, **{"beta": 0.1, **hp})


def _check_against_reference(name, hp, x):
    weights = torch.linspace(0.5, 1.5, len(x["pc"]), dtype=torch.float64)  # catches per-example mix-ups
    ref_pc, ref_pr = x["pc"].clone().requires_grad_(), x["pr"].clone().requires_grad_()
    expected = reference(name, x, hp, ref_pc, ref_pr)
    (expected * weights).sum().backward()
    assert torch.isfinite(expected).all()

    for dtype, rtol, atol, grad_rtol, grad_atol in ((torch.float64, 1e-10, 1e-12, 1e-9, 1e-12),
                                                    (torch.float32, 1e-5, 1e-5, 1e-4, 1e-6)):
        logps, pc, pr = to_logps(x, dtype)
        out = _run(name, hp, logps)
        assert out.losses.dtype == dtype and out.losses.shape == x["pc"].shape
        torch.testing.assert_close(out.losses.double(), expected.detach(), rtol=rtol, atol=atol)
        (out.losses * weights.to(dtype)).sum().backward()
        for grad, expected_grad in ((pc.grad, ref_pc.grad), (pr.grad, ref_pr.grad)):
            if expected_grad is None:  # sft does not read the rejected log-probs
                assert grad is None
            else:
                torch.testing.assert_close(grad.double(), expected_grad, rtol=grad_rtol, atol=grad_atol)
        if name != "sft":
            chosen, rejected = reference_rewards(name, x, hp, x["pc"], x["pr"])
            assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
            torch.testing.assert_close(out.chosen_rewards.double(), chosen, rtol=rtol, atol=atol)
            torch.testing.assert_close(out.rejected_rewards.double(), rejected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("scale", [1.0, 300.0], ids=["small-margins", "large-margins"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_loss_equals_float64_paper_formula(case, scale):
    name, hp = case
    _check_against_reference(name, hp, make_batch(seed=len(name) + int(scale), scale=scale))


@pytest.mark.parametrize("case", F_CASES, ids=_case_id)
def test_f_divergence_variants_equal_float64_formula(case):
    name, hp = case
    _check_against_reference(name, hp, make_batch(seed=7, scale=4.0))


def test_alpha_divergence_stays_finite_beyond_exp_range():
    # (alpha - 1) * logratio = 200 would overflow exp in fp32: clamped (as TRL), loss finite, saturated
    x = make_batch(seed=3, scale=1.0)
    x["rc"] = x["pc"] - 400.0
    logps, pc, _ = to_logps(x, torch.float32)
    out = P.preference_loss("sigmoid", logps, beta=0.1, f_divergence_type="alpha_divergence",
                            f_alpha_divergence_coef=1.5)
    out.losses.sum().backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(pc.grad).all()


# ------------------------------------------------------------------------------------------------
# properties


@pytest.mark.parametrize("kind", P.F_DIVERGENCE_TYPES)
@pytest.mark.parametrize("name", ["sigmoid", "sigmoid_norm"])
def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(name, kind):
    x = make_batch(seed=0, scale=1.0)
    logps = P.PreferenceLogps(x["pc"].float(), x["pr"].float(), x["pc"].float(), x["pr"].float(), x["nc"], x["nr"])
    out = P.preference_loss(name, logps, beta=0.1, f_divergence_type=kind)
    torch.testing.assert_close(out.losses, torch.full_like(out.losses, math.log(2)), rtol=0, atol=1e-7)
    assert torch.equal(out.chosen_rewards, torch.zeros_like(out.chosen_rewards))
    assert torch.equal(out.rejected_rewards, torch.zeros_like(out.rejected_rewards))
    means = P.metric_means(P.preference_metric_sums(out.chosen_rewards, out.rejected_rewards,
                                                    logps.policy_chosen, logps.policy_rejected))
    assert means["rewards/chosen"] == means["rewards/margins"] == means["rewards/accuracies"] == 0.0


def test_label_smoothing_zero_is_plain_dpo():
    x = make_batch(seed=1, scale=30.0)
    logps, _, _ = to_logps(x, torch.float32)
    margin = (logps.policy_chosen - logps.ref_chosen) - (logps.policy_rejected - logps.ref_rejected)
    plain = -F.logsigmoid(0.1 * margin)
    assert torch.equal(P.preference_loss("sigmoid", logps, beta=0.1, label_smoothing=0.0).losses, plain)
    assert torch.equal(P.sigmoid_loss(logps, beta=0.1).losses, plain)
    assert not torch.equal(P.sigmoid_loss(logps, beta=0.1, label_smoothing=0.1).losses, plain)


def test_weighted_list_is_the_weighted_sum():
    x = make_batch(seed=2, scale=3.0)
    logps, _, _ = to_logps(x, torch.float64)
    mpo = P.preference_loss(["sigmoid", "bco_pair", "sft"], logps, beta=0.1, loss_weights=[0.8, 0.2, 1.0])
    parts = [P.sigmoid_loss(logps, beta=0.1), P.bco_pair_loss(logps, beta=0.1), P.sft_loss(logps)]
    torch.testing.assert_close(mpo.losses, 0.8 * parts[0].losses + 0.2 * parts[1].losses + parts[2].losses,
                               rtol=1e-14, atol=0)
    assert torch.equal(mpo.chosen_rewards, parts[0].chosen_rewards)
    rpo = P.preference_loss(["sigmoid", "sft"], logps, beta=0.1)  # weights default to 1.0
    torch.testing.assert_close(rpo.losses, parts[0].losses + parts[2].losses, rtol=1e-14, atol=0)
    # a list of only sft reports DPO's implicit rewards when the reference is there, none without
    assert torch.equal(P.preference_loss(["sft"], logps, beta=0.1).chosen_rewards, parts[0].chosen_rewards)
    no_ref = P.PreferenceLogps(logps.policy_chosen, logps.policy_rejected, chosen_tokens=logps.chosen_tokens)
    assert P.preference_loss("sft", no_ref, beta=0.1).chosen_rewards is None
    # reference-free lists report their own rewards (simpo: beta * average log-prob)
    simpo = P.preference_loss(["simpo", "sft"], logps, beta=2.0)
    torch.testing.assert_close(simpo.chosen_rewards, 2.0 * logps.policy_chosen.detach() / x["nc"])


def test_sft_is_the_token_mean_nll_and_takes_a_global_token_count():
    x = make_batch(seed=4, scale=1.0)
    logps, _, _ = to_logps(x, torch.float64)
    out = P.sft_loss(logps)
    torch.testing.assert_close(out.losses.mean(), -x["pc"].sum() / x["nc"].sum())
    # accumulating over micro-batches: the mean tokens per pair of all of them normalises each
    out = P.sft_loss(logps, mean_chosen_tokens=7.5)
    torch.testing.assert_close(out.losses, -x["pc"] / 7.5)


def test_bco_running_mean_is_explicit_state():
    state = P.RunningMean()
    assert state.mean == 0.0
    batches = [make_batch(seed=s, scale=2.0) for s in range(3)]
    means = []
    for x in batches:
        logps, _, _ = to_logps(x, torch.float64)
        batch_mean = P.bco_reward_mean(logps, beta=0.1)
        assert not batch_mean.requires_grad and batch_mean.dim() == 0
        torch.testing.assert_close(batch_mean, 0.1 * torch.cat([x["pc"] - x["rc"], x["pr"] - x["rr"]]).mean())
        means.append(float(batch_mean))
        new_state = state.update(batch_mean)
        assert state.count == len(means) - 1  # update returns a new state, the old one is unchanged
        state = new_state
        assert state.mean == pytest.approx(sum(means) / len(means), rel=1e-12)
        out = P.preference_loss("bco_pair", logps, beta=0.1, bco_reward_shift=state.mean)
        hp = {"bco_reward_shift": state.mean}
        torch.testing.assert_close(out.losses, reference("bco_pair", x, hp, x["pc"], x["pr"]))


def test_kto_kl_estimate_is_a_detached_mean():
    policy_kl = torch.randn(8, dtype=torch.float64, requires_grad=True)
    ref_kl = torch.randn(8, dtype=torch.float64)
    kl = P.kto_kl_estimate(policy_kl, ref_kl)
    assert kl.dim() == 0 and not kl.requires_grad
    torch.testing.assert_close(kl, (policy_kl - ref_kl).mean().detach())


def kto_reference(policy, ref, desirable, kl, beta, wd, wu, loss_type):
    r = beta * (policy - ref)
    z0 = max(float(kl), 0.0) if loss_type == "kto" else 0.0
    good = wd * (1 - sig(r - beta * z0))
    bad = wu * (1 - sig(beta * z0 - r)) if loss_type == "kto" else wu * sig(r)
    return torch.where(desirable, good, bad)


@pytest.mark.parametrize("kl", [0.7, -0.3], ids=["kl>0", "kl<0-clamped"])
@pytest.mark.parametrize("loss_type", P.KTO_LOSS_TYPES)
@pytest.mark.parametrize("scale", [1.0, 300.0], ids=["small-margins", "large-margins"])
def test_kto_equals_float64_paper_formula(loss_type, kl, scale):
    g = torch.Generator().manual_seed(5)
    policy = -30 * torch.rand(16, generator=g, dtype=torch.float64)
    ref = policy + scale * torch.randn(16, generator=g, dtype=torch.float64)
    desirable = torch.rand(16, generator=g) < 0.6
    ref_policy = policy.clone().requires_grad_()
    expected = kto_reference(ref_policy, ref, desirable, kl, 0.1, 1.0, 1.33, loss_type)
    expected.sum().backward()
    for dtype, tol, grad_tol in ((torch.float64, 1e-12, 1e-12), (torch.float32, 1e-6, 1e-6)):
        p = policy.to(dtype, copy=True).requires_grad_()
        kl_tensor = torch.tensor(kl, dtype=dtype, requires_grad=True)  # must not receive a gradient
        out = P.kto_loss(p, ref.to(dtype), desirable, beta=0.1, kl=kl_tensor, desirable_weight=1.0,
                         undesirable_weight=1.33, loss_type=loss_type)
        assert out.losses.dtype == dtype
        torch.testing.assert_close(out.losses.double(), expected.detach(), rtol=tol, atol=tol)
        out.losses.sum().backward()
        torch.testing.assert_close(p.grad.double(), ref_policy.grad, rtol=1e-5, atol=grad_tol)
        assert kl_tensor.grad is None
        torch.testing.assert_close(out.rewards.double(), 0.1 * (policy - ref), rtol=tol, atol=tol)


def test_metric_sums_add_over_micro_batches():
    x = make_batch(seed=6, scale=3.0)
    logps, _, _ = to_logps(x, torch.float64)
    out = P.sigmoid_loss(logps, beta=0.1)
    whole = P.preference_metric_sums(out.chosen_rewards, out.rejected_rewards, logps.policy_chosen,
                                     logps.policy_rejected)
    halves = [P.preference_metric_sums(out.chosen_rewards[s], out.rejected_rewards[s], logps.policy_chosen[s],
                                       logps.policy_rejected[s]) for s in (slice(0, 5), slice(5, None))]
    added = {k: halves[0][k] + halves[1][k] for k in whole}
    means = P.metric_means(added)
    c, r = out.chosen_rewards, out.rejected_rewards
    assert means == pytest.approx({
        "rewards/chosen": float(c.mean()), "rewards/rejected": float(r.mean()),
        "rewards/accuracies": float((c > r).double().mean()), "rewards/margins": float((c - r).mean()),
        "logps/chosen": float(x["pc"].mean()), "logps/rejected": float(x["pr"].mean())}, rel=1e-12)
    # KTO: separate counts; margins = difference of the means; a side without examples is left out
    rewards = torch.tensor([1.0, 2.0, -1.0, 0.5])
    desirable = torch.tensor([True, True, False, False])
    kto = P.metric_means(P.kto_metric_sums(rewards, 10 * rewards, desirable))
    assert kto == pytest.approx({"rewards/chosen": 1.5, "rewards/rejected": -0.25, "logps/chosen": 15.0,
                                 "logps/rejected": -2.5, "rewards/margins": 1.75})
    only_good = P.metric_means(P.kto_metric_sums(rewards, rewards, torch.ones(4, dtype=torch.bool)))
    assert set(only_good) == {"rewards/chosen", "logps/chosen"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_every_loss_computes_in_the_given_dtype(dtype):
    logps, _, _ = to_logps(make_batch(seed=8, scale=1.0), dtype)
    for name in P.PREFERENCE_LOSS_TYPES:
        out = P.preference_loss(name, logps, beta=0.1, label_smoothing=1e-3)
        assert out.losses.dtype == dtype and torch.isfinite(out.losses).all(), name


@pytest.mark.parametrize("kwargs, message", [
    ({"loss_type": "sigmod"}, r"'sigmod' is not a preference loss \(valid: sigmoid, hinge.*did you mean sigmoid\?"),
    ({"loss_type": ["sigmoid", "hing"]}, r"'hing'.*did you mean hinge\?"),
    ({"loss_type": "kto"}, r"'kto'.*kto_loss"),
    ({"loss_type": []}, r"loss_type is empty"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, r"loss_weights \[1.0\] has 1 value.*has 2"),
    ({"loss_type": "sigmoid", "loss_weights": [float("nan")]}, r"not a finite number"),
    ({"loss_type": "sigmoid", "beta": 0.0}, r"beta must be a positive number, got 0.0"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, r"'robust' needs label_smoothing.*\[0, 0.5\), got 0.5"),
    ({"loss_type": "exo_pair"}, r"'exo_pair' needs label_smoothing > 0"),
    ({"loss_type": "sigmoid", "label_smoothing": 1.0}, r"label_smoothing must be in \[0, 1\), got 1.0"),
    ({"loss_type": "sigmoid", "f_divergence_type": "forward-kl"},
     r"'forward-kl' is not one of.*did you mean forward_kl\?"),
    ({"loss_type": ["sigmoid", "nca_pair"], "f_divergence_type": "js_divergence"},
     r"applies only to .*not to nca_pair"),
    ({"loss_type": "discopop", "discopop_tau": -1.0}, r"discopop_tau must be a positive number"),
])
def test_user_errors_name_the_bad_value(kwargs, message):
    logps, _, _ = to_logps(make_batch(seed=9, scale=1.0), torch.float32)
    kwargs = {"beta": 0.1, **kwargs}
    with pytest.raises(UserError, match=message):
        P.preference_loss(kwargs.pop("loss_type"), logps, **kwargs)


def test_kto_loss_type_is_checked_and_missing_inputs_are_reported():
    t = torch.zeros(4)
    with pytest.raises(UserError, match=r"'kot' is not one of kto, apo_zero_unpaired; did you mean kto\?"):
        P.kto_loss(t, t, t.bool(), beta=0.1, kl=0.0, loss_type="kot")
    with pytest.raises(ValueError, match="needs kl"):
        P.kto_loss(t, t, t.bool(), beta=0.1)
    no_ref = P.PreferenceLogps(t, t, chosen_tokens=t)
    with pytest.raises(ValueError, match="'sigmoid' needs reference log-probs"):
        P.preference_loss("sigmoid", no_ref, beta=0.1)
    with pytest.raises(ValueError, match="'simpo' needs PreferenceLogps.rejected_tokens"):
        P.preference_loss("simpo", no_ref, beta=0.1)
    with pytest.raises(ValueError, match="ref_chosen is \\[3\\], policy_chosen is \\[4\\]"):
        P.PreferenceLogps(t, t, torch.zeros(3), t)
    assert set(P.PREFERENCE_LOSS_TYPES) >= set(P.F_DIVERGENCE_LOSS_TYPES)


# ------------------------------------------------------------------------------------------------
# TRL's own loss code as a reference (skipped without trl)
#
# TRL's trainer modules import `datasets` (and `pandas`) at the top, which `pip install trl
# --no-deps` leaves out; only the loss code is needed here, so the methods are compiled from the
# installed TRL source files with ast, into a namespace holding what they use, and called with a
# stand-in `self` carrying the attributes they read. The model forward is replaced by tensors
# built here, so TRL and tunekit see the same per-token log-probs.


@functools.lru_cache(maxsize=None)
def _parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def trl_function(relative_path: str, class_name: str | None, name: str, namespace: dict | None = None):
    trl = pytest.importorskip("trl", minversion="1.0")
    path = Path(trl.__file__).parent / relative_path
    if not path.is_file():
        pytest.skip(f"trl {trl.__version__} has no {relative_path}")
    body = _parsed(path).body
    if class_name is not None:
        body = next((c.body for c in body if isinstance(c, ast.ClassDef) and c.name == class_name), [])
    function = next((f for f in body if isinstance(f, ast.FunctionDef) and f.name == name), None)
    if function is None:
        pytest.skip(f"trl {trl.__version__}: no {class_name}.{name} in {relative_path}")
    function.decorator_list = []
    for arg in [*function.args.args, *function.args.kwonlyargs]:
        arg.annotation = None  # annotations may name types of modules not imported here
    function.returns = None
    scope = {"torch": torch, "F": F, "nn": nn, "math": math, "warnings": warnings, **(namespace or {})}
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(path), "exec"), scope)
    return scope[name]


def _accelerator():
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)


def _completion_batch(nc, nr, sums, seed):
    """Per-token log-probs [2B, T] (chosen rows, then rejected) summing to ``sums`` over each
    row's completion tokens, plus TRL's completion_mask [2B, T + 1] (position 0 is the prompt)."""
    lengths = torch.cat([nc, nr])
    width = int(lengths.max())
    mask = torch.arange(width)[None, :] < lengths[:, None]
    g = torch.Generator().manual_seed(seed)
    shares = torch.rand(mask.shape, generator=g, dtype=torch.float64) * mask + 1e-3 * mask
    per_token = (sums[:, None] * shares / shares.sum(1, keepdim=True)).float()
    completion_mask = torch.cat([torch.zeros(len(lengths), 1, dtype=torch.long), mask.long()], dim=1)
    return per_token, completion_mask


DPO_TRL_CASES = [
    ([name], {"label_smoothing": {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.05, "aot_unpaired": 0.05}.get(name, 0.0),
              "beta": {"ipo": 0.5, "sigmoid_norm": 1.0}.get(name, 0.1)}, scale)
    for name in P.DPO_LOSS_TYPES for scale in (1.0, 300.0)
] + [
    ([name], {"f_divergence_type": kind, "f_alpha_divergence_coef": alpha,
              "label_smoothing": {"exo_pair": 1e-3, "robust": 0.1}.get(name, 0.0)}, 4.0)
    for name in sorted(P.F_DIVERGENCE_LOSS_TYPES - {"sft"})  # sft does not read the scores
    for kind, alpha in F_KINDS
] + [
    (["sigmoid", "sft"], {}, 3.0),  # RPO
    (["sigmoid", "bco_pair", "sft"], {"loss_weights": [0.8, 0.2, 1.0]}, 3.0),  # MPO
    (["ipo", "discopop"], {"loss_weights": [0.3, 2.0], "discopop_tau": 0.2, "beta": 0.3}, 3.0),
]


def _dpo_case_id(names, hp, scale):
    divergence = f"-{hp['f_divergence_type']}={hp['f_alpha_divergence_coef']}" if "f_divergence_type" in hp else ""
    return f"{'+'.join(names)}{divergence}-scale={scale}"


@pytest.mark.parametrize("names, hp, scale", DPO_TRL_CASES, ids=[_dpo_case_id(*case) for case in DPO_TRL_CASES])
def test_matches_trl_dpo_trainer(names, hp, scale):
    compute_loss = trl_function("trainer/dpo_trainer.py", "DPOTrainer", "_compute_loss")
    x = make_batch(seed=11, scale=scale)
    batch = len(x["pc"])
    per_token, completion_mask = _completion_batch(x["nc"], x["nr"], torch.cat([x["pc"], x["pr"]]), seed=12)
    hp = {"beta": 0.1, "label_smoothing": 0.0, "f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5,
          "discopop_tau": 0.05, **hp}
    rc, rr = x["rc"].float(), x["rr"].float()

    trl_tokens = per_token.clone().requires_grad_()
    outputs = SimpleNamespace(log_probs=trl_tokens, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token),
                              is_top1=torch.zeros(per_token.shape, dtype=torch.bool))
    trl_self = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False,
        precompute_ref_logps=True, ld_alpha=None, use_weighting=False, beta=hp["beta"], loss_types=list(names),
        loss_weights=hp.get("loss_weights") or [1.0] * len(names), f_divergence_type=hp["f_divergence_type"],
        f_alpha_divergence_coef=hp["f_alpha_divergence_coef"], label_smoothing=hp["label_smoothing"],
        args=SimpleNamespace(discopop_tau=hp["discopop_tau"], gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
    trl_loss = compute_loss(trl_self, lambda **_: outputs, inputs, return_outputs=False)
    trl_loss.backward()

    our_tokens = per_token.clone().requires_grad_()
    sums = our_tokens.sum(dim=1)  # the same reduction TRL applies to the same tensor
    counts = completion_mask[:, 1:].sum(1)
    logps = P.PreferenceLogps(sums[:batch], sums[batch:], rc, rr, counts[:batch], counts[batch:])
    out = P.preference_loss(names, logps, **hp)
    ours = out.losses.mean()
    ours.backward()

    if not torch.isfinite(trl_loss):
        # TRL's discopop computes exp(-z) * sigma(z / tau) as written: inf * 0 = nan for z << 0
        assert names == ["discopop"] and scale > 1 and torch.isfinite(ours), (names, trl_loss)
        return
    torch.testing.assert_close(ours, trl_loss, rtol=1e-5, atol=1e-5)
    # only the completion positions: TRL's sft reads the masked positions (0 there), the rest a sum over all
    completion = completion_mask[:, 1:].bool()
    torch.testing.assert_close(our_tokens.grad[completion], trl_tokens.grad[completion], rtol=1e-4, atol=1e-6)
    means = P.metric_means(P.preference_metric_sums(out.chosen_rewards, out.rejected_rewards,
                                                    logps.policy_chosen, logps.policy_rejected))
    trl_metrics = {k: v[0] for k, v in trl_self._metrics["train"].items() if k in means}
    assert trl_metrics.keys() == means.keys()
    assert means == pytest.approx(trl_metrics, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("loss_type, kl_shift", [("kto", 2.0), ("kto", -2.0), ("apo_zero_unpaired", 0.0)])
@pytest.mark.parametrize("scale", [1.0, 300.0], ids=["small-margins", "large-margins"])
def test_matches_trl_kto_trainer(loss_type, kl_shift, scale):
    compute_loss = trl_function("trainer/kto_trainer.py", "KTOTrainer", "_compute_loss")
    g = torch.Generator().manual_seed(13)
    batch = 12
    nc = torch.randint(1, 9, (batch,), generator=g)
    policy = -3 * torch.rand(batch, generator=g, dtype=torch.float64) * nc
    ref = (policy + scale * torch.randn(batch, generator=g, dtype=torch.float64)).float()
    kl_policy = (-20 * torch.rand(batch, generator=g)).float()
    kl_ref = kl_policy - kl_shift + torch.randn(batch, generator=g)
    desirable = torch.rand(batch, generator=g) < 0.5
    per_token, completion_mask = _completion_batch(nc, nc[:0], policy, seed=14)

    trl_tokens = per_token.clone().requires_grad_()
    outputs = SimpleNamespace(log_probs=trl_tokens, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token))
    trl_self = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False,
        calculate_KL=loss_type == "kto", precompute_ref_logps=True, loss_type=loss_type, beta=0.1,
        desirable_weight=1.0, undesirable_weight=1.33, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, _compute_kl_logps=lambda model, batch: kl_policy)
    inputs = {"input_ids": torch.zeros_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "label": desirable, "ref_logps": ref, "ref_KL_logps": kl_ref}
    trl_loss = compute_loss(trl_self, lambda **_: outputs, inputs, return_outputs=False)
    trl_loss.backward()

    our_tokens = per_token.clone().requires_grad_()
    logps = our_tokens.sum(dim=1)
    kl = P.kto_kl_estimate(kl_policy, kl_ref) if loss_type == "kto" else None
    out = P.kto_loss(logps, ref, desirable, beta=0.1, kl=kl, desirable_weight=1.0, undesirable_weight=1.33,
                     loss_type=loss_type)
    ours = out.losses.mean()
    ours.backward()

    torch.testing.assert_close(ours, trl_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(our_tokens.grad, trl_tokens.grad, rtol=1e-4, atol=1e-8)
    means = P.metric_means(P.kto_metric_sums(out.rewards, logps, desirable))
    trl_metrics = {k: v[0] for k, v in trl_self._metrics["train"].items() if k in means}
    assert trl_metrics.keys() == means.keys()
    assert means == pytest.approx(trl_metrics, rel=1e-5, abs=1e-6)
    if loss_type == "kto":
        assert trl_self._metrics["train"]["kl"][0] == pytest.approx(max(float(kl), 0.0), rel=1e-6)


def _logits_batch(seed, scale, batch=8, width=10, vocab=11):
    """Random logits and labels of B chosen then B rejected rows, completion mask, and TRL's -100 labels."""
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(2 * batch, width, vocab, generator=g)
    labels = torch.randint(vocab, (2 * batch, width), generator=g)
    lengths = torch.randint(1, width + 1, (2 * batch,), generator=g)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return logits, labels, mask, labels.masked_fill(~mask, -100)


def _sequence_logps(logits, labels, mask):
    per_token = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (per_token * mask).sum(-1)


@pytest.mark.parametrize("trainer", ["cpo", "simpo", "orpo"])
@pytest.mark.parametrize("scale", [1.0, 30.0], ids=["small-margins", "large-margins"])
def test_matches_trl_cpo_and_orpo_trainers(trainer, scale):
    logits, labels, mask, trl_labels = _logits_batch(seed=15, scale=scale)
    batch = len(logits) // 2
    beta = {"cpo": 0.1, "simpo": 2.0, "orpo": 0.1}[trainer]
    label_smoothing = 0.1 if trainer == "cpo" else 0.0
    cpo_alpha = {"cpo": 1.0, "simpo": 0.0, "orpo": 1.0}[trainer]

    trl_logits = logits.clone().requires_grad_()

    def concatenated_forward(model, batch_):
        # TRL's forward minus the model: CPO's NLL is the cross-entropy over the chosen completion
        # tokens; ORPO's over the whole chosen sequence in TRL, here over the completion (paper)
        sums = _sequence_logps(trl_logits, labels, mask)
        logps = sums if trainer == "cpo" else sums / mask.sum(-1)
        nll = nn.CrossEntropyLoss()(trl_logits[:batch].reshape(-1, logits.shape[-1]), trl_labels[:batch].reshape(-1))
        return logps[:batch], logps[batch:], trl_logits[:batch], trl_logits[batch:], nll

    if trainer == "orpo":
        loss_fn = trl_function("experimental/orpo/orpo_trainer.py", "ORPOTrainer", "odds_ratio_loss",
                               {"log1mexp": trl_function("experimental/orpo/orpo_trainer.py", None, "log1mexp")})
        metrics_fn = trl_function("experimental/orpo/orpo_trainer.py", "ORPOTrainer", "get_batch_loss_metrics",
                                  {"is_torch_xla_available": lambda: False})
        trl_self = SimpleNamespace(beta=beta, accelerator=_accelerator(), aux_loss_enabled=False,
                                   concatenated_forward=concatenated_forward)
        trl_self.odds_ratio_loss = functools.partial(loss_fn, trl_self)
    else:
        loss_fn = trl_function("experimental/cpo/cpo_trainer.py", "CPOTrainer", "cpo_loss")
        metrics_fn = trl_function("experimental/cpo/cpo_trainer.py", "CPOTrainer", "get_batch_loss_metrics")
        trl_self = SimpleNamespace(beta=beta, accelerator=_accelerator(), aux_loss_enabled=False, alpha=0.0,
                                   loss_type="simpo" if trainer == "simpo" else "sigmoid", simpo_gamma=0.5,
                                   label_smoothing=label_smoothing, cpo_alpha=cpo_alpha,
                                   concatenated_forward=concatenated_forward)
        trl_self.cpo_loss = functools.partial(loss_fn, trl_self)
    trl_loss, trl_metrics = metrics_fn(trl_self, None, {}, "train")
    trl_loss.backward()

    our_logits = logits.clone().requires_grad_()
    sums = _sequence_logps(our_logits, labels, mask)
    counts = mask.sum(-1)
    logps = P.PreferenceLogps(sums[:batch], sums[batch:], chosen_tokens=counts[:batch], rejected_tokens=counts[batch:])
    out = P.preference_loss(trainer, logps, beta=beta, label_smoothing=label_smoothing, cpo_alpha=cpo_alpha,
                            simpo_gamma=0.5)
    ours = out.losses.mean()
    ours.backward()

    torch.testing.assert_close(ours, trl_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_logits.grad, trl_logits.grad, rtol=1e-4, atol=1e-7)
    # rewards only: TRL's CPO/ORPO log the length-averaged log-probs as logps/* where their loss uses them
    means = P.metric_means(P.preference_metric_sums(out.chosen_rewards, out.rejected_rewards, sums[:batch],
                                                    sums[batch:]))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"):
        assert means[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key
