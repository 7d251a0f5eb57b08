"""Prefix tuning: learned keys/values in every attention layer; logits equal PEFT's on transformers."""

import copy
import json

import pytest
import torch
from torch import nn

from tunekit.modules import Attention, block_causal_mask, document_positions
from tunekit.modules.peft import (
    PrefixTuning,
    load_peft_adapter,
    load_peft_prefix_adapter,
    prefix_modules,
    prefix_state_dict,
    read_peft_prefix_config,
    save_peft_prefix_adapter,
    trainable_parameters,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from_hf = pytest.importorskip("tunekit.models").from_hf

VOCAB = 128
TOKENS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))

# (config class, kwargs): Llama with GQA and without, Qwen3 (k_norm, explicit head_dim)
ARCHS = {
    "llama_gqa": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "llama_mha": ("LlamaConfig", {"num_attention_heads": 4, "num_key_value_heads": 4}),
    "qwen3_gqa": ("Qwen3Config", {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32}),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def base(request, tmp_path_factory):
    """(transformers model, its saved folder) with tiny random weights."""
    cls_name, kwargs = ARCHS[request.param]
    torch.manual_seed(0)
    config = getattr(transformers, cls_name)(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, max_position_embeddings=64,
                                             tie_word_embeddings=False, **kwargs)
    hf = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))(config).eval()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(str(path))
    return hf, path


def _tunekit(path):
    return from_hf(path, dtype=torch.float32)


def _logits(model, tokens, **kwargs):
    with torch.no_grad():
        out = model(tokens, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prefix_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g))


def test_tunekit_adapter_loads_in_peft_with_equal_logits(base, tmp_path):
    hf, path = base
    ours = PrefixTuning(_tunekit(path), n_virtual_tokens=5)
    _randomize(ours)
    save_peft_prefix_adapter(ours, tmp_path, base_model_name_or_path=str(path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    attn = ours.decoder.layers[0].attn
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_layers"] == 2
    assert config["num_attention_heads"] == attn.num_kv_heads
    assert config["token_dim"] == attn.num_kv_heads * attn.head_dim
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(ours, TOKENS), _logits(theirs, TOKENS), atol=1e-4, rtol=1e-4)
    # explicit positions: PEFT adds n to position_ids, tunekit to input_pos
    pos = (torch.arange(11) + 7).expand(2, 11)
    torch.testing.assert_close(_logits(ours, TOKENS, input_pos=pos),
                               _logits(theirs, TOKENS, position_ids=pos), atol=1e-4, rtol=1e-4)
    # the comparison is not base vs base, and the position shift matters (un-shifted != PEFT)
    assert (_logits(ours, TOKENS) - _logits(hf, TOKENS)).abs().max() > 1e-2
    assert (_logits(ours.decoder, TOKENS) - _logits(theirs, TOKENS)).abs().max() > 1e-3


@pytest.mark.parametrize("prefix_projection", [False, True])
def test_peft_adapter_loads_into_tunekit_with_equal_logits(base, tmp_path, prefix_projection):
    hf, path = base
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                  prefix_projection=prefix_projection, encoder_hidden_size=16)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(hf), cfg)
    theirs.save_pretrained(str(tmp_path))  # with the projection PEFT saves the projected prefix
    theirs.eval()
    ours = load_peft_prefix_adapter(_tunekit(path), tmp_path)
    assert isinstance(ours, PrefixTuning) and ours.n_virtual_tokens == 4
    torch.testing.assert_close(_logits(ours, TOKENS), _logits(theirs, TOKENS), atol=1e-4, rtol=1e-4)
    assert set(trainable_parameters(ours)) == set(prefix_state_dict(ours))
    # and back out: what tunekit re-saves holds the same tensor
    save_peft_prefix_adapter(ours, tmp_path / "again")
    again = peft.utils.load_peft_weights(str(tmp_path / "again"))["prompt_embeddings"]
    torch.testing.assert_close(again, peft.utils.load_peft_weights(str(tmp_path))["prompt_embeddings"])


def test_only_prefix_trains_and_loss_falls(base):
    _, path = base
    model = PrefixTuning(_tunekit(path), n_virtual_tokens=4, generator=torch.Generator().manual_seed(0))
    names = set(trainable_parameters(model))
    assert names == {f"decoder.layers.{i}.attn.prefix.{kind}" for i in range(2) for kind in ("key", "value")}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in names}
    labels = torch.cat([TOKENS[:, 1:], torch.full((2, 1), -100)], dim=1)
    optimizer = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(TOKENS, labels=labels) / (labels != -100).sum()  # the fused-loss path of the recipes
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_packed_documents_see_the_prefix_and_only_themselves(base):
    _, path = base
    model = PrefixTuning(_tunekit(path), n_virtual_tokens=3)
    _randomize(model)
    doc_ids = torch.tensor([[0] * 4 + [1] * 7, [0] * 6 + [1] * 5])
    packed = _logits(model, TOKENS, mask=block_causal_mask(doc_ids), input_pos=document_positions(doc_ids))
    for row, cut in ((0, 4), (1, 6)):
        first, second = TOKENS[row:row + 1, :cut], TOKENS[row:row + 1, cut:]
        torch.testing.assert_close(packed[row:row + 1, :cut], _logits(model, first), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(packed[row:row + 1, cut:], _logits(model, second), atol=1e-4, rtol=1e-4)


def test_prefix_mask_literal_with_sliding_window():
    """Attention with a prefix equals an explicit softmax over [prefix; keys] with the mask written out."""
    torch.manual_seed(0)
    dim, heads, kv_heads, hd, n, s = 8, 2, 1, 4, 2, 4

    def linear(out):
        return nn.Linear(dim, out, bias=False)

    attn = Attention(num_heads=heads, num_kv_heads=kv_heads, head_dim=hd, q_proj=linear(heads * hd),
                     k_proj=linear(kv_heads * hd), v_proj=linear(kv_heads * hd), output_proj=nn.Linear(heads * hd, dim),
                     sliding_window=2)
    x = torch.randn(1, s, dim)
    base_out = attn(x)
    model = PrefixTuning(nn.ModuleDict({"attn": attn}), n_virtual_tokens=n, init="zeros")
    _randomize(model)
    prefix = prefix_modules(model)[0]
    q = attn.q_proj(x).view(1, s, heads, hd).transpose(1, 2)
    k = torch.cat([prefix.key[None], attn.k_proj(x).view(1, s, kv_heads, hd).transpose(1, 2)], dim=2)
    v = torch.cat([prefix.value[None], attn.v_proj(x).view(1, s, kv_heads, hd).transpose(1, 2)], dim=2)
    mask = torch.tensor([  # 2 prefix columns always visible, then causal with a window of 2
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 1, 1, 0],
        [1, 1, 0, 0, 1, 1],
    ], dtype=torch.bool)
    scores = (q @ k.repeat_interleave(heads // kv_heads, 1).transpose(-2, -1)) * hd ** -0.5
    ref = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v.repeat_interleave(heads // kv_heads, 1)
    ref = attn.output_proj(ref.transpose(1, 2).reshape(1, s, heads * hd))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), ref)
        attn.prefix = None  # the no-prefix path is the one it was
        torch.testing.assert_close(attn(x), base_out)


def test_init_from_token_activations(base):
    hf, path = base
    decoder = _tunekit(path)
    ids = [5, 17, 99]
    model = PrefixTuning(decoder, n_virtual_tokens=3, init_token_ids=ids)
    attn = decoder.layers[0].attn
    with torch.no_grad():
        h = decoder.layers[0].sa_norm(decoder.tok_embeddings(torch.tensor([ids])))
        k = attn.k_proj(h).view(1, 3, attn.num_kv_heads, attn.head_dim)
        k = attn.k_norm(k) if attn.k_norm is not None else k
    torch.testing.assert_close(attn.prefix.key, k[0].transpose(0, 1))
    assert attn.prefix.key.shape == (attn.num_kv_heads, 3, attn.head_dim)
    assert model.n_virtual_tokens == 3


def test_kv_cache_is_refused_and_generation_without_cache_works(base):
    from tunekit.generation import generate

    _, path = base
    decoder = _tunekit(path)
    decoder.setup_caches(1, 16, torch.float32)
    with pytest.raises(ValueError, match="KV cache"):
        PrefixTuning(decoder, n_virtual_tokens=2)
    decoder.remove_caches()
    model = PrefixTuning(decoder, n_virtual_tokens=2)
    decoder.setup_caches(1, 16, torch.float32)
    with pytest.raises(NotImplementedError, match="use_cache=False"):
        model(TOKENS[:1], input_pos=torch.arange(11)[None])
    decoder.remove_caches()
    new = generate(model, TOKENS[:1, :5], max_new_tokens=3, use_cache=False)
    assert new.shape == (1, 3)


@pytest.mark.parametrize("field,value,match", [
    ("peft_type", "LORA", "PREFIX_TUNING"),
    ("task_type", "SEQ_2_SEQ_LM", "task_type"),
    ("num_transformer_submodules", 2, "num_transformer_submodules"),
    ("num_layers", 3, "num_layers=3"),
    ("num_virtual_tokens", 6, "num_virtual_tokens=6"),
])
def test_mismatched_or_unsupported_adapters_are_refused(base, tmp_path, field, value, match):
    _, path = base
    save_peft_prefix_adapter(PrefixTuning(_tunekit(path), n_virtual_tokens=2, init="zeros"), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        load_peft_prefix_adapter(PrefixTuning(_tunekit(path), n_virtual_tokens=2, init="zeros"), tmp_path)


def test_read_config_and_wrapping_errors(base, tmp_path):
    _, path = base
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        read_peft_prefix_config(tmp_path)
    model = PrefixTuning(_tunekit(path), n_virtual_tokens=2, init="zeros")
    save_peft_prefix_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="load_peft_prefix_adapter"):  # the LoRA loader points the right way
        load_peft_adapter(_tunekit(path), tmp_path)
    with pytest.raises(ValueError, match="already has prefixes"):
        PrefixTuning(model.decoder, n_virtual_tokens=2)
    with pytest.raises(ValueError, match="n_virtual_tokens"):
        PrefixTuning(_tunekit(path), n_virtual_tokens=0)
    with pytest.raises(ValueError, match="init_token_ids"):
        PrefixTuning(_tunekit(path), n_virtual_tokens=2, init_token_ids=[1, VOCAB])
