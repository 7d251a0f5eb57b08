"""Building blocks against float64 references written from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunekit.models import decoder_lm
from tunekit.modules import (
    Attention,
    FeedForward,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    block_causal_mask,
    causal_mask,
    document_ids_from_seq_lens,
    document_positions,
    padding_mask,
    padding_positions,
    reset_rope_buffers,
    rope_inv_freq,
)

gen = torch.Generator().manual_seed(0)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=dtype)


# --- RMSNorm ------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [False, True])
def test_rms_norm_matches_formula(offset):
    norm = RMSNorm(32, eps=1e-5, offset=offset)
    with torch.no_grad():
        norm.weight.copy_(randn(32))
    x = randn(3, 5, 32) * 3
    x64, w64 = x.double(), norm.weight.double()
    scale = (1 + w64) if offset else w64
    want = x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + 1e-5) * scale
    assert (norm(x).double() - want).abs().max() < 1e-5


def test_rms_norm_bf16_normalises_in_fp32_and_returns_bf16():
    norm = RMSNorm(64).to(torch.bfloat16)
    x = (randn(4, 64) * 1e3).to(torch.bfloat16)  # x^2 would lose precision in bf16 arithmetic
    out = norm(x)
    assert out.dtype == torch.bfloat16
    x64 = x.double()
    want = x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + 1e-6)
    assert torch.equal(out, want.to(torch.bfloat16))


# --- rotary embeddings --------------------------------------------------------------------------

def rope_reference(x: torch.Tensor, pos: torch.Tensor, inv_freq: list[float]) -> torch.Tensor:
    """Su et al.: channel pair (j, j + d/2) is a complex number rotated by pos * inv_freq[j]."""
    x = x.double()
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half], x[..., half:])
    angle = pos.double()[..., None, None] * torch.tensor(inv_freq, dtype=torch.float64)
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat([z.real, z.imag], dim=-1)


def llama3_inv_freq_reference(dim, base, factor, low, high, old_len) -> list[float]:
    """Llama 3.1's rule, frequency by frequency."""
    out = []
    for j in range(0, dim, 2):
        freq = 1.0 / base ** (j / dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(freq)
        elif wavelen > old_len / low:
            out.append(freq / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return out


SCALINGS = {
    "default": (None, lambda d, b: [1.0 / b ** (j / d) for j in range(0, d, 2)]),
    "linear": ({"rope_type": "linear", "factor": 4.0}, lambda d, b: [1.0 / b ** (j / d) / 4 for j in range(0, d, 2)]),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64},
               lambda d, b: llama3_inv_freq_reference(d, b, 8.0, 1.0, 4.0, 64)),
}


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_rope_matches_complex_rotation(kind):
    scaling, ref_freq = SCALINGS[kind]
    dim, base = 32, 500_000.0
    inv_freq = ref_freq(dim, base)
    if kind == "llama3":  # all three regimes of the rule are exercised
        wavelens = [2 * math.pi * base ** (j / dim) for j in range(0, dim, 2)]
        assert min(wavelens) < 16 and max(wavelens) > 64 and any(16 <= w <= 64 for w in wavelens)
    torch.testing.assert_close(rope_inv_freq(dim, base, scaling).double(), torch.tensor(inv_freq,
                               dtype=torch.float64), rtol=1e-6, atol=0)
    rope = RotaryEmbedding(dim, max_seq_len=128, base=base, scaling=scaling)
    x = randn(2, 10, 3, dim)
    pos = torch.randint(0, 128, (2, 10), generator=gen)
    assert (rope(x, pos).double() - rope_reference(x, pos, inv_freq)).abs().max() < 1e-4
    # input_pos=None means positions 0..s-1
    assert torch.equal(rope(x), rope(x, torch.arange(10).expand(2, 10)))


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(16, max_seq_len=64)
    q, k = randn(1, 1, 1, 16), randn(1, 1, 1, 16)

    def score(m, n):
        return (rope(q, torch.tensor([[m]])) * rope(k, torch.tensor([[n]]))).sum().item()

    assert score(7, 3) == pytest.approx(score(40, 36), abs=1e-4)
    assert score(7, 3) != pytest.approx(score(7, 5), abs=1e-3)


def test_partial_rotary_rotates_only_the_first_channels():
    full, partial = RotaryEmbedding(8, 32), RotaryEmbedding(8, 32)
    x = randn(1, 5, 2, 24)
    out = partial(x)
    assert torch.equal(out[..., 8:], x[..., 8:])
    assert torch.equal(out[..., :8], full(x[..., :8].contiguous()))


def test_rope_rejects_unknown_scaling_and_long_sequences():
    with pytest.raises(ValueError, match="yarn"):
        RotaryEmbedding(8, 16, scaling={"rope_type": "yarn", "factor": 2.0})
    with pytest.raises(ValueError, match="max_seq_len"):
        RotaryEmbedding(8, 16)(randn(1, 17, 1, 8))


def test_meta_init_then_to_empty_and_reset_gives_correct_tables():
    kw = dict(vocab_size=32, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64,
              max_seq_len=16, rope_scaling=SCALINGS["llama3"][0])
    reference = decoder_lm(**kw)
    with torch.device("meta"):
        model = decoder_lm(**kw)
    model.to_empty(device="cpu")
    reset_rope_buffers(model)
    rope, want = model.layers[0].attn.pos_emb, reference.layers[0].attn.pos_emb
    assert rope is model.layers[1].attn.pos_emb  # one table shared by all layers
    assert torch.equal(rope.cos, want.cos) and torch.equal(rope.sin, want.sin)
    assert "cos" not in str(list(model.state_dict()))


# --- attention ----------------------------------------------------------------------------------

def attention_reference(x, attn: Attention, mask: torch.Tensor | None, softcap=None):
    """softmax(q k^T / sqrt(d) + mask) v per head, query head h reading key/value head h // groups."""
    b, s, _ = x.shape
    x = x.double()
    h, kvh, d = attn.num_heads, attn.num_kv_heads, attn.head_dim

    def proj(layer, heads):
        return F.linear(x, layer.weight.double(), None if layer.bias is None else layer.bias.double()) \
            .view(b, s, heads, d).transpose(1, 2)

    q, k, v = proj(attn.q_proj, h), proj(attn.k_proj, kvh), proj(attn.v_proj, kvh)
    kv_index = torch.arange(h) // (h // kvh)
    scores = q @ k[:, kv_index].transpose(-1, -2) / math.sqrt(d)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    allowed = causal_mask(s) if mask is None else mask[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, -1) @ v[:, kv_index]
    out = out.transpose(1, 2).reshape(b, s, h * d)
    return F.linear(out, attn.output_proj.weight.double())


def make_attention(num_heads=4, num_kv_heads=2, head_dim=8, dim=32, **kw) -> Attention:
    torch.manual_seed(0)
    return Attention(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                     q_proj=nn.Linear(dim, num_heads * head_dim, bias=True),
                     k_proj=nn.Linear(dim, num_kv_heads * head_dim, bias=True),
                     v_proj=nn.Linear(dim, num_kv_heads * head_dim, bias=True),
                     output_proj=nn.Linear(num_heads * head_dim, dim, bias=False), **kw)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_gqa_causal_matches_reference(kv_heads):
    attn = make_attention(num_kv_heads=kv_heads)
    x = randn(2, 12, 32)
    assert (attn(x).double() - attention_reference(x, attn, None)).abs().max() < 1e-5


def test_attention_padding_and_block_masks_match_reference():
    attn = make_attention()
    x = randn(2, 12, 32)
    is_token = torch.ones(2, 12, dtype=torch.bool)
    is_token[0, 9:] = False
    is_token[1, :4] = False
    for mask in (padding_mask(is_token), block_causal_mask(seq_lens=[[5, 7], [3, 3, 6]])):
        assert (attn(x, mask=mask).double() - attention_reference(x, attn, mask)).abs().max() < 1e-5


def test_attention_sliding_window_and_softcap():
    x = randn(1, 12, 32)
    window = make_attention(sliding_window=3)
    i = torch.arange(12)
    allowed = (causal_mask(12) & (i[:, None] - i[None, :] < 3))[None]
    assert (window(x).double() - attention_reference(x, window, allowed)).abs().max() < 1e-5
    capped = make_attention(softcap=2.0)
    assert (capped(x).double() - attention_reference(x, capped, None, softcap=2.0)).abs().max() < 1e-5


def test_attention_kv_cache_matches_full_attention():
    attn = make_attention(pos_emb=RotaryEmbedding(8, 32))
    x = randn(2, 10, 32)
    full = attn(x)
    attn.setup_cache(2, 16, torch.float32)
    outs = [attn(x[:, :4], input_pos=torch.arange(4).expand(2, 4))]
    outs += [attn(x[:, i:i + 1], input_pos=torch.full((2, 1), i)) for i in range(4, 10)]
    assert (torch.cat(outs, 1) - full).abs().max() < 1e-5


def test_kv_cache_writes_at_positions():
    cache = KVCache(batch_size=2, max_seq_len=6, num_kv_heads=1, head_dim=2, dtype=torch.float32)
    k = torch.arange(8.0).view(2, 2, 1, 2)
    keys, _ = cache.update(torch.tensor([[1, 2], [4, 5]]), k, -k)
    assert torch.equal(keys[0, 0, 1:3], k[0, :, 0]) and torch.equal(keys[1, 0, 4:6], k[1, :, 0])
    assert keys[0, 0, [0, 3, 4, 5]].abs().sum() == 0
    cache.reset()
    assert cache.k_cache.abs().sum() == 0


# --- feed-forward -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_gated_feed_forward_matches_formula(kind):
    torch.manual_seed(0)
    w1, w2, w3 = nn.Linear(16, 40, bias=False), nn.Linear(40, 16, bias=False), nn.Linear(16, 40, bias=False)
    act = F.silu if kind == "swiglu" else (lambda t: F.gelu(t, approximate="tanh"))
    ff = FeedForward(w1=w1, w2=w2, w3=w3, activation=act)
    x = randn(3, 16)
    a, u = x.double() @ w1.weight.double().T, x.double() @ w3.weight.double().T
    if kind == "swiglu":
        gate = a / (1 + torch.exp(-a))  # Swish_1(a) = a * sigmoid(a)
    else:
        gate = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a ** 3)))
    want = (gate * u) @ w2.weight.double().T
    assert (ff(x).double() - want).abs().max() < 1e-5


# --- masks --------------------------------------------------------------------------------------

def test_block_causal_mask_and_document_positions():
    doc_ids = document_ids_from_seq_lens([[2, 3], [4]], seq_len=6)
    assert doc_ids.tolist() == [[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 1, 1]]
    assert document_positions(doc_ids).tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1]]
    mask = block_causal_mask(doc_ids)
    for b in range(2):
        for i in range(6):
            for j in range(6):
                assert mask[b, i, j] == (j <= i and doc_ids[b, i] == doc_ids[b, j])
    assert torch.equal(block_causal_mask(seq_lens=[[2, 3, 1]]), mask[:1])


def test_padding_mask_never_leaves_a_row_empty():
    is_token = torch.tensor([[False, False, True, True], [True, True, True, False]])
    mask = padding_mask(is_token)
    assert mask.any(-1).all()
    assert mask[0, 3].tolist() == [False, False, True, True]
    assert mask[0, 0].tolist() == [True, False, False, False]  # a left pad query sees itself only
    assert mask[1, 2].tolist() == [True, True, True, False]
    assert padding_positions(is_token).tolist() == [[0, 0, 0, 1], [0, 1, 2, 2]]
