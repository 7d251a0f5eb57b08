"""Preference-tuning losses (the DPO family, SimPO / CPO / ORPO, KTO) as pure functions of
per-sequence log-probabilities.

Conventions shared by every function here:

- A *log-prob* of a completion is the SUM over its tokens of ``log p(token | prefix)`` under a
  model (prompt tokens excluded): a float tensor of shape ``[B]``, one value per sequence.
  ``policy_*`` come from the model being trained, ``ref_*`` from the frozen reference.
  Token counts (``chosen_tokens`` / ``rejected_tokens``, ``[B]``, int or float) are the numbers of
  completion tokens those sums run over; the length-normalised losses divide by them (clamped at 1).
- ``logratio = policy - ref`` per completion; the DPO *implicit reward* of a completion is
  ``beta * logratio``, reported detached as ``chosen_rewards`` / ``rejected_rewards`` (what TRL logs
  as ``rewards/chosen`` / ``rewards/rejected``).
- Every loss returns per-example losses ``[B]``. The batch loss is their mean (that is TRL's
  loss), or their sum divided by the number of pairs of all accumulated micro-batches and ranks
  when a caller accumulates gradients. Two exceptions to "one value per pair": ``aot`` /
  ``aot_unpaired`` sort across the batch, so ``losses[i]`` belongs to the i-th quantile rather than
  to pair i; and the NLL terms (``sft``, and inside ``cpo`` / ``orpo``) are divided by the batch's
  mean number of chosen tokens so that their MEAN is the token-mean NLL of the batch (TRL's
  cross-entropy over all chosen tokens), see :func:`sft_loss`.
- Everything is computed in the dtype of the inputs (pass fp32) with stable forms
  (``logsigmoid``, never ``log(sigmoid)``); no function keeps state between calls. The two
  batch-level statistics some methods need (KTO's KL estimate, BCO's running reward mean) are
  computed by separate small functions and passed in, so that a distributed caller can average
  them over ranks first.

``preference_loss(loss_type, logps, beta=...)`` is the one entry point the recipes call: it checks
the names (``PREFERENCE_LOSS_TYPES``, TRL 1.x ``DPOConfig.loss_type`` plus ``simpo``, ``cpo``,
``orpo``) and combines a weighted list (``["sigmoid", "sft"]`` is RPO). KTO has unpaired inputs and
its own function, :func:`kto_loss`. docs/losses.md has the table of names, formulas and papers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tunekit.config.errors import UserError, did_you_mean

# Reference-based losses, under TRL 1.x's DPOConfig.loss_type names ("sft" needs no reference).
DPO_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft",
)
# Losses of the policy alone (TRL: CPOTrainer loss_type "sigmoid" / "simpo", ORPOTrainer).
REFERENCE_FREE_LOSS_TYPES: tuple[str, ...] = ("simpo", "cpo", "orpo")
# Every name preference_loss accepts; recipes validate their `loss_type` config against it.
PREFERENCE_LOSS_TYPES: tuple[str, ...] = DPO_LOSS_TYPES + REFERENCE_FREE_LOSS_TYPES
# KTO on unpaired data (TRL 1.x KTOConfig.loss_type).
KTO_LOSS_TYPES: tuple[str, ...] = ("kto", "apo_zero_unpaired")
# f-DPO regularisers (TRL 1.x DPOConfig.f_divergence_type).
F_DIVERGENCE_TYPES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The losses built on the chosen-minus-rejected score difference, the only ones the f-DPO
# reparameterisation is valid for: elsewhere the beta*log Z(x) term does not cancel (as TRL).
F_DIVERGENCE_LOSS_TYPES: frozenset[str] = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})

_NEEDS_REFERENCE = frozenset(DPO_LOSS_TYPES) - {"sft"}
_NEEDS_BOTH_TOKEN_COUNTS = frozenset({"ipo", "sigmoid_norm", "simpo", "orpo"})
_NEEDS_CHOSEN_TOKEN_COUNTS = _NEEDS_BOTH_TOKEN_COUNTS | {"sft", "cpo"}


@dataclass(frozen=True)
class PreferenceLogps:
    """The inputs of a batch of B preference pairs; every tensor is ``[B]``.

    ``policy_chosen`` / ``policy_rejected``: summed completion log-probs under the policy (these
    carry the gradient). ``ref_chosen`` / ``ref_rejected``: the same under the reference model,
    computed under ``torch.no_grad()`` (None for the reference-free losses).
    ``chosen_tokens`` / ``rejected_tokens``: completion token counts, needed by the
    length-normalised losses (``ipo``, ``sigmoid_norm``, ``simpo``, ``orpo``) and the NLL terms
    (``sft``, ``cpo``, ``orpo``: chosen only).
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None
    chosen_tokens: torch.Tensor | None = None
    rejected_tokens: torch.Tensor | None = None

    def __post_init__(self):
        shape = self.policy_chosen.shape
        if len(shape) != 1:
            raise ValueError(f"PreferenceLogps: policy_chosen must be [B], got {list(shape)}")
        for name in ("policy_rejected", "ref_chosen", "ref_rejected", "chosen_tokens", "rejected_tokens"):
            value = getattr(self, name)
            if value is not None and value.shape != shape:
                raise ValueError(f"PreferenceLogps: {name} is {list(value.shape)}, policy_chosen is {list(shape)}")

    def chosen_logratios(self) -> torch.Tensor:
        """``policy_chosen - ref_chosen``, [B]."""
        return self.policy_chosen - _required(self.ref_chosen, "ref_chosen")

    def rejected_logratios(self) -> torch.Tensor:
        """``policy_rejected - ref_rejected``, [B]."""
        return self.policy_rejected - _required(self.ref_rejected, "ref_rejected")

    def chosen_lengths(self) -> torch.Tensor:
        """Chosen token counts in the log-probs' dtype, at least 1 (an empty completion must not divide by 0)."""
        return _required(self.chosen_tokens, "chosen_tokens").to(self.policy_chosen.dtype).clamp(min=1)

    def rejected_lengths(self) -> torch.Tensor:
        """Rejected token counts in the log-probs' dtype, at least 1."""
        return _required(self.rejected_tokens, "rejected_tokens").to(self.policy_rejected.dtype).clamp(min=1)


class PreferenceLossOutput(NamedTuple):
    """``losses`` [B] per example (see the module docstring for how to form the batch loss);
    ``chosen_rewards`` / ``rejected_rewards`` [B], detached, or None for a loss without rewards
    (``sft`` alone)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor | None
    rejected_rewards: torch.Tensor | None


def _required(value: torch.Tensor | None, name: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"this preference loss needs PreferenceLogps.{name}")
    return value


def _dpo_rewards(logps: PreferenceLogps, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    # The implicit rewards of DPO, reported by every reference-based loss (as TRL's DPOTrainer).
    return (beta * logps.chosen_logratios()).detach(), (beta * logps.rejected_logratios()).detach()


def _smoothed_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    # -(1 - eps) log sigma(z) - eps log sigma(-z): the logistic loss with a label flipped with
    # probability eps (cDPO); eps = 0 leaves exactly -logsigmoid(z).
    loss = -F.logsigmoid(z)
    if label_smoothing != 0.0:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


# exp() arguments above these overflow (or come close) once cast to the dtype: as TRL, the
# alpha-divergence clamps there (the loss saturates long before; the gradient there is 0).
_EXP_CLAMP = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0, torch.float64: 700.0}


def f_divergence_scores(logratios: torch.Tensor, f_divergence_type: str = "reverse_kl",
                        alpha: float = 0.5) -> torch.Tensor:
    """f'(u) at u = pi/pi_ref = exp(logratios), the per-completion score of f-DPO.

    f-DPO (Wang et al., "Beyond Reverse KL", arXiv:2309.16240) replaces the reverse-KL regulariser
    of DPO by an f-divergence; the DPO margin ``logratio_c - logratio_r`` becomes
    ``f'(u_c) - f'(u_r)``. As TRL 1.x, each f' is shifted so that f'(1) = 0 (the paper's f' differ
    by constants, which cancel in the chosen-minus-rejected difference of the plain losses; the
    shift makes policy == reference give zero scores for the length-normalised ones too):

    - ``reverse_kl``: ``log u`` (plain DPO)
    - ``forward_kl``: ``1 - 1/u``
    - ``js_divergence``: ``log(2u / (1 + u)) = log 2 + logsigmoid(log u)``
    - ``alpha_divergence``: ``(u^(alpha-1) - 1) / (alpha - 1)``, i.e. the paper's
      ``(1 - u^(-a)) / a`` with ``a = 1 - alpha``; ``alpha -> 1`` is reverse KL.

    Args:
        logratios: ``log pi - log pi_ref`` per completion, any shape.
        f_divergence_type: one of ``F_DIVERGENCE_TYPES``.
        alpha: the alpha-divergence coefficient (TRL's ``f_alpha_divergence_coef``).

    Returns scores with the shape and dtype of ``logratios``.
    """
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return -torch.expm1(-logratios)  # 1 - exp(-x), exact near x = 0
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:  # the limit (u^(a-1) - 1)/(a-1) -> log u
            return logratios
        exponent = ((alpha - 1.0) * logratios).clamp(max=_EXP_CLAMP.get(logratios.dtype, 80.0))
        return torch.expm1(exponent) / (alpha - 1.0)
    raise UserError(f"f_divergence_type {f_divergence_type!r} is not one of {', '.join(F_DIVERGENCE_TYPES)}"
                    f"{did_you_mean(f_divergence_type, F_DIVERGENCE_TYPES)}")


def _scores(logps: PreferenceLogps, f_divergence_type: str, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (f_divergence_scores(logps.chosen_logratios(), f_divergence_type, alpha),
            f_divergence_scores(logps.rejected_logratios(), f_divergence_type, alpha))


# --- the DPO family (TRL 1.x DPOConfig.loss_type) ------------------------------------------------
# In the formulas: s_c, s_r are the f-divergence scores of chosen and rejected (the log-ratios
# for reverse_kl), lr_c, lr_r the log-ratios, n_c, n_r the completion token counts.


def sigmoid_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0,
                 f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> PreferenceLossOutput:
    """DPO (Rafailov et al., arXiv:2305.18290), with label smoothing cDPO (Mitchell, 2023,
    "A note on DPO with noisy preferences", https://ericmitchell.ai/cdpo.pdf):

        z = beta * (s_c - s_r);   loss = -(1 - eps) * log sigma(z) - eps * log sigma(-z)

    beta: strength of the KL regularisation towards the reference (larger = stay closer; TRL
    default 0.1). eps = ``label_smoothing``: the assumed probability that a pair's label is
    flipped, meaningful in [0, 0.5] (0 = plain DPO). TRL 1.x no longer applies label smoothing to "sigmoid"
    (TRL 0.x did); with the default 0 the two agree. f-divergence: :func:`f_divergence_scores`.
    """
    s_c, s_r = _scores(logps, f_divergence_type, f_alpha_divergence_coef)
    return PreferenceLossOutput(_smoothed_logistic(beta * (s_c - s_r), label_smoothing), *_dpo_rewards(logps, beta))


def hinge_loss(logps: PreferenceLogps, *, beta: float, f_divergence_type: str = "reverse_kl",
               f_alpha_divergence_coef: float = 0.5) -> PreferenceLossOutput:
    """Hinge loss of SLiC (Zhao et al., arXiv:2305.10425) on the DPO margin, as in RSO (Liu et al.,
    arXiv:2309.06657):

        loss = max(0, 1 - beta * (s_c - s_r))

    beta: the reciprocal of the margin the pair must clear.
    """
    s_c, s_r = _scores(logps, f_divergence_type, f_alpha_divergence_coef)
    return PreferenceLossOutput(torch.relu(1.0 - beta * (s_c - s_r)), *_dpo_rewards(logps, beta))


def ipo_loss(logps: PreferenceLogps, *, beta: float, f_divergence_type: str = "reverse_kl",
             f_alpha_divergence_coef: float = 0.5) -> PreferenceLossOutput:
    """IPO (Azar et al., arXiv:2310.12036, Eq. 17), length-normalised as in TRL 1.x:

        loss = (s_c / n_c - s_r / n_r - 1 / (2 * beta))^2

    beta: the regulariser tau of the paper (the target margin is 1/(2 tau)). The division by the
    completion token counts (clamped at 1) is TRL's: the summed log-ratios make the squared loss
    grow with length; TRL reports the IPO authors confirmed the paper's results use this form.
    """
    s_c, s_r = _scores(logps, f_divergence_type, f_alpha_divergence_coef)
    delta = s_c / logps.chosen_lengths() - s_r / logps.rejected_lengths()
    return PreferenceLossOutput((delta - 1.0 / (2.0 * beta)) ** 2, *_dpo_rewards(logps, beta))


def exo_pair_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float,
                  f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> PreferenceLossOutput:
    """EXO, pairwise form (Ji et al., arXiv:2402.00856, Eq. 16): KL(q || p) between the model's
    preference distribution q = (sigma(z), sigma(-z)) over {chosen, rejected}, z = beta*(s_c - s_r),
    and the smoothed label distribution p = (1 - eps, eps):

        loss = sigma(z) * (log sigma(z) - log(1 - eps)) + sigma(-z) * (log sigma(-z) - log eps)

    eps = ``label_smoothing`` must be in (0, 1) (the paper recommends 1e-3).
    """
    s_c, s_r = _scores(logps, f_divergence_type, f_alpha_divergence_coef)
    z = beta * (s_c - s_r)
    log_q_chosen, log_q_rejected = F.logsigmoid(z), F.logsigmoid(-z)
    losses = (log_q_chosen.exp() * (log_q_chosen - math.log1p(-label_smoothing))
              + log_q_rejected.exp() * (log_q_rejected - math.log(label_smoothing)))
    return PreferenceLossOutput(losses, *_dpo_rewards(logps, beta))


def nca_pair_loss(logps: PreferenceLogps, *, beta: float) -> PreferenceLossOutput:
    """NCA, pairwise (Chen et al., "Noise Contrastive Alignment", arXiv:2402.05369): pushes each
    completion's own reward r = beta * lr rather than only their difference:

        loss = -log sigma(r_c) - 0.5 * log sigma(-r_c) - 0.5 * log sigma(-r_r)
    """
    r_c, r_r = beta * logps.chosen_logratios(), beta * logps.rejected_logratios()
    losses = -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)
    return PreferenceLossOutput(losses, *_dpo_rewards(logps, beta))


def robust_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float,
                f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5) -> PreferenceLossOutput:
    """Robust DPO (Chowdhury et al., arXiv:2403.00409): the unbiased DPO loss under labels flipped
    with probability eps = ``label_smoothing`` in [0, 0.5):

        z = beta * (s_c - s_r);   loss = ((1 - eps) * -log sigma(z) - eps * -log sigma(-z)) / (1 - 2 eps)
    """
    s_c, s_r = _scores(logps, f_divergence_type, f_alpha_divergence_coef)
    z = beta * (s_c - s_r)
    eps = label_smoothing
    losses = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return PreferenceLossOutput(losses, *_dpo_rewards(logps, beta))


def bco_pair_loss(logps: PreferenceLogps, *, beta: float,
                  reward_shift: float | torch.Tensor = 0.0) -> PreferenceLossOutput:
    """BCO, pairwise (Jung et al., "Binary Classifier Optimization", arXiv:2404.04656): a binary
    classifier whose logit is the reward r = beta * lr, chosen -> 1, rejected -> 0, shifted by delta:

        loss = -log sigma(r_c - delta) - log sigma(-(r_r - delta))

    delta = ``reward_shift``: the paper's running mean of the rewards. TRL 1.x uses delta = 0 (the
    default here); TRL 0.x and the paper update a running mean of the batch mean reward before
    each step and use it: ``state = state.update(bco_reward_mean(logps, beta=beta))`` (average the
    batch mean over ranks first under data parallelism), then ``reward_shift=state.mean``
    (:class:`RunningMean`). The shift carries no gradient.
    """
    r_c, r_r = beta * logps.chosen_logratios(), beta * logps.rejected_logratios()
    delta = reward_shift.detach() if isinstance(reward_shift, torch.Tensor) else reward_shift
    losses = -F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta))
    return PreferenceLossOutput(losses, *_dpo_rewards(logps, beta))


def sppo_hard_loss(logps: PreferenceLogps, *, beta: float) -> PreferenceLossOutput:
    """SPPO with hard labels (Wu et al., "Self-Play Preference Optimization", arXiv:2405.00675,
    Eq. 4.7 with the win probability set to 1 for chosen and 0 for rejected, eta = 1/beta):

        loss = (lr_c - 1/(2 beta))^2 + (lr_r + 1/(2 beta))^2
    """
    lr_c, lr_r = logps.chosen_logratios(), logps.rejected_logratios()
    losses = (lr_c - 0.5 / beta) ** 2 + (lr_r + 0.5 / beta) ** 2
    return PreferenceLossOutput(losses, *_dpo_rewards(logps, beta))


def aot_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0) -> PreferenceLossOutput:
    """AOT for paired data (Melnyk et al., "Distributional Preference Alignment of LLMs via Optimal
    Transport", arXiv:2406.05882): first-order stochastic dominance of the policy's chosen-minus-
    rejected log-ratios over the reference's, by comparing their sorted values (quantiles):

        d = sort(policy_c - policy_r) - sort(ref_c - ref_r);   loss_i = smoothed logistic of beta * d_i

    (smoothed logistic as in :func:`sigmoid_loss`). ``losses[i]`` is the i-th quantile's loss, not
    pair i's; only their mean (or sum) is meaningful, and larger batches estimate the quantiles better.
    """
    policy_margins, _ = torch.sort(logps.policy_chosen - logps.policy_rejected, dim=0)
    ref_chosen, ref_rejected = _required(logps.ref_chosen, "ref_chosen"), _required(logps.ref_rejected, "ref_rejected")
    ref_margins, _ = torch.sort(ref_chosen - ref_rejected, dim=0)
    losses = _smoothed_logistic(beta * (policy_margins - ref_margins), label_smoothing)
    return PreferenceLossOutput(losses, *_dpo_rewards(logps, beta))


def aot_unpaired_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0) -> PreferenceLossOutput:
    """AOT for unpaired data (arXiv:2406.05882): dominance of the chosen log-ratios' distribution
    over the rejected ones', quantile by quantile:

        d = sort(lr_c) - sort(lr_r);   loss_i = smoothed logistic of beta * d_i

    ``losses[i]`` is the i-th quantile's loss (see :func:`aot_loss`).
    """
    chosen_sorted, _ = torch.sort(logps.chosen_logratios(), dim=0)
    rejected_sorted, _ = torch.sort(logps.rejected_logratios(), dim=0)
    losses = _smoothed_logistic(beta * (chosen_sorted - rejected_sorted), label_smoothing)
    return PreferenceLossOutput(losses, *_dpo_rewards(logps, beta))


def apo_zero_loss(logps: PreferenceLogps, *, beta: float) -> PreferenceLossOutput:
    """APO-zero (D'Oosterlinck et al., "Anchored Preference Optimization", arXiv:2408.06266, Eq. 7):
    raise the chosen likelihood and lower the rejected one, each anchored at the reference; for
    chosen completions better than the model's own outputs:

        loss = (1 - sigma(beta * lr_c)) + sigma(beta * lr_r)
    """
    lr_c, lr_r = logps.chosen_logratios(), logps.rejected_logratios()
    losses = torch.sigmoid(-beta * lr_c) + torch.sigmoid(beta * lr_r)  # 1 - sigma(x) = sigma(-x), exact for large x
    return PreferenceLossOutput(losses, *_dpo_rewards(logps, beta))


def apo_down_loss(logps: PreferenceLogps, *, beta: float) -> PreferenceLossOutput:
    """APO-down (arXiv:2408.06266, Eq. 8): lower both likelihoods, the rejected one more; for
    chosen completions worse than the model's own outputs:

        loss = sigma(beta * lr_c) + (1 - sigma(beta * (lr_c - lr_r)))
    """
    lr_c, lr_r = logps.chosen_logratios(), logps.rejected_logratios()
    losses = torch.sigmoid(beta * lr_c) + torch.sigmoid(-beta * (lr_c - lr_r))
    return PreferenceLossOutput(losses, *_dpo_rewards(logps, beta))


def discopop_loss(logps: PreferenceLogps, *, beta: float, tau: float = 0.05, f_divergence_type: str = "reverse_kl",
                  f_alpha_divergence_coef: float = 0.5) -> PreferenceLossOutput:
    """DiscoPOP, the log-ratio modulated loss (Chris Lu et al., "Discovering Preference Optimization
    Algorithms with and for Large Language Models", arXiv:2406.08414, Eq. 5): a blend of the
    logistic (DPO) and exponential losses, weighted by the margin itself:

        z = beta * (s_c - s_r);   m = sigma(z / tau);   loss = (1 - m) * -log sigma(z) + m * exp(-z)

    tau: the temperature of the blend (paper and TRL default 0.05). ``m * exp(-z)`` is computed as
    ``exp(log sigma(z/tau) - z)``, finite where exp(-z) alone would overflow (z << 0, where m ~ 0).
    """
    s_c, s_r = _scores(logps, f_divergence_type, f_alpha_divergence_coef)
    z = beta * (s_c - s_r)
    losses = -F.logsigmoid(z) * torch.sigmoid(-z / tau) + torch.exp(F.logsigmoid(z / tau) - z)
    return PreferenceLossOutput(losses, *_dpo_rewards(logps, beta))


def sigmoid_norm_loss(logps: PreferenceLogps, *, beta: float, f_divergence_type: str = "reverse_kl",
                      f_alpha_divergence_coef: float = 0.5) -> PreferenceLossOutput:
    """Length-normalised DPO (TRL's ``sigmoid_norm``, after SimPO's length normalisation,
    Meng et al., arXiv:2405.14734): DPO on per-token average log-ratios:

        loss = -log sigma(beta * (s_c / n_c - s_r / n_r))

    Typical betas are larger than DPO's (the margin is per token).
    """
    s_c, s_r = _scores(logps, f_divergence_type, f_alpha_divergence_coef)
    z = beta * (s_c / logps.chosen_lengths() - s_r / logps.rejected_lengths())
    return PreferenceLossOutput(-F.logsigmoid(z), *_dpo_rewards(logps, beta))


def _chosen_nll(logps: PreferenceLogps, mean_chosen_tokens: float | torch.Tensor | None) -> torch.Tensor:
    tokens = logps.chosen_lengths()
    denominator = tokens.mean() if mean_chosen_tokens is None else mean_chosen_tokens
    return -logps.policy_chosen / denominator


def sft_loss(logps: PreferenceLogps, *, mean_chosen_tokens: float | torch.Tensor | None = None) -> PreferenceLossOutput:
    """Negative log-likelihood of the chosen completions (TRL's ``sft`` loss type; with
    ``sigmoid`` it is RPO, Pang et al., "Iterative Reasoning Preference Optimization",
    arXiv:2404.19733; with ``sigmoid`` and ``bco_pair`` MPO, arXiv:2411.10442):

        loss_i = -policy_c_i / mean(n_c)     so that    mean_i loss_i = -sum_i policy_c_i / sum_i n_c_i

    i.e. the batch mean is the token-mean NLL over all chosen tokens of the batch, TRL's definition
    (a cross-entropy over the batch's chosen tokens, not a mean of per-sequence means).
    ``mean_chosen_tokens`` replaces this batch's mean(n_c): pass the mean over all accumulated
    micro-batches and ranks to normalise by their token count instead. No rewards (None).
    """
    return PreferenceLossOutput(_chosen_nll(logps, mean_chosen_tokens), None, None)


# --- reference-free --------------------------------------------------------------------------


def simpo_loss(logps: PreferenceLogps, *, beta: float, gamma: float = 0.5,
               label_smoothing: float = 0.0) -> PreferenceLossOutput:
    """SimPO (Meng et al., "Simple Preference Optimization with a Reference-Free Reward",
    arXiv:2405.14734, Eq. 6): the reward is the length-normalised policy log-prob beta * p / n, and
    the chosen reward must beat the rejected one by a target margin gamma:

        z = beta * (p_c / n_c - p_r / n_r) - gamma;   loss = smoothed logistic of z (as cDPO)

    beta: reward scale (the paper uses 2.0-2.5; TRL's CPOConfig default 0.1). gamma: target reward
    margin (TRL's ``simpo_gamma``, default 0.5). TRL: ``CPOTrainer(loss_type="simpo", cpo_alpha=0)``;
    CPO-SimPO is ``["simpo", "sft"]``. Rewards: beta * p / n (as TRL logs them).
    """
    avg_c = logps.policy_chosen / logps.chosen_lengths()
    avg_r = logps.policy_rejected / logps.rejected_lengths()
    losses = _smoothed_logistic(beta * (avg_c - avg_r) - gamma, label_smoothing)
    return PreferenceLossOutput(losses, (beta * avg_c).detach(), (beta * avg_r).detach())


def cpo_loss(logps: PreferenceLogps, *, beta: float, label_smoothing: float = 0.0, cpo_alpha: float = 1.0,
             mean_chosen_tokens: float | torch.Tensor | None = None) -> PreferenceLossOutput:
    """CPO (Xu et al., "Contrastive Preference Optimization", arXiv:2401.08417, Eq. 3 + the NLL
    regulariser), as TRL's ``CPOTrainer(loss_type="sigmoid")``:

        loss_i = smoothed logistic of beta * (p_c - p_r)  +  cpo_alpha * nll_i

    with nll_i the chosen-completion NLL of :func:`sft_loss` (its batch mean is the token-mean NLL).
    beta: reward scale (TRL default 0.1). cpo_alpha: weight of the NLL term (the paper's sum is
    cpo_alpha = 1, TRL's default; 0 drops it; ``mean_chosen_tokens`` as in :func:`sft_loss`).
    Rewards: beta * p (policy log-probs, no reference).
    """
    losses = _smoothed_logistic(beta * (logps.policy_chosen - logps.policy_rejected), label_smoothing)
    if cpo_alpha != 0.0:
        losses = losses + cpo_alpha * _chosen_nll(logps, mean_chosen_tokens)
    return PreferenceLossOutput(losses, (beta * logps.policy_chosen).detach(), (beta * logps.policy_rejected).detach())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    # log(1 - exp(x)) for x < 0 without cancellation (Maechler, 2012): log1p(-exp(x)) far from 0,
    # log(-expm1(x)) near it, switching at -log 2.
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(logps: PreferenceLogps, *, beta: float,
              mean_chosen_tokens: float | torch.Tensor | None = None) -> PreferenceLossOutput:
    """ORPO (Hong et al., "Monolithic Preference Optimization without Reference Model",
    arXiv:2403.07691, Eqs. 4-7): NLL of the chosen completion plus the log odds ratio of the
    length-normalised probabilities P = exp(p / n):

        log_odds = log(P_c / (1 - P_c)) - log(P_r / (1 - P_r))
                 = (a_c - a_r) - (log(1 - exp(a_c)) - log(1 - exp(a_r))),   a = p / n
        loss_i = nll_i - beta * log sigma(log_odds_i)

    beta: the paper's lambda, the weight of the odds-ratio term (TRL's ORPOConfig.beta, default 0.1).
    nll_i as in :func:`sft_loss` (chosen completion tokens; TRL's ORPOTrainer also counts the
    prompt tokens in its NLL, the paper does not). Rewards: beta * a (as TRL logs them).
    """
    avg_c = logps.policy_chosen / logps.chosen_lengths()
    avg_r = logps.policy_rejected / logps.rejected_lengths()
    log_odds = (avg_c - avg_r) - (_log1mexp(avg_c) - _log1mexp(avg_r))
    losses = _chosen_nll(logps, mean_chosen_tokens) - beta * F.logsigmoid(log_odds)
    return PreferenceLossOutput(losses, (beta * avg_c).detach(), (beta * avg_r).detach())


# --- BCO's running reward mean ----------------------------------------------------------------


@dataclass(frozen=True)
class RunningMean:
    """The mean of the values given so far, one value per step: BCO's reward shift delta.

    Immutable: ``update`` returns a new state, which the caller keeps (and saves with the recipe
    state for an exact resume: two numbers). ``mean`` is 0 before the first update.
    """

    total: float = 0.0
    count: int = 0

    def update(self, value: float | torch.Tensor) -> RunningMean:
        return RunningMean(self.total + float(value), self.count + 1)

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


def bco_reward_mean(logps: PreferenceLogps, *, beta: float) -> torch.Tensor:
    """The batch mean of the 2B rewards beta * lr of chosen and rejected, detached (0-d): the value
    BCO's running mean is updated with each step (TRL 0.x). Under data parallelism average it over
    ranks before ``RunningMean.update`` (TRL 0.x does)."""
    rewards = torch.cat([beta * logps.chosen_logratios(), beta * logps.rejected_logratios()])
    return rewards.mean().detach()


# --- KTO ------------------------------------------------------------------------------------


class KTOLossOutput(NamedTuple):
    """``losses`` [B] per example, weighted (batch loss: their mean, as TRL); ``rewards`` [B]
    beta * (policy - ref), detached (desirable examples' rewards are TRL's ``rewards/chosen``)."""

    losses: torch.Tensor
    rewards: torch.Tensor


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z_0: the batch estimate of KL(policy || reference), from mismatched
    (prompt, completion) pairs (each prompt with another example's completion, so the estimate does
    not reward the matched completions), detached, 0-d:

        kl = mean_i(policy_kl_i - ref_kl_i)

    Args: the summed completion log-probs [B] of the mismatched pairs under policy and reference.
    Not clamped: a distributed caller averages this over ranks first (as TRL does), then
    :func:`kto_loss` clamps the average at 0.
    """
    return (policy_kl_logps - ref_kl_logps).mean().detach()


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, *, beta: float,
             kl: float | torch.Tensor | None = None, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             loss_type: str = "kto") -> KTOLossOutput:
    """KTO (Ethayarajh et al., "Model Alignment as Prospect Theoretic Optimization",
    arXiv:2402.01306, Eq. 7) on unpaired completions, each labelled desirable or not:

        r = beta * (policy - ref),   z0 = max(kl, 0) (detached)
        loss_i = desirable_weight   * (1 - sigma(r_i - beta * z0))   if desirable_i
                 undesirable_weight * (1 - sigma(beta * z0 - r_i))   otherwise

    ``loss_type="apo_zero_unpaired"`` (APO-zero for unpaired data, arXiv:2408.06266, TRL's KTO
    variant) drops z0: desirable ``1 - sigma(r)``, undesirable ``sigma(r)``.

    Args:
        policy_logps, ref_logps: summed completion log-probs [B].
        desirable: bool [B] (TRL's ``label``).
        beta: KL-regularisation strength (TRL default 0.1).
        kl: the KL estimate of :func:`kto_kl_estimate` (averaged over ranks by a distributed caller);
            needed by "kto". The batch loss is ``losses.mean()``.
        desirable_weight, undesirable_weight: lambda_D, lambda_U of the paper, to balance unequal
            numbers of desirable and undesirable examples (the paper suggests
            lambda_D * n_D / (lambda_U * n_U) in [1, 4/3]).
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise UserError(f"KTO loss_type {loss_type!r} is not one of {', '.join(KTO_LOSS_TYPES)}"
                        f"{did_you_mean(loss_type, KTO_LOSS_TYPES)}")
    _check_positive("beta", beta)
    if desirable.shape != policy_logps.shape or ref_logps.shape != policy_logps.shape:
        raise ValueError(f"kto_loss: policy_logps {list(policy_logps.shape)}, ref_logps {list(ref_logps.shape)} "
                         f"and desirable {list(desirable.shape)} must all be [B]")
    rewards = beta * (policy_logps - ref_logps)
    if loss_type == "kto":
        if kl is None:
            raise ValueError("kto_loss(loss_type='kto') needs kl (kto_kl_estimate of the mismatched pairs)")
        z0 = torch.as_tensor(kl, dtype=rewards.dtype, device=rewards.device).detach().clamp(min=0)
        margin = rewards - beta * z0
    else:
        margin = rewards
    # 1 - sigma(m) is written sigma(-m) (exact where sigma(m) rounds to 1), and the undesirable
    # 1 - sigma(beta*z0 - r) is sigma(m): both branches are sigmoids of +-m.
    losses = torch.where(desirable.to(torch.bool), desirable_weight * torch.sigmoid(-margin),
                         undesirable_weight * torch.sigmoid(margin))
    return KTOLossOutput(losses, rewards.detach())


# --- the dispatcher -------------------------------------------------------------------------


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UserError(f"{name} must be a positive number, got {value!r}")


def check_preference_loss_args(loss_type: str | Sequence[str], loss_weights: Sequence[float] | None = None, *,
                               beta: float, label_smoothing: float = 0.0, f_divergence_type: str = "reverse_kl",
                               discopop_tau: float = 0.05) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Validate a preference-loss configuration; return (names, weights) as tuples.

    What :func:`preference_loss` checks, callable by a recipe before any work. Raises
    :class:`~tunekit.config.errors.UserError` naming the bad value (with a did-you-mean and the
    valid names for a misspelt loss type): unknown names, an empty list, ``loss_weights`` of another
    length or not finite, beta <= 0, label_smoothing outside [0, 1) (``robust``: [0, 0.5),
    ``exo_pair``: (0, 1)), an unknown f-divergence or one used with a loss it does not apply to,
    discopop_tau <= 0.
    """
    names = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not names:
        raise UserError(f"loss_type is empty; give one or more of {', '.join(PREFERENCE_LOSS_TYPES)}")
    for name in names:
        if name not in PREFERENCE_LOSS_TYPES:
            hint = did_you_mean(str(name), PREFERENCE_LOSS_TYPES)
            extra = " (KTO has unpaired data: tunekit.losses.preference.kto_loss)" if name in KTO_LOSS_TYPES else ""
            raise UserError(f"loss_type {name!r} is not a preference loss (valid: {', '.join(PREFERENCE_LOSS_TYPES)})"
                            f"{hint}{extra}")
    if loss_weights is None:
        weights = (1.0,) * len(names)
    else:
        weights = tuple(loss_weights)
        if len(weights) != len(names):
            raise UserError(f"loss_weights {list(weights)} has {len(weights)} value(s) but loss_type {list(names)} "
                            f"has {len(names)}: give one weight per loss type")
        for w in weights:
            if not (isinstance(w, (int, float)) and math.isfinite(w)):
                raise UserError(f"loss_weights {list(weights)}: {w!r} is not a finite number")
    _check_positive("beta", beta)
    if not 0.0 <= label_smoothing < 1.0:
        raise UserError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    if "robust" in names and not label_smoothing < 0.5:
        raise UserError(f"loss_type 'robust' needs label_smoothing (the label-flip probability) in [0, 0.5), "
                        f"got {label_smoothing!r}")
    if "exo_pair" in names and label_smoothing == 0.0:
        raise UserError("loss_type 'exo_pair' needs label_smoothing > 0 (the EXO paper recommends 1e-3)")
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise UserError(f"f_divergence_type {f_divergence_type!r} is not one of {', '.join(F_DIVERGENCE_TYPES)}"
                        f"{did_you_mean(f_divergence_type, F_DIVERGENCE_TYPES)}")
    if f_divergence_type != "reverse_kl":
        unsupported = [n for n in names if n not in F_DIVERGENCE_LOSS_TYPES]
        if unsupported:
            raise UserError(f"f_divergence_type {f_divergence_type!r} applies only to the loss types "
                            f"{', '.join(sorted(F_DIVERGENCE_LOSS_TYPES))}, not to {', '.join(unsupported)}; "
                            f"use f_divergence_type 'reverse_kl' with them")
    if "discopop" in names:
        _check_positive("discopop_tau", discopop_tau)
    return names, weights


def preference_loss(loss_type: str | Sequence[str], logps: PreferenceLogps, *, beta: float,
                    loss_weights: Sequence[float] | None = None, label_smoothing: float = 0.0,
                    f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                    discopop_tau: float = 0.05, bco_reward_shift: float | torch.Tensor = 0.0,
                    simpo_gamma: float = 0.5, cpo_alpha: float = 1.0,
                    mean_chosen_tokens: float | torch.Tensor | None = None) -> PreferenceLossOutput:
    """The loss named ``loss_type`` (or the weighted sum of a list of them) for a batch of pairs.

    ``loss_type``: one name of ``PREFERENCE_LOSS_TYPES`` or a list; ``loss_weights``: one weight per
    name (default all 1.0), as TRL's ``DPOConfig.loss_type`` / ``loss_weights``:
    ``losses = sum_k weight_k * losses_k`` per example. E.g. RPO = ``["sigmoid", "sft"]``, MPO =
    ``["sigmoid", "bco_pair", "sft"]`` with ``[0.8, 0.2, 1.0]``.

    Hyper-parameters (TRL's names; each loss reads the ones its function documents):
    ``beta`` (every loss but ``sft``), ``label_smoothing`` (sigmoid = cDPO, robust, exo_pair, aot,
    aot_unpaired, simpo, cpo), ``f_divergence_type`` / ``f_alpha_divergence_coef``
    (:func:`f_divergence_scores`; for the losses in ``F_DIVERGENCE_LOSS_TYPES``), ``discopop_tau``,
    ``bco_reward_shift`` (:func:`bco_pair_loss`), ``simpo_gamma``, ``cpo_alpha``,
    ``mean_chosen_tokens`` (the NLL terms, :func:`sft_loss`).

    Returns per-example losses [B] (batch loss: their mean, see the module docstring) and the
    rewards of the first listed loss that has rewards; a list of only ``sft`` reports the DPO
    implicit rewards when reference log-probs are given (as TRL's DPOTrainer), else None.
    Bad names or weights raise :class:`~tunekit.config.errors.UserError` (see
    :func:`check_preference_loss_args`); missing inputs a loss needs raise ValueError.
    """
    names, weights = check_preference_loss_args(loss_type, loss_weights, beta=beta, label_smoothing=label_smoothing,
                                                f_divergence_type=f_divergence_type, discopop_tau=discopop_tau)
    f_args = {"f_divergence_type": f_divergence_type, "f_alpha_divergence_coef": f_alpha_divergence_coef}
    total = None
    chosen_rewards = rejected_rewards = None
    for name, weight in zip(names, weights):
        if name in _NEEDS_REFERENCE and (logps.ref_chosen is None or logps.ref_rejected is None):
            raise ValueError(f"loss_type {name!r} needs reference log-probs (PreferenceLogps.ref_chosen/ref_rejected)")
        nll_needed = not (name == "cpo" and cpo_alpha == 0)
        if name in _NEEDS_CHOSEN_TOKEN_COUNTS and logps.chosen_tokens is None and nll_needed:
            raise ValueError(f"loss_type {name!r} needs PreferenceLogps.chosen_tokens (completion token counts)")
        if name in _NEEDS_BOTH_TOKEN_COUNTS and logps.rejected_tokens is None:
            raise ValueError(f"loss_type {name!r} needs PreferenceLogps.rejected_tokens (completion token counts)")
        out = _one_loss(name, logps, beta=beta, label_smoothing=label_smoothing, f_args=f_args,
                        discopop_tau=discopop_tau, bco_reward_shift=bco_reward_shift, simpo_gamma=simpo_gamma,
                        cpo_alpha=cpo_alpha, mean_chosen_tokens=mean_chosen_tokens)
        term = out.losses if weight == 1.0 else weight * out.losses
        total = term if total is None else total + term
        if chosen_rewards is None and out.chosen_rewards is not None:
            chosen_rewards, rejected_rewards = out.chosen_rewards, out.rejected_rewards
    if chosen_rewards is None and logps.ref_chosen is not None and logps.ref_rejected is not None:
        chosen_rewards, rejected_rewards = _dpo_rewards(logps, beta)
    return PreferenceLossOutput(total, chosen_rewards, rejected_rewards)


def _one_loss(name: str, logps: PreferenceLogps, *, beta: float, label_smoothing: float, f_args: dict,
              discopop_tau: float, bco_reward_shift, simpo_gamma: float, cpo_alpha: float,
              mean_chosen_tokens) -> PreferenceLossOutput:
    if name == "sigmoid":
        return sigmoid_loss(logps, beta=beta, label_smoothing=label_smoothing, **f_args)
    if name == "hinge":
        return hinge_loss(logps, beta=beta, **f_args)
    if name == "ipo":
        return ipo_loss(logps, beta=beta, **f_args)
    if name == "exo_pair":
        return exo_pair_loss(logps, beta=beta, label_smoothing=label_smoothing, **f_args)
    if name == "nca_pair":
        return nca_pair_loss(logps, beta=beta)
    if name == "robust":
        return robust_loss(logps, beta=beta, label_smoothing=label_smoothing, **f_args)
    if name == "bco_pair":
        return bco_pair_loss(logps, beta=beta, reward_shift=bco_reward_shift)
    if name == "sppo_hard":
        return sppo_hard_loss(logps, beta=beta)
    if name == "aot":
        return aot_loss(logps, beta=beta, label_smoothing=label_smoothing)
    if name == "aot_unpaired":
        return aot_unpaired_loss(logps, beta=beta, label_smoothing=label_smoothing)
    if name == "apo_zero":
        return apo_zero_loss(logps, beta=beta)
    if name == "apo_down":
        return apo_down_loss(logps, beta=beta)
    if name == "discopop":
        return discopop_loss(logps, beta=beta, tau=discopop_tau, **f_args)
    if name == "sigmoid_norm":
        return sigmoid_norm_loss(logps, beta=beta, **f_args)
    if name == "sft":
        return sft_loss(logps, mean_chosen_tokens=mean_chosen_tokens)
    if name == "simpo":
        return simpo_loss(logps, beta=beta, gamma=simpo_gamma, label_smoothing=label_smoothing)
    if name == "cpo":
        return cpo_loss(logps, beta=beta, label_smoothing=label_smoothing, cpo_alpha=cpo_alpha,
                        mean_chosen_tokens=mean_chosen_tokens)
    if name == "orpo":
        return orpo_loss(logps, beta=beta, mean_chosen_tokens=mean_chosen_tokens)
    raise AssertionError(f"PREFERENCE_LOSS_TYPES lists {name!r} but _one_loss has no branch for it")


# --- metrics ------------------------------------------------------------------------------

# metric -> the count its sum is divided by
_COUNT_OF = {
    "rewards/chosen": "num_chosen", "rewards/rejected": "num_rejected", "rewards/accuracies": "num_pairs",
    "rewards/margins": "num_pairs", "logps/chosen": "num_chosen", "logps/rejected": "num_rejected",
}


def preference_metric_sums(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                           policy_chosen_logps: torch.Tensor,
                           policy_rejected_logps: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums (0-d, detached) behind TRL's metrics of a batch of B pairs, with their counts:
    ``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies`` (chosen reward > rejected
    reward, strictly), ``rewards/margins`` (chosen - rejected reward), ``logps/chosen``,
    ``logps/rejected`` (the policy's summed log-probs), ``num_chosen`` = ``num_rejected`` =
    ``num_pairs`` = B.

    Every value is a plain sum, so over micro-batches and ranks they add key by key (e.g. stack
    them and all-reduce with SUM); :func:`metric_means` then gives the means TRL logs. Inputs [B].
    """
    n = torch.tensor(float(chosen_rewards.shape[0]), dtype=chosen_rewards.dtype, device=chosen_rewards.device)
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).sum(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
        "logps/chosen": policy_chosen_logps.detach().sum(),
        "logps/rejected": policy_rejected_logps.detach().sum(),
        "num_chosen": n, "num_rejected": n, "num_pairs": n,
    }


def kto_metric_sums(rewards: torch.Tensor, policy_logps: torch.Tensor,
                    desirable: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums (0-d, detached) behind TRL's KTO metrics of B unpaired examples: ``rewards/chosen``,
    ``logps/chosen`` over the desirable ones (``num_chosen`` of them), ``rewards/rejected``,
    ``logps/rejected`` over the others (``num_rejected``). They add over micro-batches and ranks;
    :func:`metric_means` gives TRL's means and ``rewards/margins`` = mean chosen - mean rejected
    reward. (TRL also logs ``kl``: the clamped value given to :func:`kto_loss`, already global.)
    """
    d = desirable.to(torch.bool)
    rewards, policy_logps = rewards.detach(), policy_logps.detach()
    zero = rewards.new_zeros(())
    return {
        "rewards/chosen": torch.where(d, rewards, zero).sum(),
        "rewards/rejected": torch.where(d, zero, rewards).sum(),
        "logps/chosen": torch.where(d, policy_logps, zero).sum(),
        "logps/rejected": torch.where(d, zero, policy_logps).sum(),
        "num_chosen": d.sum().to(rewards.dtype),
        "num_rejected": (~d).sum().to(rewards.dtype),
    }


def metric_means(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """TRL's metric values from (summed) :func:`preference_metric_sums` / :func:`kto_metric_sums`:
    each sum divided by its count; a metric whose count is 0 is left out (as TRL's KTOTrainer does);
    ``rewards/margins`` is mean chosen - mean rejected reward when no margin sum is given.
    Returns Python floats (one host sync)."""
    means = {}
    for key, count_key in _COUNT_OF.items():
        if key in sums and count_key in sums and float(sums[count_key]) > 0:
            means[key] = float(sums[key] / sums[count_key])
    if "rewards/margins" not in means and "rewards/chosen" in means and "rewards/rejected" in means:
        means["rewards/margins"] = means["rewards/chosen"] - means["rewards/rejected"]
    return means
