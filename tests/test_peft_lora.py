"""LoRA / DoRA / QLoRA layers against float64 formulas and against PEFT's implementation."""

import math

import pytest
import torch
from torch import nn

from tunekit.modules.peft import (
    LoRALinear,
    apply_lora,
    freeze_layers,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    reset_lora_parameters,
    trainable_parameters,
)


class Block(nn.Module):
    def __init__(self, dim=64, hidden=128):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim, bias=True)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        h = x + self.v_proj(torch.tanh(self.q_proj(x)))
        return h + self.w2(torch.relu(self.w1(h)))


class TinyDecoder(nn.Module):
    """Just enough of the model contract (tok_embeddings, layers, norm, output) for these tests."""

    def __init__(self, vocab=96, dim=64, n_layers=3, tied=False):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Block(dim) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        self.output = None if tied else nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h)
        return h @ self.tok_embeddings.weight.T if self.output is None else self.output(h)


def _randomize_adapters(model, seed=0):
    # B starts at zero; give every adapter tensor non-trivial values so the tests can fail.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 else 0.0))


def test_lora_linear_matches_float64_formula():
    torch.manual_seed(0)
    base = nn.Linear(48, 32)
    layer = LoRALinear.from_linear(base, rank=4, alpha=8.0)
    _randomize_adapters(layer)
    x = torch.randn(2, 5, 48)
    W, b = base.weight.double(), base.bias.double()
    A, B = layer.lora_a.weight.double(), layer.lora_b.weight.double()
    ref = x.double() @ W.T + b + (8.0 / 4) * (x.double() @ A.T @ B.T)
    torch.testing.assert_close(layer(x).double(), ref, atol=1e-5, rtol=1e-5)
    assert layer.weight is base.weight and layer.bias is base.bias  # same tensors, no copy


def test_lora_starts_equal_to_base_and_rslora_scaling():
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    layer = LoRALinear.from_linear(base, rank=4, alpha=8.0, use_rslora=True)
    assert layer.scaling == pytest.approx(8.0 / math.sqrt(4))
    assert torch.count_nonzero(layer.lora_b.weight) == 0
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) on fan_in=16, as PEFT/nn.Linear
    assert layer.lora_a.weight.abs().max() <= bound and layer.lora_a.weight.std() > 0.2 * bound
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), base(x))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("use_dora", [False, True])
def test_matches_peft_forward_and_gradients(use_dora, dropout):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    ours, theirs = Block(), Block()
    theirs.load_state_dict(ours.state_dict())
    targets = ["q_proj", "v_proj", "w1", "w2"]
    apply_lora(ours, targets, rank=4, alpha=16.0, dropout=dropout, use_dora=use_dora)
    _randomize_adapters(ours)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=dropout, target_modules=targets, use_dora=use_dora)
    theirs = peft.get_peft_model(theirs, cfg)
    with torch.no_grad():
        for path, tensor in lora_state_dict(ours).items():
            module, name = path.rsplit(".", 2)[0], path.split(".", 1)[1]
            peft_name = {"lora_a.weight": "lora_A.default.weight", "lora_b.weight": "lora_B.default.weight",
                         "magnitude": "lora_magnitude_vector.default.weight"}[name]
            theirs.get_parameter(f"base_model.model.{module}.{peft_name}").copy_(tensor)
    ours.train(), theirs.train()
    x = torch.randn(2, 7, 64)
    torch.manual_seed(1)
    out_ours = ours(x)
    torch.manual_seed(1)  # same dropout masks: both call dropout once per layer, in the same order
    out_theirs = theirs(x)
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-5, rtol=1e-5)
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    for path, p in lora_state_dict(ours).items():
        module, name = path.rsplit(".", 2)[0], path.split(".", 1)[1]
        peft_name = {"lora_a.weight": "lora_A.default.weight", "lora_b.weight": "lora_B.default.weight",
                     "magnitude": "lora_magnitude_vector.default.weight"}[name]
        grad_theirs = theirs.get_parameter(f"base_model.model.{module}.{peft_name}").grad
        grad_ours = ours.get_parameter(path).grad
        torch.testing.assert_close(grad_ours, grad_theirs, atol=1e-4, rtol=1e-4)


def test_dora_norm_is_detached_and_magnitude_init():
    torch.manual_seed(0)
    base = nn.Linear(32, 16, bias=False)
    layer = LoRALinear.from_linear(base, rank=2, alpha=2.0, use_dora=True)
    torch.testing.assert_close(layer.magnitude, base.weight.norm(dim=1))
    x = torch.randn(4, 32)
    torch.testing.assert_close(layer(x), base(x))  # m / ||W|| = 1 at init
    _randomize_adapters(layer)
    x = torch.randn(4, 32, dtype=torch.float64)
    layer.double()
    layer(x).sum().backward()
    # float64 reference with ||W + sBA|| treated as a constant (DoRA paper 4.3)
    W = base.weight.detach().double()
    A = layer.lora_a.weight.detach().clone().requires_grad_()
    B = layer.lora_b.weight.detach().clone().requires_grad_()
    m = layer.magnitude.detach().clone().requires_grad_()
    adapted = W + 1.0 * B @ A
    ref = (x @ adapted.T) * (m / adapted.detach().norm(dim=1))
    ref.sum().backward()
    for ours, theirs in [(layer.lora_a.weight, A), (layer.lora_b.weight, B), (layer.magnitude, m)]:
        torch.testing.assert_close(ours.grad, theirs.grad)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_equals_unmerged_forward(use_dora):
    torch.manual_seed(0)
    model = TinyDecoder()
    apply_lora(model, ["q_proj", "v_proj", "w1", "w2", "output"], rank=4, alpha=8.0, use_dora=use_dora)
    _randomize_adapters(model)
    model.eval()
    tokens = torch.randint(0, 96, (2, 9))
    before = model(tokens)
    state = merged_state_dict(model)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.layers[0].q_proj) is nn.Linear and model.layers[0].q_proj.bias is not None
    assert set(state) == set(model.state_dict())
    torch.testing.assert_close(model(tokens), before, atol=1e-5, rtol=1e-5)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(state[k], v)


def test_only_adapters_train():
    torch.manual_seed(0)
    model = TinyDecoder()
    apply_lora(model, ["q_proj", "w2"], rank=2, alpha=4.0, use_dora=True)
    trainable = trainable_parameters(model)
    assert set(trainable) == set(lora_state_dict(model))
    assert len(trainable) == 3 * 2 * 3  # 3 layers x 2 targets x (A, B, magnitude)
    model(torch.randint(0, 96, (2, 5))).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


def test_apply_lora_errors():
    model = TinyDecoder()
    with pytest.raises(ValueError, match=r"\['q_prj'\].*available Linear names: \['output', 'q_proj', 'v_proj', 'w1', 'w2'\]"):
        apply_lora(model, ["q_prj", "v_proj"], rank=2, alpha=2.0)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing half-applied
    tied = TinyDecoder(tied=True)
    with pytest.raises(ValueError, match="tied"):
        apply_lora(tied, ["output"], rank=2, alpha=2.0)
    with pytest.raises(ValueError, match="rank"):
        apply_lora(TinyDecoder(), ["q_proj"], rank=0, alpha=2.0)


def test_apply_lora_on_meta_then_load():
    torch.manual_seed(0)
    reference = TinyDecoder()
    with torch.device("meta"):
        model = TinyDecoder()
    apply_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4.0, use_dora=True)
    assert model.layers[0].q_proj.lora_a.weight.is_meta
    model.load_state_dict(reference.state_dict(), strict=False, assign=True)
    reset_lora_parameters(model)
    assert not any(p.is_meta for p in model.parameters())
    assert set(trainable_parameters(model)) == set(lora_state_dict(model))
    tokens = torch.randint(0, 96, (2, 6))
    torch.testing.assert_close(model(tokens), reference(tokens))


def test_qlora_base_bytes_at_most_0_3x_bf16():
    from tunekit.modules.peft import nf4

    base = nn.Linear(256, 128, bias=False, dtype=torch.bfloat16)
    bf16_bytes = base.weight.numel() * base.weight.element_size()
    layer = LoRALinear.from_linear(base, rank=4, alpha=8.0, quantize_base=True)
    assert nf4.is_nf4(layer.weight) and not layer.weight.requires_grad
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_a.weight.dtype == torch.bfloat16
    assert nf4.nf4_nbytes(layer.weight) <= 0.3 * bf16_bytes
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    ref = x.double() @ nf4.nf4_dequantize(layer.weight, torch.float64).T
    torch.testing.assert_close(layer(x).double(), ref, atol=0.05, rtol=0.02)  # bf16 rounding only


def test_qlora_forward_and_grad_match_dequantized_reference():
    from tunekit.modules.peft import nf4

    torch.manual_seed(0)
    base = nn.Linear(256, 128, bias=True)
    layer = LoRALinear.from_linear(base, rank=4, alpha=8.0, quantize_base=True)
    _randomize_adapters(layer)
    W = nf4.nf4_dequantize(layer.weight, torch.float32)
    # NF4 is lossy but close: 4-bit codes with per-64 absmax scales
    assert (W - base.weight).abs().max() < 0.2 * base.weight.abs().max()
    x = torch.randn(3, 256, requires_grad=True)
    out = layer(x)
    xr = x.detach().clone().requires_grad_()
    A = layer.lora_a.weight.detach().clone().requires_grad_()
    B = layer.lora_b.weight.detach().clone().requires_grad_()
    ref = xr @ W.T + base.bias.detach() + 2.0 * ((xr @ A.T) @ B.T)
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.lora_a.weight.grad, A.grad)
    torch.testing.assert_close(layer.lora_b.weight.grad, B.grad)
    assert base.bias.grad is None


def test_qlora_model_merge_and_small_shapes():
    torch.manual_seed(0)
    model = TinyDecoder(tied=True)
    with pytest.raises(ValueError, match="output"):
        apply_lora(TinyDecoder(tied=True), ["output"], rank=2, alpha=2.0, quantize_base=True)
    apply_lora(model, ["q_proj", "v_proj", "w1", "w2"], rank=2, alpha=4.0, use_dora=True, quantize_base=True)
    _randomize_adapters(model)
    model.eval()
    tokens = torch.randint(0, 96, (2, 6))
    before = model(tokens)
    merge_lora(model)
    torch.testing.assert_close(model(tokens), before, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="meta"):
        with torch.device("meta"):
            apply_lora(TinyDecoder(), ["q_proj"], rank=2, alpha=2.0, quantize_base=True)


def test_freeze_layers():
    model = TinyDecoder(n_layers=4)
    freeze_layers(model, 2)
    names = set(trainable_parameters(model))
    assert names and all(n.startswith(("layers.2.", "layers.3.", "norm.", "output.")) for n in names)
    assert "output.weight" in names and "norm.weight" in names and "layers.3.w1.weight" in names
    tied = TinyDecoder(n_layers=4, tied=True)
    freeze_layers(tied, 1)
    assert "tok_embeddings.weight" not in trainable_parameters(tied)
    with pytest.raises(ValueError, match=r"\[0, 4\]"):
        freeze_layers(model, 5)
