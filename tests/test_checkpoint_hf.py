"""HF key names and checkpoint folders: exact round trips, sharding, loading back in transformers."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file
from test_models import TOKENS, hf_logits, logits, make_hf_model

from tunekit.models import from_hf
from tunekit.checkpoint.hf_checkpoint import load_hf_state_dict, read_hf_config, save_hf_checkpoint
from tunekit.checkpoint.hf_keys import from_hf_name, to_hf_name


def read_folder(path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved folder, HF names, whatever the sharding."""
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        out.update(load_file(str(path / f)))
    return out


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert torch.equal(got[name], want[name]), name


# --- key names ----------------------------------------------------------------------------------

def test_key_table_covers_every_parameter_both_ways():
    for family in ("qwen3", "qwen2", "llama_linear_rope_biases"):  # q/k norms, qkv biases, all biases
        for hf_name in make_hf_model(family).state_dict():
            ours = from_hf_name(hf_name)
            assert to_hf_name(ours) == hf_name
    assert from_hf_name("model.layers.3.self_attn.o_proj.weight") == "layers.3.attn.output_proj.weight"
    assert from_hf_name("model.layers.0.mlp.gate_proj.weight") == "layers.0.mlp.w1.weight"
    assert from_hf_name("model.layers.0.mlp.down_proj.weight") == "layers.0.mlp.w2.weight"
    assert from_hf_name("model.layers.0.mlp.up_proj.weight") == "layers.0.mlp.w3.weight"
    assert from_hf_name("lm_head.weight") == "output.weight"


@pytest.mark.parametrize("ours, theirs", [
    ("layers.0.attn.q_proj.lora_a.weight", "model.layers.0.self_attn.q_proj.lora_a.weight"),
    ("layers.12.attn.output_proj.lora_b.weight", "model.layers.12.self_attn.o_proj.lora_b.weight"),
    ("layers.1.mlp.w2.magnitude", "model.layers.1.mlp.down_proj.magnitude"),
    ("output.lora_a.weight", "lm_head.lora_a.weight"),
])
def test_adapter_suffixes_pass_through(ours, theirs):
    assert to_hf_name(ours) == theirs and from_hf_name(theirs) == ours


@pytest.mark.parametrize("name", ["layers.0.attn.rope.cos", "model.layers.0.self_attn.q_proj.weight", "head.weight",
                                  "layers.x.sa_norm.weight"])
def test_unknown_name_is_an_error_naming_it(name):
    with pytest.raises(ValueError, match="to_hf_name: no mapping for parameter name"):
        to_hf_name(name)


# --- round trips --------------------------------------------------------------------------------

@pytest.mark.parametrize("family, max_shard_size", [("llama3_1", None), ("llama3_1", 20_000), ("qwen2", None),
                                                    ("qwen3", 30_000)])
def test_hf_to_tunekit_to_hf_is_exact_and_loads_in_transformers(tmp_path, family, max_shard_size):
    hf = make_hf_model(family)
    src = tmp_path / "src"
    hf.save_pretrained(str(src))
    (src / "tokenizer.json").write_text('{"fake": true}')
    (src / "original").mkdir()
    (src / "original" / "tokenizer.model").write_bytes(b"\x00sp")

    ours = from_hf(src)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    out = save_hf_checkpoint(ours.state_dict(), tmp_path / "out", hf_config=read_hf_config(src), source_dir=src,
                             **kwargs)

    assert_same_tensors(read_folder(out), read_folder(src))
    sharded = (out / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_size is not None)
    if sharded:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        assert not (out / "model.safetensors").exists()
    if hf.config.tie_word_embeddings:
        assert "lm_head.weight" not in read_folder(out)
    assert (out / "tokenizer.json").read_text() == '{"fake": true}'
    assert (out / "original" / "tokenizer.model").read_bytes() == b"\x00sp"

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert torch.equal(hf_logits(reloaded, TOKENS), hf_logits(hf, TOKENS))


def test_save_bf16_updates_both_dtype_spellings_and_reloads(tmp_path):
    hf = make_hf_model("llama3")
    hf.save_pretrained(str(tmp_path / "src"))
    config = read_hf_config(tmp_path / "src")
    config["torch_dtype"] = config["dtype"]  # as in older hub files
    ours = from_hf(tmp_path / "src", dtype=torch.bfloat16)
    out = save_hf_checkpoint(ours.state_dict(), tmp_path / "out", hf_config=config)
    saved = read_hf_config(out)
    assert saved["dtype"] == saved["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in read_folder(out).values())
    again = from_hf(out)
    assert torch.equal(logits(again.eval(), TOKENS), logits(ours.eval(), TOKENS))


def test_save_handles_shared_and_non_contiguous_tensors(tmp_path):
    hf = make_hf_model("llama3")
    hf.save_pretrained(str(tmp_path / "src"))
    state = load_hf_state_dict(tmp_path / "src")
    # a transposed-back view and an untied output sharing the embedding's storage
    state["layers.0.mlp.w1.weight"] = state["layers.0.mlp.w1.weight"].T.contiguous().T
    state["output.weight"] = state["tok_embeddings.weight"]
    out = save_hf_checkpoint(state, tmp_path / "out", hf_config=read_hf_config(tmp_path / "src"))
    saved = read_folder(out)
    assert torch.equal(saved["lm_head.weight"], saved["model.embed_tokens.weight"])
    assert torch.equal(saved["model.layers.0.mlp.gate_proj.weight"], state["layers.0.mlp.w1.weight"])


def test_resave_removes_stale_shards(tmp_path):
    hf = make_hf_model("llama3")
    hf.save_pretrained(str(tmp_path / "src"))
    state, config = load_hf_state_dict(tmp_path / "src"), read_hf_config(tmp_path / "src")
    save_hf_checkpoint(state, tmp_path / "out", hf_config=config, max_shard_size=20_000)
    save_hf_checkpoint(state, tmp_path / "out", hf_config=config)
    assert [p.name for p in (tmp_path / "out").glob("model*")] == ["model.safetensors"]


def test_load_pytorch_bin_without_unpickling_code(tmp_path):
    hf = make_hf_model("qwen2")
    hf.save_pretrained(str(tmp_path))
    (tmp_path / "model.safetensors").unlink()
    torch.save({k: v.clone() for k, v in hf.state_dict().items()}, tmp_path / "pytorch_model.bin")
    ours = from_hf(tmp_path)
    assert (logits(ours.eval(), TOKENS) - hf_logits(hf, TOKENS)).abs().max() < 1e-4


def test_dtype_cast_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_hf_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_state_dict(tmp_path)
    make_hf_model("llama3").save_pretrained(str(tmp_path))
    state = load_hf_state_dict(tmp_path, dtype=torch.float16)
    assert {t.dtype for t in state.values()} == {torch.float16}
