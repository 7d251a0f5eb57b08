"""Turn an HF ``config.json`` dict into the matching tunekit builder call.

Both spellings of the rotary settings are read: transformers 5 writes
``rope_parameters = {"rope_type", "rope_theta", ...}``; older hub files carry ``rope_theta`` plus
``rope_scaling = {"type" | "rope_type", ...}``. Any field whose value tunekit does not implement
raises :class:`UnsupportedConfigError` naming it, rather than building a model with wrong logits.
"""

from __future__ import annotations

from collections.abc import Callable

from tunekit.checkpoint.errors import CheckpointError
from tunekit.models.llama import llama
from tunekit.models.mistral import mistral
from tunekit.models.qwen2 import qwen2
from tunekit.models.qwen3 import qwen3
from tunekit.modules import ACTIVATIONS, TransformerDecoder
from tunekit.modules.rope import SUPPORTED_ROPE_TYPES


class UnsupportedConfigError(CheckpointError):
    """A config.json field has a value tunekit cannot reproduce exactly."""


ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3"}

# HF's defaults for fields a config.json may leave out, where they differ between families
_DEFAULTS = {
    "llama": {"head_dim": None, "max_position_embeddings": 2048},
    "mistral": {"head_dim": None, "max_position_embeddings": 131_072, "sliding_window": 4096},
    "qwen2": {"head_dim": None, "max_position_embeddings": 32_768},
    "qwen3": {"head_dim": 128, "max_position_embeddings": 32_768},
}

_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


def hf_family(hf_config: dict) -> str:
    """``llama`` / ``mistral`` / ``qwen2`` / ``qwen3`` from ``model_type`` (or ``architectures``)."""
    model_type = hf_config.get("model_type")
    if model_type in _DEFAULTS:
        return model_type
    for arch in hf_config.get("architectures") or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
    raise UnsupportedConfigError(
        f"config.json: model_type {model_type!r} (architectures {hf_config.get('architectures')}) is not "
        f"supported; supported model_type values: {', '.join(_DEFAULTS)}")


def _rope(cfg: dict) -> tuple[float, dict | None, float]:
    """(theta, scaling dict in ``rope_parameters`` spelling or None, partial_rotary_factor)."""
    if isinstance(cfg.get("rope_parameters"), dict):
        field, params = "rope_parameters", dict(cfg["rope_parameters"])
    else:
        field, params = "rope_scaling", dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 10_000.0))
    if "partial_rotary_factor" in cfg:
        params.setdefault("partial_rotary_factor", cfg["partial_rotary_factor"])
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(f"config.json: {field}.rope_type {rope_type!r} is not supported "
                                     f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    missing = _ROPE_KEYS[rope_type] - params.keys()
    if missing:
        raise UnsupportedConfigError(f"config.json: {field} with rope_type {rope_type!r} lacks {sorted(missing)}")
    theta = float(params.pop("rope_theta"))
    partial = float(params.pop("partial_rotary_factor", 1.0))
    scaling = None if rope_type == "default" else {"rope_type": rope_type, **{k: params[k] for k in _ROPE_KEYS[rope_type]}}
    return theta, scaling, partial


def _reject(cfg: dict, field: str, ok: Callable[[object], bool], why: str) -> None:
    if field in cfg and not ok(cfg[field]):
        raise UnsupportedConfigError(f"config.json: {field}={cfg[field]!r} is not supported ({why})")


def _layer_windows(cfg: dict, family: str, num_layers: int) -> list[int | None] | int | None:
    if family == "mistral":
        _reject(cfg, "layer_types", lambda v: v is None, "per-layer attention types are not implemented for mistral")
        return cfg.get("sliding_window", _DEFAULTS["mistral"]["sliding_window"])
    if family == "llama":
        return None
    layer_types = cfg.get("layer_types")
    window = cfg.get("sliding_window")
    if layer_types is None:  # hub files before layer_types existed
        if not cfg.get("use_sliding_window", False) or window is None:
            return None
        first = cfg.get("max_window_layers", 28)
        return [window if i >= first else None for i in range(num_layers)]
    if len(layer_types) != num_layers:
        raise UnsupportedConfigError(f"config.json: layer_types has {len(layer_types)} entries for "
                                     f"num_hidden_layers={num_layers}")
    unknown = set(layer_types) - {"full_attention", "sliding_attention"}
    if unknown:
        raise UnsupportedConfigError(f"config.json: layer_types {sorted(unknown)} are not supported")
    if "sliding_attention" in layer_types and not (cfg.get("use_sliding_window", True) and window):
        raise UnsupportedConfigError("config.json: layer_types has sliding_attention but sliding_window/"
                                     "use_sliding_window disable it; fix the config")
    return [window if t == "sliding_attention" else None for t in layer_types]


def builder_args_from_hf_config(hf_config: dict) -> tuple[Callable[..., TransformerDecoder], dict]:
    """The family component builder and its keyword arguments for this config."""
    cfg = hf_config
    family = hf_family(cfg)
    defaults = _DEFAULTS[family]
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if field not in cfg:
            raise UnsupportedConfigError(f"config.json: required field {field!r} is missing")
    _reject(cfg, "hidden_act", lambda v: v in ACTIVATIONS, f"supported: {', '.join(ACTIVATIONS)}")
    _reject(cfg, "attention_dropout", lambda v: not v, "attention dropout is not implemented")
    _reject(cfg, "pretraining_tp", lambda v: v in (None, 1), "tensor-parallel slicing of weights is not implemented")
    _reject(cfg, "quantization_config", lambda v: not v, "quantized checkpoints cannot be loaded; use the "
            "unquantized weights (QLoRA quantizes them itself)")
    if family != "llama":
        _reject(cfg, "mlp_bias", lambda v: not v, f"{family} has no MLP biases")
    if family == "mistral":
        _reject(cfg, "attention_bias", lambda v: not v, "mistral has no attention biases")
    theta, scaling, partial = _rope(cfg)
    if partial != 1.0:
        raise UnsupportedConfigError(f"config.json: partial_rotary_factor={partial} is not supported for {family}")

    num_layers = cfg["num_hidden_layers"]
    args = dict(
        vocab_size=cfg["vocab_size"], num_layers=num_layers, num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"], embed_dim=cfg["hidden_size"],
        intermediate_dim=cfg["intermediate_size"],
        max_seq_len=cfg.get("max_position_embeddings") or defaults["max_position_embeddings"],
        head_dim=cfg.get("head_dim", defaults["head_dim"]), norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_base=theta, tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        activation=cfg.get("hidden_act", "silu"),
    )
    if family == "llama":
        return llama, dict(args, rope_scaling=scaling, attention_bias=bool(cfg.get("attention_bias", False)),
                           mlp_bias=bool(cfg.get("mlp_bias", False)))
    if scaling is not None and family == "mistral":
        raise UnsupportedConfigError(f"config.json: rope scaling {scaling['rope_type']!r} is not supported for mistral")
    windows = _layer_windows(cfg, family, num_layers)
    if family == "mistral":
        return mistral, dict(args, sliding_window=windows)
    if family == "qwen2":
        return qwen2, dict(args, rope_scaling=scaling, sliding_window=windows)
    return qwen3, dict(args, rope_scaling=scaling, sliding_window=windows,
                       attention_bias=bool(cfg.get("attention_bias", False)))
