"""AdamW whose bf16 parameters keep their updates.

With pure bf16 weights (the single-device recipes' ``dtype: bf16``), ``torch.optim.AdamW`` rounds
each updated weight to the nearest bf16 value. bf16 has 8 significant bits, so a weight ``w`` only
moves when its update exceeds half a unit in the last place, about ``|w| / 512``: at lr 2e-5 that
is every weight with ``|w| > ~0.01`` -- most of a fine-tuned checkpoint's weights stay where they
were and the run learns far less than its fp32 twin.

``AdamW`` here is ``torch.optim.AdamW`` for every parameter that is not bf16 (same state, same
kernels: fp32 parameters give bit-identical results). For bf16 parameters it does the AdamW math
in fp32 (on fp32 copies of the weight, gradient and moments, chunk by chunk, with torch's own
functional AdamW) and writes the result back according to ``bf16_update``:

``stochastic_round`` (default)
    The weight and the second moment are rounded to bf16 *stochastically*: up with probability
    equal to the fraction of the distance to the next bf16 value (uniform random bits added below
    the bf16 mantissa, then truncated). The rounding is unbiased, ``E[round(x)] = x``, so an
    update far below one bf16 step still moves the weight by its exact size on average. The
    second moment needs it too: ``v <- 0.999 v + 0.001 g^2`` rounded to nearest can never
    decrease (0.1% is below half a bf16 step), so v would become a running maximum. The first
    moment moves by 10% of ``g - m`` per step, far above bf16 resolution unless ``m`` is already
    within ~2% of ``g``, and is rounded to nearest (one random draw per element serves the other
    two: random numbers are the expensive part on CPU). Memory as plain bf16 AdamW: weight,
    gradient and both moments in bf16, 8 bytes per parameter.
``fp32_master``
    An fp32 copy of each weight (``state["master"]``) and fp32 moments receive the exact fp32
    AdamW update (identical to ``torch.optim.AdamW`` on fp32 weights given the same gradients);
    the bf16 weight is the master rounded to nearest. 16 bytes per parameter; deterministic.
``nearest``
    fp32 math, round to nearest (what plain bf16 AdamW does, for comparison and debugging).

The random bits of ``stochastic_round`` come from a generator seeded from ``(seed, rank, the
parameter's position in the optimizer, step)``, not from a stream carried along: the optimizer's
``state_dict`` (step counts and moments) is all a resumed run needs to continue bit for bit, and
the global RNG (dropout, data order) is left alone. Under FSDP2 the update works on each rank's
local shard of DTensor parameters; ``state_dict`` / ``load_state_dict`` keep torch's layout (state
tensors shaped and sharded like their parameter, so DCP can save and reshard them), and fp32
state of bf16 parameters is kept in fp32 on load (torch's ``load_state_dict`` casts floating
state to the parameter's dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor
from torch.optim.adam import adam

from tunekit.config.errors import UserError
from tunekit.training.process_group import get_world_size_and_rank

BF16_UPDATES = ("stochastic_round", "fp32_master", "nearest")
# elements per fp32 working chunk of a bf16 parameter: ~8 fp32/int32 temporaries of this size
# (64 MB) bound the extra memory however large the embedding is
_CHUNK = 1 << 21
_MASK_16 = 0xFFFF


def stochastic_round_to_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``x`` (fp32, any shape) rounded to bf16 stochastically: ``x`` between neighbouring bf16
    values ``a < x < b`` becomes ``b`` with probability ``(x - a) / (b - a)``, else ``a``; bf16
    values, infinities and NaNs stay as they are.

    Adds 16 uniform random bits to the fp32 bit pattern, then drops the low 16 bits (a bf16 is
    the top half of an fp32). In the sign-magnitude encoding this rounds the magnitude, so it is
    unbiased for negative values too."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic_round_to_bf16 takes fp32 tensors, got {x.dtype}")
    noise = torch.randint(0, _MASK_16 + 1, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return _add_noise_and_truncate(x, noise).to(torch.bfloat16)


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (decoupled weight decay, same arguments and defaults) whose bf16
    parameters are updated as ``bf16_update`` says (see the module docstring): in a config,
    ``optimizer: {_component_: tunekit.training.optimizers.AdamW, lr: 2.0e-5, bf16_update:
    stochastic_round, seed: ${seed}}``.

    Args:
        bf16_update: ``stochastic_round`` | ``fp32_master`` | ``nearest``; a param group may set
            its own.
        seed: seeds the stochastic rounding (with rank, parameter position and step).
        foreach / fused: as for ``torch.optim.AdamW``; they pick torch's kernel for the fp32
            math of bf16 parameters too (``fused=True`` is the fastest on CPU and GPU).
    Not supported (use ``torch.optim.AdamW``): amsgrad, maximize, capturable, differentiable.
    """

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, bf16_update: str = "stochastic_round",
                 seed: int = 0, foreach: bool | None = None, fused: bool | None = None) -> None:
        _check_bf16_update(bf16_update)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         foreach=foreach, fused=fused)
        self.defaults.update(bf16_update=bf16_update, seed=int(seed))  # for later add_param_group
        for group in self.param_groups:
            group.setdefault("bf16_update", bf16_update)
            group.setdefault("seed", int(seed))
            _check_bf16_update(group["bf16_update"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank = get_world_size_and_rank()[1]
        position = 0  # a parameter's position over all groups: part of its rounding seed
        for group in self.param_groups:
            others = []
            for p in group["params"]:
                if p.grad is not None and p.dtype == torch.bfloat16:
                    self._bf16_step(group, p, _seed(group["seed"], rank, position))
                elif p.grad is not None:
                    others.append(p)
                position += 1
            if others:
                self._torch_step(group, others)
        return loss

    def _new_step_count(self, group, p: Tensor) -> Tensor:
        # where torch.optim.AdamW keeps it: on the parameter's device for fused kernels, else CPU
        on_device = group["fused"] or group["capturable"]
        return torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")

    def _torch_step(self, group, params: list[Tensor]) -> None:
        """torch.optim.AdamW's update of ``params`` (not bf16), with its state layout."""
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = self._new_step_count(group, p)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        adam(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
             [], [s["step"] for s in states], **self._adam_kwargs(group),
             has_complex=any(torch.is_complex(p) for p in params),
             grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None))

    def _adam_kwargs(self, group) -> dict:
        beta1, beta2 = group["betas"]
        return {"foreach": group["foreach"], "fused": group["fused"], "capturable": group["capturable"],
                "differentiable": group["differentiable"], "decoupled_weight_decay": True,
                "amsgrad": group["amsgrad"], "maximize": group["maximize"], "beta1": beta1, "beta2": beta2,
                "lr": group["lr"], "weight_decay": group["weight_decay"], "eps": group["eps"]}

    def _bf16_step(self, group, p: Tensor, seed: int) -> None:
        """One AdamW step of the bf16 parameter ``p`` in fp32, written back per ``bf16_update``."""
        mode = group["bf16_update"]
        state = self.state[p]
        if not state:
            moments = torch.float32 if mode == "fp32_master" else torch.bfloat16
            state["step"] = self._new_step_count(group, p)
            state["exp_avg"] = torch.zeros_like(p, dtype=moments, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=moments, memory_format=torch.contiguous_format)
        if mode == "fp32_master" and "master" not in state:  # also: resuming a run that had no master
            state["master"] = p.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        elif mode != "fp32_master":
            state.pop("master", None)
        generator = None
        if mode == "stochastic_round":
            generator = torch.Generator(device=_local(p).device)
            generator.manual_seed(_seed(seed, int(state["step"].item()) + 1))
        weight = _local(state["master"] if mode == "fp32_master" else p)
        tensors = [_flat(weight), _flat(_local(p.grad)), _flat(_local(state["exp_avg"])),
                   _flat(_local(state["exp_avg_sq"]))]
        kwargs = self._adam_kwargs(group)
        for start in range(0, tensors[0].numel(), _CHUNK):
            pieces = [t[start:start + _CHUNK] for t in tensors]
            w, g, m, v = (t.float() for t in pieces)  # no copy for fp32 state: updated in place
            adam([w], [g], [m], [v], [], [state["step"].clone()], **kwargs)
            if generator is not None:
                # one draw of 31 random bits per element: 16 for the weight, the next 15 for v
                bits = torch.empty_like(w, dtype=torch.int32).random_(generator=generator)
                _store(pieces[3], v, bits.bitwise_right_shift(16).bitwise_left_shift_(1))
                _store(pieces[0], w, bits.bitwise_and_(_MASK_16))
            else:
                _store(pieces[0], w)
                _store(pieces[3], v)
            _store(pieces[2], m)  # to nearest: see the module docstring
            if mode == "fp32_master":  # the bf16 weight is the master's nearest value
                _flat(_local(p))[start:start + _CHUNK].copy_(w)
        state["step"] += 1

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts every floating state tensor to its parameter's dtype: the fp32 master and
        # fp32 moments of a bf16 parameter would come back rounded to bf16. Restore them.
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                loaded = self.state[p].get(key)
                if key != "step" and torch.is_tensor(value) and loaded is not None and value.dtype != loaded.dtype:
                    self.state[p][key] = value.to(device=p.device, copy=True)


def _check_bf16_update(mode: str) -> None:
    if mode not in BF16_UPDATES:
        raise UserError(f"optimizer.bf16_update must be one of {', '.join(BF16_UPDATES)}; got {mode!r}")


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (sharing its storage), or ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def _flat(t: Tensor) -> Tensor:
    if not t.is_contiguous():
        raise RuntimeError("tunekit AdamW: bf16 parameters, gradients and state must be contiguous")
    return t.view(-1)


def _store(dst: Tensor, src: Tensor, noise: Tensor | None = None) -> None:
    """Write the fp32 result ``src`` into ``dst``: a no-op when ``src`` is ``dst`` itself (fp32
    state updated in place); into bf16 stochastically with ``noise`` (int32, uniform random values
    below 2^16, consumed), else rounded to nearest even."""
    if src.data_ptr() == dst.data_ptr() and src.dtype == dst.dtype:
        return
    if noise is not None and dst.dtype == torch.bfloat16:
        src = _add_noise_and_truncate(src, noise)
    dst.copy_(src)


def _add_noise_and_truncate(x: Tensor, noise: Tensor) -> Tensor:
    """fp32 ``x`` + ``noise`` in the low 16 bits of its encoding, those bits then cleared: a bf16
    value in fp32 (converting it to bf16 is exact). Reuses ``noise``'s memory."""
    return noise.add_(x.contiguous().view(torch.int32)).bitwise_and_(~_MASK_16).view(torch.float32)


def _seed(*values: int) -> int:
    """A well-mixed 63-bit seed from ``values`` (splitmix64 steps): nearby inputs (step 5 and 6,
    parameter 3 and 4) must give unrelated random streams."""
    h = 0x9E3779B97F4A7C15
    for value in values:
        h = (h ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h >> 1


