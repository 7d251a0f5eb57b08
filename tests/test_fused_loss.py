"""The fused output-projection + cross-entropy path (TransformerDecoder(..., labels=...),
linear_cross_entropy) against a float64 reference; the synthetic benchmark dataset."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunekit.data.synthetic import random_token_dataset
from tunekit.models import decoder_lm
from tunekit.modules.peft import apply_lora
from tunekit.losses.cross_entropy import linear_cross_entropy

torch.set_num_threads(1)


def _model(tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    return decoder_lm(vocab_size=50, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64,
                      max_seq_len=16, tie_word_embeddings=tied)


def _labels(b, s, vocab, g):
    labels = torch.randint(vocab, (b, s), generator=g)
    labels[0, :3] = -100  # prompt tokens
    labels[1, -2:] = -100  # padding
    return labels


def _reference_loss_and_grads(model, tokens, labels):
    """float64 copy of the model: logits -> cross-entropy summed over labelled tokens."""
    ref = _model(model.tied).double()
    ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    loss = F.cross_entropy(ref(tokens).flatten(0, 1), labels.flatten(), reduction="sum")
    loss.backward()
    return loss, {n: p.grad for n, p in ref.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
def test_decoder_with_labels_returns_the_summed_loss_and_its_gradients(tied):
    g = torch.Generator().manual_seed(0)
    model = _model(tied)
    tokens, labels = torch.randint(50, (2, 9), generator=g), _labels(2, 9, 50, g)
    loss = model(tokens, labels=labels)
    loss.backward()
    ref_loss, ref_grads = _reference_loss_and_grads(model, tokens, labels)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad.double(), ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # evaluation: the same loss, no gradient work
        torch.testing.assert_close(model(tokens, labels=labels), loss.detach())


def test_decoder_with_lora_on_the_output_falls_back_to_logits():
    g = torch.Generator().manual_seed(1)
    model = apply_lora(_model(False), ["q_proj", "output"], rank=2, alpha=4)
    torch.nn.init.normal_(model.output.lora_b.weight)
    tokens, labels = torch.randint(50, (2, 9), generator=g), _labels(2, 9, 50, g)
    expected = F.cross_entropy(model(tokens).flatten(0, 1), labels.flatten(), reduction="sum")
    torch.testing.assert_close(model(tokens, labels=labels), expected)


def test_linear_cross_entropy_bf16_matches_the_unfused_bf16_path():
    """Same logits (bf16 matmul) and fp32 log-softmax as logits + chunked CE; gradients within
    bf16 rounding of the unfused path's."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 40, 16, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(300, 16, generator=g).bfloat16().requires_grad_()
    labels = _labels(3, 40, 300, g)
    loss = linear_cross_entropy(hidden, weight, labels, num_chunks=4) / 100
    loss.backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = F.cross_entropy((h2 @ w2.t()).float().flatten(0, 1), labels.flatten(), reduction="sum") / 100
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hidden.grad.float(), h2.grad.float(), rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(weight.grad.float(), w2.grad.float(), rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("gap", [5.0, 80.0, 200.0])
def test_linear_cross_entropy_far_below_the_max_logit(gap):
    """Losses of 5, ~80 and ~200 nats: where p_y is no longer a normal fp32 number the loss comes from
    the log-softmax instead of log(p_y); loss and gradients against float64."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(6, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(40, 8, generator=g, dtype=torch.float64) * 0.1
    labels = torch.arange(6)
    weight[labels] -= gap * hidden / hidden.pow(2).sum(-1, keepdim=True)  # label logits `gap` lower
    h32, w32 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    loss = linear_cross_entropy(h32, w32, labels, num_chunks=2)
    loss.backward()
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = F.cross_entropy(h64 @ w64.t(), labels, reduction="sum")
    ref.backward()
    assert ref.item() > 6 * gap * 0.9
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(h32.grad.double(), h64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w32.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)


def test_random_token_dataset_rows_are_full_length_shifted_and_reproducible():
    data = random_token_dataset(None, vocab_size=7, seq_len=5, num_samples=3, seed=1)
    batch = data.collate([data[0], data[2]])
    assert batch["tokens"].shape == batch["labels"].shape == (2, 5)
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])  # labels = next tokens
    assert 0 <= int(batch["tokens"].min()) and int(batch["tokens"].max()) < 7
    assert torch.equal(data[2]["tokens"], random_token_dataset(vocab_size=7, seq_len=5, num_samples=3, seed=1)[2]["tokens"])
    assert not torch.equal(data[0]["tokens"], data[1]["tokens"])
    with pytest.raises(ValueError, match="seq_len"):
        random_token_dataset(vocab_size=7, seq_len=0, num_samples=3)


@pytest.mark.parametrize("weight_grad", [False, True])
def test_linear_token_log_probs_match_float64_with_per_token_gradients(weight_grad):
    """Per-token log p(label) of the fused projection (what preference losses sum per completion):
    values, the mean logits and the gradients of a weighted sum equal a float64 computation."""
    from tunekit.losses.cross_entropy import linear_token_log_probs

    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    weight = torch.randn(60, 16, generator=g, requires_grad=weight_grad)
    labels = torch.randint(60, (3, 11), generator=g)
    labels[0, :4] = -100
    labels[2, -1] = -100
    log_probs, means = linear_token_log_probs(hidden, weight, labels, num_chunks=4)
    scale = torch.randn(3, 11, generator=g)
    (log_probs * scale).sum().backward()

    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logits = h64 @ w64.t()
    valid = labels != -100
    ref = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * valid
    (ref * scale.double()).sum().backward()
    torch.testing.assert_close(log_probs.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(means.double(), logits.mean(-1) * valid, atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, atol=1e-5, rtol=0)
    if weight_grad:
        torch.testing.assert_close(weight.grad.double(), w64.grad, atol=1e-4, rtol=0)
    assert not means.requires_grad


def test_decoder_per_token_log_probs_and_adapters_disabled():
    from tunekit.modules.peft import adapters_disabled

    g = torch.Generator().manual_seed(2)
    model = _model(False)
    tokens, labels = torch.randint(50, (2, 9), generator=g), _labels(2, 9, 50, g)
    log_probs, _ = model(tokens, labels=labels, per_token=True)
    torch.testing.assert_close(-log_probs.sum(), model(tokens, labels=labels), atol=1e-4, rtol=0)
    apply_lora(model, ["q_proj", "output"], rank=2, alpha=4)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    with adapters_disabled(model):  # the base model again: the preference recipes' reference
        torch.testing.assert_close(model(tokens, labels=labels, per_token=True)[0], log_probs)
    adapted, _ = model(tokens, labels=labels, per_token=True)  # LoRA on the output: the logits path
    expected = torch.log_softmax(model(tokens).float(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    torch.testing.assert_close(adapted, expected * (labels != -100), atol=1e-5, rtol=0)
    assert (adapted - log_probs).abs().max() > 1e-3
