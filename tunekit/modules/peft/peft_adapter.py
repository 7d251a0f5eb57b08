"""Read and write LoRA / DoRA adapters in Hugging Face PEFT's on-disk format (the folder itself:
``tunekit.checkpoint.peft_files``).

A PEFT adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys
are ``base_model.model.<HF module path>.lora_A.weight`` / ``.lora_B.weight`` (and
``.lora_magnitude_vector`` for DoRA). tunekit <-> HF names go through the functions passed in
(default: ``tunekit.checkpoint.hf_keys.to_hf_name`` / ``from_hf_name``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from tunekit.checkpoint.errors import CheckpointError
from tunekit.checkpoint.hf_keys import UnmappedNameError, from_hf_name, to_hf_name
from tunekit.checkpoint.peft_files import (
    CONFIG_FILE,
    KEY_PREFIX,
    WEIGHTS_FILE,
    read_adapter_folder_config,
    read_adapter_folder_weights,
    write_adapter_folder,
)
from tunekit.modules.peft.lora import LoRALinear, apply_lora, lora_modules

_PREFIX = KEY_PREFIX
# PEFT key suffix -> tunekit parameter name inside a LoRALinear
_SUFFIX_TO_OURS = {
    ".lora_A.weight": "lora_a.weight",
    ".lora_B.weight": "lora_b.weight",
    ".lora_magnitude_vector": "magnitude",
}
# adapter_config.json fields tunekit cannot honour: any truthy value is refused.
_UNSUPPORTED_FIELDS = (
    "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "layer_replication",
    "target_parameters", "trainable_token_indices", "lora_bias", "fan_in_fan_out", "use_qalora",
    "alora_invocation_tokens", "use_bdlora",
)


def _module_to_hf(path: str, hf_name_fn: Callable[[str], str]) -> str:
    # Map through the module's weight name: the one name every key table is sure to know.
    return hf_name_fn(f"{path}.weight").removesuffix(".weight")


def _module_from_hf(hf_path: str, hf_name_fn_inverse: Callable[[str], str]) -> str:
    return hf_name_fn_inverse(f"{hf_path}.weight").removesuffix(".weight")


def _adapter_settings(modules: dict[str, LoRALinear]) -> dict:
    """rank / alpha / dropout / use_dora / use_rslora shared by all LoRA layers (raise if mixed)."""
    settings = None
    for path, m in modules.items():
        dropout = m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0
        s = {"rank": m.rank, "alpha": m.alpha, "dropout": dropout,
             "use_dora": m.use_dora, "use_rslora": m.use_rslora}
        if settings is None:
            settings = s
        elif s != settings:
            raise ValueError(f"LoRA layers disagree ({path}: {s} vs {settings}); PEFT needs one setting")
    return settings


def save_peft_adapter(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    targets: Iterable[str] | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    dropout: float | None = None,
    use_dora: bool | None = None,
    hf_name_fn: Callable[[str], str] | None = None,
) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT key names) to ``out_dir``.

    The LoRA settings are read from the model; any of ``targets``/``rank``/``alpha``/``dropout``/
    ``use_dora`` that is given is checked against it (a mismatch raises ValueError).
    ``hf_name_fn`` maps a tunekit parameter name to its HF name.
    """
    hf_name_fn = hf_name_fn or to_hf_name
    modules = lora_modules(model)
    if not modules:
        raise ValueError("save_peft_adapter: the model has no LoRA layers (call apply_lora first)")
    settings = _adapter_settings(modules)
    our_targets = sorted({path.rpartition(".")[2] for path in modules})
    given = {"rank": rank, "alpha": alpha, "dropout": dropout, "use_dora": use_dora}
    for key, value in given.items():
        if value is not None and value != settings[key]:
            raise ValueError(f"save_peft_adapter: {key}={value!r} but the model's LoRA layers have {settings[key]!r}")
    if targets is not None and sorted(set(targets)) != our_targets:
        raise ValueError(f"save_peft_adapter: targets={sorted(set(targets))} but the model has LoRA on {our_targets}")

    tensors: dict[str, torch.Tensor] = {}
    hf_targets = set()
    for path, module in modules.items():
        hf_path = _module_to_hf(path, hf_name_fn)
        hf_targets.add(hf_path.rpartition(".")[2])
        ours = module.adapter_params()
        for suffix, name in _SUFFIX_TO_OURS.items():
            if name in ours:
                tensors[f"{_PREFIX}{hf_path}{suffix}"] = ours[name].detach().to("cpu").contiguous()

    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": settings["rank"],
        "lora_alpha": settings["alpha"],
        "lora_dropout": settings["dropout"],
        "target_modules": sorted(hf_targets),
        "use_dora": settings["use_dora"],
        "use_rslora": settings["use_rslora"],
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    write_adapter_folder(out_dir, config, tensors)


def read_peft_config(adapter_dir: str | os.PathLike) -> dict:
    """The adapter's ``adapter_config.json``, validated for what tunekit supports."""
    path = Path(adapter_dir) / CONFIG_FILE
    config = read_adapter_folder_config(adapter_dir)
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{path}: peft_type is {config.get('peft_type')!r}; load_peft_adapter reads only LORA "
                              "adapters (PREFIX_TUNING ones: load_peft_prefix_adapter)")
    for field in _UNSUPPORTED_FIELDS:
        if config.get(field):
            raise CheckpointError(f"{path}: '{field}' = {config[field]!r} is not supported by tunekit; "
                                  "retrain the adapter without it")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{path}: bias = {config['bias']!r} is not supported (only 'none')")
    for field in ("r", "lora_alpha"):
        if field not in config:
            raise CheckpointError(f"{path}: missing field '{field}'")
    return config


def load_peft_adapter(
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    hf_name_fn_inverse: Callable[[str], str] | None = None,
    *,
    quantize_base: bool = False,
) -> nn.Module:
    """Load a PEFT LoRA/DoRA adapter into ``model`` (in place; returns it) to continue training.

    If the model has no LoRA layers yet they are added with the adapter's settings (r,
    lora_alpha, lora_dropout, use_dora, use_rslora; ``quantize_base`` for QLoRA); otherwise the
    existing layers must match them. The set of adapted modules must equal the one in
    ``adapter_model.safetensors``. ``hf_name_fn_inverse`` maps an HF parameter name to tunekit's.
    """
    hf_name_fn_inverse = hf_name_fn_inverse or from_hf_name
    config = read_peft_config(adapter_dir)
    weights_path = Path(adapter_dir) / WEIGHTS_FILE
    tensors = read_adapter_folder_weights(adapter_dir)

    ours: dict[str, torch.Tensor] = {}
    hf_leaf_of: dict[str, str] = {}  # our leaf name -> PEFT target module name
    base_copies: dict[str, torch.Tensor] = {}  # full base weights PEFT saves next to the adapter
    for key, tensor in tensors.items():
        suffix = next((s for s in _SUFFIX_TO_OURS if key.endswith(s)), None)
        if key.startswith(_PREFIX) and suffix is None and "lora_" not in key:
            # PEFT stores lm_head / embed_tokens whole when they are targeted (save_embedding_layers)
            hf_name = key[len(_PREFIX):].replace(".base_layer.", ".")
            try:
                base_copies[hf_name_fn_inverse(hf_name)] = tensor
            except UnmappedNameError as e:
                raise CheckpointError(f"{weights_path}: key '{key}': {e}") from None
            continue
        if not key.startswith(_PREFIX) or suffix is None:
            raise CheckpointError(f"{weights_path}: unexpected key '{key}' (expected "
                                  f"'{_PREFIX}<module>.lora_A.weight' / '.lora_B.weight' / '.lora_magnitude_vector')")
        hf_path = key[len(_PREFIX):-len(suffix)]
        try:
            path = _module_from_hf(hf_path, hf_name_fn_inverse)
        except UnmappedNameError as e:
            raise CheckpointError(f"{weights_path}: key '{key}': {e}") from None
        ours[f"{path}.{_SUFFIX_TO_OURS[suffix]}"] = tensor
        hf_leaf_of[path.rpartition(".")[2]] = hf_path.rpartition(".")[2]
    targets = sorted(hf_leaf_of)
    if isinstance(config.get("target_modules"), list):
        listed = set(config["target_modules"])
        found = set(hf_leaf_of.values())
        if listed != found:
            raise CheckpointError(f"{weights_path}: adapter_config target_modules {sorted(listed)} but the "
                                  f"weights cover {sorted(found)}")

    _check_base_copies(model, base_copies, weights_path)

    r, alpha = config["r"], config["lora_alpha"]
    use_dora, use_rslora = bool(config.get("use_dora")), bool(config.get("use_rslora"))
    dropout = float(config.get("lora_dropout") or 0.0)
    modules = lora_modules(model)
    if not modules:
        apply_lora(model, targets, rank=r, alpha=alpha, dropout=dropout, use_dora=use_dora,
                   quantize_base=quantize_base, use_rslora=use_rslora)
        modules = lora_modules(model)
    else:
        have = _adapter_settings(modules)
        want = {"rank": r, "alpha": alpha, "use_dora": use_dora, "use_rslora": use_rslora}
        for key, value in want.items():
            if have[key] != value:
                raise CheckpointError(f"{adapter_dir}: adapter has {key}={value!r} but the model's LoRA layers "
                                      f"have {have[key]!r}; build the model without LoRA and let load_peft_adapter add it")

    expected = {f"{path}.{name}" for path, m in modules.items() for name in m.adapter_params()}
    missing, unexpected = sorted(expected - ours.keys()), sorted(ours.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(f"{adapter_dir}: adapter does not match the model's LoRA layers "
                              f"(missing {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                              f"unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}); "
                              "adapters on a subset of layers are not supported")
    for path, module in modules.items():
        for name, param in module.adapter_params().items():
            tensor = ours[f"{path}.{name}"]
            if tensor.shape != param.shape:
                raise CheckpointError(f"{weights_path}: '{path}.{name}' has shape {tuple(tensor.shape)}, "
                                      f"the model expects {tuple(param.shape)}")
            with torch.no_grad():
                if param.device.type == "meta":
                    new = nn.Parameter(tensor.to(device=module.weight.device, dtype=param.dtype))
                    _set_adapter_param(module, name, new)
                else:
                    param.copy_(tensor)
    return model


def _check_base_copies(model: nn.Module, base_copies: dict[str, torch.Tensor], weights_path: Path) -> None:
    """Base weights saved in the adapter must equal the model's: tunekit does not train them."""
    params = dict(model.named_parameters())
    quantized = {f"{path}.weight" for path, m in lora_modules(model).items() if m.quantized}
    for name, saved in base_copies.items():
        current = params.get(name)
        if current is None:
            raise CheckpointError(f"{weights_path}: carries base weight '{name}' that the model does not have")
        if current.is_meta:
            raise CheckpointError(f"{weights_path}: carries base weight '{name}'; load the base model's weights "
                                  "before the adapter so it can be checked")
        if name in quantized:  # compare in the same lossy format
            from tunekit.modules.peft import nf4

            current = nf4.nf4_dequantize(current)
            saved = nf4.nf4_dequantize(nf4.to_nf4(saved.to(current.dtype)))
        current = current.detach().to(device="cpu", dtype=saved.dtype)
        if current.shape != saved.shape or not torch.equal(current, saved.cpu()):
            raise CheckpointError(f"{weights_path}: carries a modified copy of base weight '{name}' (resized "
                                  "vocabulary or trained embeddings), which tunekit does not support")


def _set_adapter_param(module: LoRALinear, name: str, param: nn.Parameter) -> None:
    owner_path, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    setattr(owner, attr, param)
