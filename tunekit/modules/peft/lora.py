"""LoRA (Hu et al. 2021), DoRA (Liu et al. 2024) and QLoRA (Dettmers et al. 2023) linear layers.

A ``LoRALinear`` replaces an ``nn.Linear`` in place and keeps the base ``weight`` / ``bias``
under their original names, so a base checkpoint loads into a LoRA model unchanged and the
adapter parameters are the extra keys ``lora_a.weight``, ``lora_b.weight`` (and ``magnitude``
for DoRA).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from tunekit.config.errors import UserError

ADAPTER_SUFFIXES = ("lora_a.weight", "lora_b.weight", "magnitude")


def _nf4():
    # torchao is only imported when a quantized base is actually used.
    from tunekit.modules.peft import nf4

    return nf4


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """alpha / rank, or alpha / sqrt(rank) for rank-stabilised LoRA (Kalajdzievskiy 2023)."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha / r) B A dropout(x), with W, b frozen.

    With ``use_dora`` the layer follows PEFT's DoRA: the adapted weight W' = W + s B A is split
    into its per-output-row norm and direction, and the norm is replaced by a learned
    ``magnitude`` [out]; the norm ||W'|| is treated as a constant (detached) as the DoRA paper
    (section 4.3) and PEFT do. With ``quantize_base`` W is stored as NF4.

    Args:
        weight: base weight [out, in]; stored as given (the same tensor object, no copy) unless
            quantized.
        bias: base bias [out] or None.
    Shapes: forward maps x [..., in] to [..., out].
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_dora: bool = False,
        quantize_base: bool = False,
        use_rslora: bool = False,
    ):
        super().__init__()
        if not isinstance(rank, int) or rank <= 0:
            raise UserError(f"LoRA rank must be a positive integer, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        out_features, in_features = weight.shape
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha, self.use_dora, self.use_rslora = rank, alpha, use_dora, use_rslora
        self.scaling = lora_scaling(alpha, rank, use_rslora)
        self.quantized = quantize_base

        if quantize_base:
            weight = _nf4().to_nf4(weight)
        if not isinstance(weight, nn.Parameter):
            weight = nn.Parameter(weight, requires_grad=False)
        weight.requires_grad_(False)
        self.weight = weight
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        if bias is not None:
            bias.requires_grad_(False)
        self.bias = bias

        factory = {"device": weight.device, "dtype": weight.dtype}
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_a = nn.Linear(in_features, rank, bias=False, **factory)
        self.lora_b = nn.Linear(rank, out_features, bias=False, **factory)
        self.magnitude = nn.Parameter(torch.empty(out_features, **factory)) if use_dora else None
        # True while `adapters_disabled(model)` is active: the layer is the frozen base alone (the
        # reference model of preference tuning, with no second copy of the weights)
        self.disabled = False
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **lora_kwargs) -> "LoRALinear":
        """Wrap an existing ``nn.Linear``, sharing its weight and bias tensors."""
        return cls(linear.weight, linear.bias, **lora_kwargs)

    def reset_lora_parameters(self) -> None:
        """A ~ kaiming-uniform(a=sqrt(5)) and B = 0 as in PEFT, so the layer starts equal to the base;
        DoRA's magnitude starts at the row norms of W. A no-op on the meta device."""
        if self.lora_a.weight.device.type == "meta":
            return
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        if self.magnitude is not None and self.weight.device.type != "meta":
            with torch.no_grad():
                self.magnitude.copy_(self._row_norm(self.base_weight(torch.float32), None))

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen base weight [out, in] as a plain tensor (dequantized if NF4)."""
        if self.quantized:
            return _nf4().nf4_dequantize(self.weight, dtype)
        return self.weight if dtype is None else self.weight.to(dtype)

    def lora_delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """s * B @ A [out, in]."""
        a, b = self.lora_a.weight, self.lora_b.weight
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        return self.scaling * (b @ a)

    def _row_norm(self, weight: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        # ||W + s B A|| per output row, computed in float32 and never differentiated
        # (DoRA section 4.3; PEFT detaches it the same way).
        with torch.no_grad():
            w = weight.float() if delta is None else weight.float() + delta.float()
            return torch.linalg.vector_norm(w, dim=1)

    def dora_scale(self, dtype: torch.dtype) -> torch.Tensor:
        """magnitude / ||W + s B A||_row, shape [out]; differentiable w.r.t. magnitude only."""
        norm = self._row_norm(self.base_weight(torch.float32), self.lora_delta(torch.float32))
        return self.magnitude / norm.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            base_out = _nf4().linear_nf4(x, self.weight)
        else:
            base_out = F.linear(x, self.weight)
        if self.disabled:
            return base_out if self.bias is None else base_out + self.bias
        dropped = self.dropout(x)
        if not self.use_dora:
            # s * B(A x) added inside the B matmul (addmm's beta=1), with s applied to the rank-r
            # tensor: no separate scale and add passes over the [..., out] output.
            hidden = self.lora_a(dropped) * self.scaling
            out = torch.addmm(base_out.reshape(-1, self.out_features), hidden.reshape(-1, self.rank),
                              self.lora_b.weight.t()).view(base_out.shape)
            return out if self.bias is None else out + self.bias
        lora_out = self.lora_b(self.lora_a(dropped))
        if self.use_dora:
            scale = self.dora_scale(x.dtype)
            # PEFT's DoRA: m/||W'|| * (W x_d + s B A x_d) - W x_d added to the base output W x; with
            # dropout active x_d != x and the base term is recomputed on the dropped input.
            if isinstance(self.dropout, nn.Identity) or not self.training:
                direction_base = base_out
            elif self.quantized:
                direction_base = _nf4().linear_nf4(dropped, self.weight)
            else:
                direction_base = F.linear(dropped, self.weight)
            out = base_out + (scale - 1) * direction_base + scale * (self.scaling * lora_out)
        else:
            out = base_out + self.scaling * lora_out
        if self.bias is not None:
            out = out + self.bias
        return out

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The plain weight [out, in] whose linear map equals this layer in eval mode (no dropout):
        W + s B A, or for DoRA m / ||W + s B A||_row * (W + s B A). Computed in float32, returned
        in the base weight's dtype."""
        weight = self.base_weight(torch.float32) + self.lora_delta(torch.float32)
        if self.use_dora:
            weight = (self.magnitude.float() / self._row_norm(weight, None)).unsqueeze(1) * weight
        return weight.to(self.weight.dtype)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """Trainable adapter parameters by their name inside this module."""
        params = {"lora_a.weight": self.lora_a.weight, "lora_b.weight": self.lora_b.weight}
        if self.magnitude is not None:
            params["magnitude"] = self.magnitude
        return params

    def extra_repr(self) -> str:
        extras = [f"in_features={self.in_features}", f"out_features={self.out_features}",
                  f"rank={self.rank}", f"alpha={self.alpha}"]
        extras += [flag for flag in ("use_dora", "use_rslora", "quantized") if getattr(self, flag)]
        return ", ".join(extras)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """All LoRALinear submodules by their module path (e.g. ``layers.0.attn.q_proj``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within this context every LoRA / DoRA layer of ``model`` computes its frozen base alone
    (QLoRA: the NF4 base), so ``model`` is the model before fine-tuning: the reference of DPO-style
    losses at no memory cost. Raises ``UserError`` if the model has no LoRA layers."""
    layers = list(lora_modules(model).values())
    if not layers:
        raise UserError("adapters_disabled: the model has no LoRA layers; a full fine-tune needs its own "
                        "reference model")
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False


def _linear_children(model: nn.Module) -> list[tuple[nn.Module, str, str, nn.Linear]]:
    """(parent, attribute name, full path, linear) for every plain nn.Linear in the model."""
    found = []
    for parent_path, parent in model.named_modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.Linear):
                path = f"{parent_path}.{attr}" if parent_path else attr
                found.append((parent, attr, path, child))
    return found


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    return {pid for pid, n in counts.items() if n > 1}


def apply_lora(
    model: nn.Module,
    targets: Iterable[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    use_rslora: bool = False,
) -> nn.Module:
    """Replace every ``nn.Linear`` child whose attribute name is in ``targets`` (e.g. ``q_proj``,
    ``v_proj``, ``output_proj``, ``w1``, ``w2``, ``w3``, ``output``) by a ``LoRALinear`` sharing
    its weight, then freeze every non-adapter parameter. Works in place (also on the meta device:
    adapters are then created on meta; call ``reset_lora_parameters`` after loading weights) and
    returns ``model``.

    Raises UserError if a target matches no Linear, naming the Linear attributes available.
    """
    if isinstance(targets, str):
        targets = [targets]
    targets = list(dict.fromkeys(targets))
    if not targets:
        raise UserError("apply_lora: `targets` is empty; name at least one Linear, e.g. ['q_proj', 'v_proj']")
    if lora_modules(model):
        raise ValueError("apply_lora: the model already has LoRA layers; apply LoRA once (or merge_lora first)")

    linears = _linear_children(model)
    chosen = [(parent, attr, path, linear) for parent, attr, path, linear in linears if attr in targets]
    missing = [t for t in targets if all(attr != t for _, attr, _, _ in chosen)]
    if missing:
        available = sorted({attr for _, attr, _, _ in linears})
        hint = ""
        if "output" in missing and not isinstance(getattr(model, "output", None), nn.Linear):
            hint = " ('output' is absent when the output projection is tied to tok_embeddings: drop it)"
        raise UserError(
            f"apply_lora: LoRA target(s) {missing} match no nn.Linear in the model{hint}; "
            f"available Linear names: {available}"
        )
    if quantize_base:
        shared = _shared_parameter_ids(model)
        for _, attr, path, linear in chosen:
            if id(linear.weight) in shared:
                raise UserError(
                    f"apply_lora: cannot quantize '{path}.weight' to NF4 because it is tied to another "
                    f"parameter (e.g. tied embeddings); remove '{attr}' from the LoRA targets for QLoRA"
                )
            if linear.weight.is_meta:
                raise ValueError(
                    f"apply_lora: '{path}.weight' is on the meta device; QLoRA quantizes real weights, "
                    "so load the base weights before apply_lora(..., quantize_base=True)"
                )

    for parent, attr, _, linear in chosen:
        lora = LoRALinear.from_linear(
            linear, rank=rank, alpha=alpha, dropout=dropout, use_dora=use_dora,
            quantize_base=quantize_base, use_rslora=use_rslora,
        )
        setattr(parent, attr, lora)

    adapter_ids = {id(p) for m in lora_modules(model).values() for p in m.adapter_params().values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapter_ids)
    return model


def reset_lora_parameters(model: nn.Module) -> nn.Module:
    """Materialize adapters created on the meta device (on their base weight's device) and
    initialize them; call after the base weights of a meta-built model are loaded."""
    for module in lora_modules(model).values():
        device = module.weight.device
        if module.lora_a.weight.device.type == "meta":
            module.lora_a.to_empty(device=device)
            module.lora_b.to_empty(device=device)
            if module.magnitude is not None:
                module.magnitude = nn.Parameter(torch.empty_like(module.magnitude, device=device))
        module.reset_lora_parameters()
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors only, by tunekit name (``layers.0.attn.q_proj.lora_a.weight``, ...,
    ``...magnitude`` for DoRA), detached, sharing storage with the model."""
    out = {}
    for path, module in lora_modules(model).items():
        for name, p in module.adapter_params().items():
            out[f"{path}.{name}"] = p.detach()
    return out


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every LoRA layer merged into a plain weight and no adapter
    keys: base checkpoint names and shapes, ready to save as a full model. The model is unchanged."""
    state = model.state_dict()
    for path, module in lora_modules(model).items():
        for name in ADAPTER_SUFFIXES:
            state.pop(f"{path}.{name}", None)
        state[f"{path}.weight"] = module.merged_weight()
    return state


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear into a plain ``nn.Linear`` holding the merged weight (dequantizing NF4
    bases), so inference costs exactly what the base model costs. In place; returns ``model``.
    The merged weights keep ``requires_grad=False``."""
    for path, module in list(lora_modules(model).items()):
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        weight = module.merged_weight()
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            linear.bias = module.bias
        setattr(parent, attr, linear)
    return model
