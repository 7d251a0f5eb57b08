"""tunekit models against transformers: logits, packing, KV cache, config spellings, errors."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers

from tunekit.models import (
    CheckpointMismatchError,
    UnsupportedConfigError,
    build_from_hf_config,
    from_hf,
    llama2_7b,
    llama3_1_8b,
    llama3_2_1b,
    llama3_2_3b,
    mistral_7b,
    qwen2_5_0_5b,
    qwen2_5_1_5b,
    qwen2_5_3b,
    qwen2_5_7b,
    qwen3_0_6b,
    qwen3_4b,
    qwen3_8b,
)
from tunekit.modules import block_causal_mask, document_positions, padding_mask, padding_positions

logging.getLogger("torchao").setLevel(logging.ERROR)
transformers.logging.set_verbosity_error()

VOCAB = 256
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # 16: the scaling band is hit

# family label -> (HF config class, extra config fields)
FAMILIES = {
    "llama2": (transformers.LlamaConfig, dict(rms_norm_eps=1e-5)),
    "llama3": (transformers.LlamaConfig, dict(rope_parameters={"rope_type": "default", "rope_theta": 500_000.0})),
    "llama3_1": (transformers.LlamaConfig, dict(rope_parameters=LLAMA3_ROPE)),
    "llama3_2_tied": (transformers.LlamaConfig, dict(rope_parameters={**LLAMA3_ROPE, "factor": 32.0},
                                                     tie_word_embeddings=True, head_dim=32)),
    "llama_linear_rope_biases": (transformers.LlamaConfig, dict(
        rope_parameters={"rope_type": "linear", "rope_theta": 10_000.0, "factor": 4.0},
        attention_bias=True, mlp_bias=True)),
    "mistral": (transformers.MistralConfig, dict(sliding_window=5)),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen2_sliding": (transformers.Qwen2Config, dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3": (transformers.Qwen3Config, dict(head_dim=32)),
}


def make_hf_model(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny random HF model; every parameter (norms and biases too) is perturbed so all are tested."""
    config_cls, extra = FAMILIES[family]
    config = config_cls(**{**TINY, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_logits(model, tokens, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, **kw).logits


def logits(model, tokens, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, **kw)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (HF model, saved folder)."""
    out = {}
    for family in FAMILIES:
        model = make_hf_model(family)
        path = tmp_path_factory.mktemp(family)
        model.save_pretrained(str(path))
        out[family] = (model, path)
    return out


TOKENS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp32_logits_match_transformers(checkpoints, family):
    hf, path = checkpoints[family]
    ours = from_hf(path).eval()
    err = (logits(ours, TOKENS) - hf_logits(hf, TOKENS)).abs().max().item()
    assert err < 1e-4, f"{family}: max abs logit difference {err}"


def test_bf16_logits_match_transformers(checkpoints):
    hf, path = checkpoints["qwen3"]
    ours = from_hf(path, dtype=torch.bfloat16).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    assert ours.tok_embeddings.weight.dtype == torch.bfloat16
    ours_out, theirs_out = logits(ours, TOKENS), hf_logits(theirs, TOKENS)
    assert ours_out.dtype == torch.bfloat16
    # same op order and casts as transformers: bf16 rounding is reproduced bit for bit
    assert torch.equal(ours_out, theirs_out)


def test_logits_to_keep_projects_only_the_last_positions(checkpoints):
    ours = from_hf(checkpoints["llama3"][1]).eval()
    with torch.no_grad():
        full = ours(TOKENS)
        last = ours(TOKENS, logits_to_keep=3)
    assert last.shape == (TOKENS.shape[0], 3, full.shape[-1])
    torch.testing.assert_close(last, full[:, -3:], rtol=1e-6, atol=1e-6)  # same rows; a smaller matmul may round differently


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_mask_matches_transformers(checkpoints, side):
    hf, path = checkpoints["llama3_1"]
    ours = from_hf(path).eval()
    is_token = torch.ones(2, 16, dtype=torch.bool)
    if side == "right":
        is_token[1, 11:] = False
    else:
        is_token[1, :5] = False
    pos = padding_positions(is_token)
    want = hf_logits(hf, TOKENS, attention_mask=is_token.long(), position_ids=pos)
    got = logits(ours, TOKENS, mask=padding_mask(is_token), input_pos=pos)
    assert (got - want)[is_token].abs().max() < 1e-4


@pytest.mark.parametrize("family", ["llama3_1", "mistral", "qwen3"])
def test_packed_documents_equal_separate_documents(checkpoints, family):
    ours = from_hf(checkpoints[family][1]).eval()
    doc_a, doc_b = TOKENS[0, :9], TOKENS[1, :7]
    packed = torch.cat([doc_a, doc_b])[None]
    doc_ids = torch.tensor([[0] * 9 + [1] * 7])
    out = logits(ours, packed, mask=block_causal_mask(doc_ids), input_pos=document_positions(doc_ids))
    assert (out[0, :9] - logits(ours, doc_a[None])[0]).abs().max() < 1e-5
    assert (out[0, 9:] - logits(ours, doc_b[None])[0]).abs().max() < 1e-5
    # and the mask matters: without it the second document sees the first
    leaky = logits(ours, packed, input_pos=document_positions(doc_ids))
    assert (leaky[0, 9:] - out[0, 9:]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama3_2_tied", "mistral", "qwen2_sliding"])
def test_kv_cache_token_by_token_equals_full_forward(checkpoints, family):
    ours = from_hf(checkpoints[family][1]).eval()
    full = logits(ours, TOKENS)
    ours.setup_caches(batch_size=2, max_seq_len=32, dtype=torch.float32)
    for _ in range(2):  # the second pass checks reset_caches
        ours.reset_caches()
        steps = [logits(ours, TOKENS[:, :5], input_pos=torch.arange(5).expand(2, 5))]
        for i in range(5, TOKENS.shape[1]):
            steps.append(logits(ours, TOKENS[:, i:i + 1], input_pos=torch.full((2, 1), i)))
        assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5
    with pytest.raises(ValueError, match="input_pos"):
        ours(TOKENS)
    ours.remove_caches()
    assert not ours.caches_are_enabled()


def _rewrite_config(path, edit) -> None:
    config = json.loads((path / "config.json").read_text())
    edit(config)
    (path / "config.json").write_text(json.dumps(config))


def _copy_checkpoint(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.mark.parametrize("family", ["llama3_1", "llama_linear_rope_biases", "qwen2"])
def test_old_style_config_fields_load(checkpoints, tmp_path, family):
    """Hub files spell rope as rope_theta + rope_scaling{"type": ...} and the dtype as torch_dtype."""
    hf, src = checkpoints[family]
    path = _copy_checkpoint(src, tmp_path / "old")

    def to_old(config):
        rope = dict(config.pop("rope_parameters"))
        config["rope_theta"] = rope.pop("rope_theta")
        rope_type = rope.pop("rope_type")
        config["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
        config["torch_dtype"] = config.pop("dtype")

    _rewrite_config(path, to_old)
    ours = from_hf(path).eval()
    assert (logits(ours, TOKENS) - hf_logits(hf, TOKENS)).abs().max() < 1e-4
    # transformers reads the old spelling to the same model
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    assert (hf_logits(theirs, TOKENS) - hf_logits(hf, TOKENS)).abs().max() < 1e-5


@pytest.mark.parametrize("field, edit", [
    ("rope_type", lambda c: c["rope_parameters"].update(rope_type="yarn", factor=4.0)),
    ("hidden_act", lambda c: c.update(hidden_act="relu2")),
    ("mlp_bias", lambda c: c.update(mlp_bias=True)),
    ("attention_dropout", lambda c: c.update(attention_dropout=0.1)),
    ("quantization_config", lambda c: c.update(quantization_config={"quant_method": "bitsandbytes"})),
    ("model_type", lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])),
    ("layer_types", lambda c: c.update(layer_types=["chunked_attention", "full_attention"])),
])
def test_unsupported_config_field_is_named(checkpoints, tmp_path, field, edit):
    path = _copy_checkpoint(checkpoints["qwen2"][1], tmp_path / "bad")
    _rewrite_config(path, edit)
    with pytest.raises(UnsupportedConfigError, match=field):
        from_hf(path)


def test_mismatched_checkpoint_names_key_and_shapes(checkpoints, tmp_path):
    path = _copy_checkpoint(checkpoints["llama3"][1], tmp_path / "mismatch")
    _rewrite_config(path, lambda c: c.update(intermediate_size=96))
    with pytest.raises(CheckpointMismatchError, match=r"layers\.0\.mlp\.w1\.weight: checkpoint shape \(128, 64\) "
                                                      r"!= model shape \(96, 64\)"):
        from_hf(path)
    _rewrite_config(path, lambda c: c.update(intermediate_size=128, num_hidden_layers=3))
    with pytest.raises(CheckpointMismatchError, match=r"missing tensors \['layers\.2\."):
        from_hf(path)
    _rewrite_config(path, lambda c: c.update(num_hidden_layers=1))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected tensors \['layers\.1\."):
        from_hf(path)


def test_build_from_hf_config_on_meta_matches_transformers_parameter_shapes(checkpoints):
    hf, path = checkpoints["qwen3"]
    config = json.loads((path / "config.json").read_text())
    model = build_from_hf_config(config)
    assert all(p.is_meta for p in model.parameters())
    from tunekit.checkpoint.hf_keys import to_hf_name
    ours = {to_hf_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert ours == theirs


# published parameter counts (safetensors metadata of the official checkpoints)
PUBLISHED = [
    (llama2_7b, 6_738_415_616), (llama3_1_8b, 8_030_261_248), (llama3_2_1b, 1_235_814_400),
    (llama3_2_3b, 3_212_749_824), (mistral_7b, 7_241_732_096), (qwen2_5_0_5b, 494_032_768),
    (qwen2_5_1_5b, 1_543_714_304), (qwen2_5_3b, 3_085_938_688), (qwen2_5_7b, 7_615_616_512),
    (qwen3_0_6b, 596_049_920), (qwen3_4b, 4_022_468_096), (qwen3_8b, 8_190_735_360),
]


@pytest.mark.parametrize("builder, count", PUBLISHED, ids=[b.__name__ for b, _ in PUBLISHED])
def test_size_builders_have_published_parameter_counts(builder, count):
    with torch.device("meta"):
        model = builder()
    assert sum(p.numel() for p in model.parameters()) == count
