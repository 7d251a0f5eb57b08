"""Prefix tuning (Li & Liang 2021): n learned key/value vectors prepended in every attention layer,
everything else frozen.

Each ``Attention`` of the decoder gets a ``PrefixKV`` as its ``prefix`` attribute; attention puts
those keys/values in front of the real ones (no rotary embedding, visible to every query). The
``PrefixTuning`` wrapper shifts the real tokens' rotary positions by n, which is what transformers
does when PEFT hands it the prefix as ``past_key_values`` (the cache already holds n entries), so
logits equal a PEFT prefix-tuned transformers model with the same prefix.

PEFT stores the prefix as one tensor ``prompt_embeddings [n, num_layers * 2 * kv_heads * head_dim]``
which it views as ``[n, num_layers * 2, kv_heads, head_dim]``: row ``2 l`` holds layer l's keys and
``2 l + 1`` its values. ``save_peft_prefix_adapter`` / ``load_peft_prefix_adapter`` convert.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tunekit.modules.attention import Attention
from tunekit.checkpoint.errors import CheckpointError
from tunekit.checkpoint.peft_files import (
    CONFIG_FILE,
    read_adapter_folder_config,
    read_adapter_folder_weights,
    write_adapter_folder,
)

_WEIGHTS_KEY = "prompt_embeddings"  # PEFT's safetensors key for every prompt-learning method


class PrefixKV(nn.Module):
    """Learned prefix of one attention layer: ``key``, ``value`` ``[num_kv_heads, n, head_dim]``.

    Forward: ``batch_size`` -> ``(keys, values)``, each ``[batch_size, num_kv_heads, n, head_dim]``
    (expanded views: the batch shares one prefix).
    """

    def __init__(self, key: torch.Tensor, value: torch.Tensor):
        super().__init__()
        if key.shape != value.shape or key.dim() != 3:
            raise ValueError(f"PrefixKV: key and value must both be [num_kv_heads, n, head_dim], "
                             f"got {tuple(key.shape)} and {tuple(value.shape)}")
        self.key = nn.Parameter(key)
        self.value = nn.Parameter(value)

    @property
    def n_virtual_tokens(self) -> int:
        return self.key.shape[1]

    def forward(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key.expand(batch_size, -1, -1, -1), self.value.expand(batch_size, -1, -1, -1)


def prefix_modules(model: nn.Module) -> list[PrefixKV]:
    """The ``PrefixKV`` of every attention layer that has one, in layer order."""
    return [m.prefix for m in model.modules() if isinstance(m, Attention) and m.prefix is not None]


def prefix_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of the prefix parameters only (``...attn.prefix.key`` / ``.value``)."""
    return {f"{path}.{name}": p for path, m in model.named_modules() if isinstance(m, PrefixKV)
            for name, p in m.named_parameters()}


class PrefixTuning(nn.Module):
    """Wrap a decoder (tunekit model contract) so every attention layer sees n learned prefix
    keys/values. Only the prefixes (``decoder.layers.{i}.attn.prefix.key`` / ``.value``) train.

    Labels need no change (no positions are added to the sequence), and ``labels=`` is passed on
    to the decoder, so the fused loss of ``TransformerDecoder`` works as it does without prefix.

    Args:
        decoder: a tunekit decoder built of ``tunekit.modules.Attention`` layers, weights loaded.
        n_virtual_tokens: prefix length n.
        init_token_ids: n token ids whose keys/values (each layer's ``k_proj`` / ``v_proj`` output,
            after ``k_norm`` if any, with the tokens run through the frozen model) initialise the
            prefix: Li & Liang report that real activations train better than random vectors,
            notably with little data.
            Default: n ids drawn uniformly from the vocabulary.
        generator: RNG for the default ids.
        init: ``"tokens"`` (above) or ``"zeros"`` (PEFT's ``init_weights="zero"``; also what
            ``load_peft_prefix_adapter`` uses before copying the saved values in).

    Forward: ``tokens [b, s]``, ``mask [b, s, s]`` (True = may attend) or None (causal),
    ``input_pos [b, s]`` or None (``arange(s)``), other keywords (``labels``) go to the decoder
    -> what the decoder returns (logits ``[b, s, vocab]``).
    """

    def __init__(
        self,
        decoder: nn.Module,
        n_virtual_tokens: int,
        init_token_ids: list[int] | None = None,
        generator: torch.Generator | None = None,
        *,
        init: str = "tokens",
    ):
        super().__init__()
        attns = [m for m in decoder.modules() if isinstance(m, Attention)]
        if not attns:
            raise ValueError("PrefixTuning: the decoder has no tunekit Attention layers")
        if any(a.prefix is not None for a in attns):
            raise ValueError("PrefixTuning: the decoder already has prefixes (wrap it only once)")
        if any(a.kv_cache is not None for a in attns):
            raise ValueError("PrefixTuning: prefix tuning does not support the KV cache; remove the caches first")
        if not isinstance(n_virtual_tokens, int) or n_virtual_tokens <= 0:
            raise ValueError(f"PrefixTuning: n_virtual_tokens must be a positive integer, got {n_virtual_tokens!r}")
        if init not in ("tokens", "zeros"):
            raise ValueError(f"PrefixTuning: init must be 'tokens' or 'zeros', got {init!r}")
        if init == "zeros" and init_token_ids is not None:
            raise ValueError("PrefixTuning: init_token_ids is used only with init='tokens'")
        ref = next(p for p in decoder.parameters() if p.is_floating_point())
        if init == "zeros":
            kvs = [tuple(torch.zeros(a.num_kv_heads, n_virtual_tokens, a.head_dim, dtype=ref.dtype, device=ref.device)
                         for _ in range(2)) for a in attns]
        else:
            vocab = _vocab_size(decoder)
            if init_token_ids is None:
                init_token_ids = torch.randint(0, vocab, (n_virtual_tokens,), generator=generator).tolist()
            if len(init_token_ids) != n_virtual_tokens or not all(0 <= i < vocab for i in init_token_ids):
                raise ValueError(f"PrefixTuning: init_token_ids must be {n_virtual_tokens} ids in [0, {vocab})")
            kvs = _token_keys_values(decoder, attns, torch.tensor(init_token_ids, device=ref.device))
        for p in decoder.parameters():
            p.requires_grad_(False)
        for attn, (key, value) in zip(attns, kvs):
            attn.prefix = PrefixKV(key.to(ref.dtype), value.to(ref.dtype))
        self.decoder = decoder
        self.n_virtual_tokens = n_virtual_tokens

    def forward(self, tokens: torch.Tensor, *, mask: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        b, s = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(s, device=tokens.device).expand(b, s)
        # The prefix occupies positions 0..n-1 as far as the real tokens are concerned: PEFT passes
        # it as an n-entry cache and transformers then numbers the input from n (and PEFT adds n
        # to explicit position_ids). The prefix keys themselves carry no rotation.
        return self.decoder(tokens, mask=mask, input_pos=input_pos + self.n_virtual_tokens, **kwargs)


def _vocab_size(decoder: nn.Module) -> int:
    embedding = getattr(decoder, "tok_embeddings", None)
    if embedding is None or not hasattr(embedding, "weight"):
        raise ValueError("PrefixTuning: init='tokens' needs the decoder's `tok_embeddings`; pass init='zeros'")
    return embedding.weight.shape[0]


def _token_keys_values(decoder: nn.Module, attns: list[Attention], ids: torch.Tensor
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's ``(key, value)`` ``[num_kv_heads, n, head_dim]`` for ``ids [n]`` run through the
    frozen decoder, taken before rotary embedding (the prefix has no position)."""
    captured: dict[tuple[int, str], torch.Tensor] = {}

    def keep(index: int, kind: str):
        def hook(module, args, out):
            captured[index, kind] = out.detach()
        return hook

    handles = [proj.register_forward_hook(keep(i, kind))
               for i, a in enumerate(attns) for kind, proj in (("k", a.k_proj), ("v", a.v_proj))]
    was_training = decoder.training
    decoder.eval()  # LoRA dropout etc. would make the initial prefix random
    try:
        with torch.no_grad():
            decoder(ids[None])
    finally:
        decoder.train(was_training)
        for h in handles:
            h.remove()
    out = []
    with torch.no_grad():
        for i, a in enumerate(attns):
            k = captured[i, "k"].view(1, -1, a.num_kv_heads, a.head_dim)
            v = captured[i, "v"].view(1, -1, a.num_kv_heads, a.head_dim)
            if a.k_norm is not None:
                k = a.k_norm(k)
            out.append((k[0].transpose(0, 1).clone(), v[0].transpose(0, 1).clone()))
    return out


# --- PEFT adapter folders ---------------------------------------------------------------------

def save_peft_prefix_adapter(model: nn.Module, out_dir: str | os.PathLike, *,
                             base_model_name_or_path: str | None = None) -> None:
    """Write the prefixes of ``model`` (a ``PrefixTuning`` or its decoder) as a PEFT PREFIX_TUNING
    adapter folder that ``peft.PeftModel.from_pretrained(hf_model, out_dir)`` loads.

    PEFT's ``num_attention_heads`` / ``token_dim`` describe the prefix tensor, i.e. the key/value
    heads (``token_dim = num_kv_heads * head_dim``), which is what PEFT itself writes for GQA models.
    """
    prefixes = prefix_modules(model)
    if not prefixes:
        raise ValueError("save_peft_prefix_adapter: the model has no prefixes (wrap it with PrefixTuning)")
    shapes = {tuple(p.key.shape) for p in prefixes}
    if len(shapes) != 1:
        raise ValueError(f"save_peft_prefix_adapter: layers have different prefix shapes {sorted(shapes)}; "
                         "PEFT stores one shape for all layers")
    kv_heads, n, head_dim = shapes.pop()
    stacked = torch.stack([t.detach() for p in prefixes for t in (p.key, p.value)])  # [2L, kv, n, d]
    flat = stacked.permute(2, 0, 1, 3).reshape(n, -1).to("cpu").contiguous()
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": n,
        "token_dim": kv_heads * head_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": kv_heads,
        "num_layers": len(prefixes),
        "encoder_hidden_size": kv_heads * head_dim,
        "prefix_projection": False,
        "init_weights": None,
        "modules_to_save": None,
    }
    write_adapter_folder(out_dir, config, {_WEIGHTS_KEY: flat})


def read_peft_prefix_config(adapter_dir: str | os.PathLike) -> dict:
    """The adapter's ``adapter_config.json``, checked to be a decoder-only PREFIX_TUNING adapter."""
    path = Path(adapter_dir) / CONFIG_FILE
    config = read_adapter_folder_config(adapter_dir)
    if config.get("peft_type") != "PREFIX_TUNING":
        raise CheckpointError(f"{path}: peft_type is {config.get('peft_type')!r}; load_peft_prefix_adapter reads "
                              "PREFIX_TUNING adapters (LORA ones: load_peft_adapter)")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise CheckpointError(f"{path}: 'task_type' = {config['task_type']!r} is not supported; "
                              "tunekit models are CAUSAL_LM")
    if config.get("num_transformer_submodules", 1) != 1:
        raise CheckpointError(f"{path}: 'num_transformer_submodules' = {config['num_transformer_submodules']!r} is not "
                              "supported (encoder-decoder prefixes); tunekit needs 1")
    if config.get("modules_to_save"):
        raise CheckpointError(f"{path}: 'modules_to_save' = {config['modules_to_save']!r} is not supported by tunekit")
    for field in ("num_virtual_tokens", "num_layers", "num_attention_heads", "token_dim"):
        if not isinstance(config.get(field), int):
            raise CheckpointError(f"{path}: missing or non-integer field '{field}'")
    return config


def load_peft_prefix_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> PrefixTuning:
    """Load a PEFT PREFIX_TUNING adapter into ``model`` and return the ``PrefixTuning`` wrapper.

    ``model`` is a tunekit decoder with its base weights loaded (it is wrapped with the adapter's
    ``num_virtual_tokens``) or an existing ``PrefixTuning`` of the same shape (values overwritten).
    ``prefix_projection: true`` adapters load too: PEFT saves the projected prefix itself, so
    tunekit then trains those keys/values directly (and saves ``prefix_projection: false``).
    """
    config = read_peft_prefix_config(adapter_dir)
    tensors = read_adapter_folder_weights(adapter_dir)
    where = Path(adapter_dir)
    if set(tensors) != {_WEIGHTS_KEY}:
        raise CheckpointError(f"{where}: expected the single tensor '{_WEIGHTS_KEY}', found {sorted(tensors)}")
    n = config["num_virtual_tokens"]
    wrapper = model if isinstance(model, PrefixTuning) else PrefixTuning(model, n, init="zeros")
    if wrapper.n_virtual_tokens != n:
        raise CheckpointError(f"{where}: adapter has num_virtual_tokens={n} but the model's prefix has "
                              f"{wrapper.n_virtual_tokens}")
    prefixes = prefix_modules(wrapper)
    kv_heads, _, head_dim = prefixes[0].key.shape
    want = {"num_layers": len(prefixes), "num_attention_heads": kv_heads, "token_dim": kv_heads * head_dim}
    for field, value in want.items():
        if config[field] != value:
            raise CheckpointError(f"{where}: adapter has {field}={config[field]} but the model needs {value} "
                                  "(num_attention_heads / token_dim count key/value heads)")
    flat = tensors[_WEIGHTS_KEY]
    if tuple(flat.shape) != (n, len(prefixes) * 2 * kv_heads * head_dim):
        raise CheckpointError(f"{where}: '{_WEIGHTS_KEY}' has shape {tuple(flat.shape)}, expected "
                              f"{(n, len(prefixes) * 2 * kv_heads * head_dim)}")
    stacked = flat.view(n, 2 * len(prefixes), kv_heads, head_dim).permute(1, 2, 0, 3)  # [2L, kv, n, d]
    with torch.no_grad():
        for i, p in enumerate(prefixes):
            p.key.copy_(stacked[2 * i])
            p.value.copy_(stacked[2 * i + 1])
    return wrapper
