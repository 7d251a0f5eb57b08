"""tunekit <-> Hugging Face parameter names for Llama-style decoders (Llama, Mistral, Qwen2, Qwen3).

Names are mapped by module path; whatever follows the module path (``weight``, ``bias``, or
adapter suffixes such as ``lora_a.weight``, ``lora_b.weight``, ``magnitude``) passes through
unchanged, so adapter tensors keep the HF name of the layer they adapt.
"""

from __future__ import annotations

import re

# module paths outside the layer stack
TOP_LEVEL: dict[str, str] = {
    "tok_embeddings": "model.embed_tokens",
    "norm": "model.norm",
    "output": "lm_head",
}

# module paths inside ``layers.{i}`` / ``model.layers.{i}``
PER_LAYER: dict[str, str] = {
    "sa_norm": "input_layernorm",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.output_proj": "self_attn.o_proj",
    "attn.q_norm": "self_attn.q_norm",
    "attn.k_norm": "self_attn.k_norm",
    "mlp_norm": "post_attention_layernorm",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w2": "mlp.down_proj",
    "mlp.w3": "mlp.up_proj",
}

class UnmappedNameError(ValueError):
    """A parameter name with no counterpart in the table: readers of checkpoint files catch it and
    report the file (it holds tensors of another architecture); from our own names it is a bug."""


_TUNEKIT_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def _map_module_path(rest: str, table: dict[str, str]) -> str | None:
    """Rename the longest table key that is a whole-component prefix of ``rest``."""
    for src in sorted(table, key=len, reverse=True):
        if rest == src or rest.startswith(src + "."):
            return table[src] + rest[len(src):]
    return None


def _convert(name: str, layer_re: re.Pattern, layer_prefix: str, top: dict[str, str],
             per_layer: dict[str, str], direction: str) -> str:
    match = layer_re.fullmatch(name)
    if match:
        mapped = _map_module_path(match.group(2), per_layer)
        if mapped is not None:
            return f"{layer_prefix}{match.group(1)}.{mapped}"
    else:
        mapped = _map_module_path(name, top)
        if mapped is not None:
            return mapped
    raise UnmappedNameError(f"{direction}: no mapping for parameter name {name!r} "
                   "(tunekit/checkpoint/hf_keys.py lists the supported names)")


def to_hf_name(name: str) -> str:
    """``layers.0.attn.q_proj.lora_a.weight`` -> ``model.layers.0.self_attn.q_proj.lora_a.weight``."""
    return _convert(name, _TUNEKIT_LAYER, "model.layers.", TOP_LEVEL, PER_LAYER, "to_hf_name")


def from_hf_name(name: str) -> str:
    """``model.layers.0.self_attn.o_proj.weight`` -> ``layers.0.attn.output_proj.weight``."""
    return _convert(name, _HF_LAYER, "layers.", {v: k for k, v in TOP_LEVEL.items()},
                    {v: k for k, v in PER_LAYER.items()}, "from_hf_name")
