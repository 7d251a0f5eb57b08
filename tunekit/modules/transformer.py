"""Pre-norm decoder layer and the decoder-only language model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from tunekit.modules.attention import Attention
from tunekit.losses.cross_entropy import IGNORE_INDEX, chunked_cross_entropy, linear_cross_entropy, linear_token_log_probs


class TransformerDecoderLayer(nn.Module):
    """``h = x + attn(sa_norm(x)); out = h + mlp(mlp_norm(h))``.

    Forward: ``x [b, s, dim]`` plus the ``mask``/``input_pos`` of :class:`Attention` -> ``[b, s, dim]``.
    """

    def __init__(self, *, attn: Attention, mlp: nn.Module, sa_norm: nn.Module, mlp_norm: nn.Module):
        super().__init__()
        self.sa_norm, self.attn, self.mlp_norm, self.mlp = sa_norm, attn, mlp_norm, mlp

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.attn(self.sa_norm(x), mask=mask, input_pos=input_pos)
        return h + self.mlp(self.mlp_norm(h))


class TransformerDecoder(nn.Module):
    """Token embedding, ``layers``, final norm and output projection.

    Args:
        tok_embeddings: ``nn.Embedding(vocab, dim)``.
        layers: decoder layers (kept as ``self.layers``, an ``nn.ModuleList``).
        norm: final norm.
        output: ``dim -> vocab`` projection, or None to reuse ``tok_embeddings.weight`` (tied; then
            ``output.weight`` is not in the state dict).

    Forward: ``tokens: Long[b, s]``, ``mask: Bool[b, s, s]`` or None (causal), ``input_pos: Long[b, s]``
    or None (``arange(s)``; per-document positions for packed rows; KV-cache write positions)
    -> logits ``[b, s, vocab]`` in the parameter dtype (``[b, logits_to_keep, vocab]``, the last
    positions, when ``logits_to_keep`` > 0, as transformers' argument of that name). With ``labels: Long[b, s]`` (already
    shifted, -100 = no loss) it returns instead the SUM of the token cross-entropies (fp32
    scalar), computed with the output projection chunk by chunk
    (:func:`tunekit.losses.cross_entropy.linear_cross_entropy`) so the logits are never materialised:
    much less memory and a faster step than logits + a loss. With ``labels`` and ``per_token=True``
    it returns ``(log_probs, logit_means)``, float32 [b, s] each, 0 where the label is -100: each
    position's ``log p(label)`` (with gradient) and the mean of its logits over the vocabulary (no
    gradient), by the same fused projection (what preference and RL losses need). Calling these
    inside ``forward`` keeps wrappers such as FSDP2, which gather the output weight for ``forward``,
    working.
    """

    def __init__(self, *, tok_embeddings: nn.Module, layers: Iterable[nn.Module], norm: nn.Module,
                 output: nn.Module | None = None):
        super().__init__()
        self.tok_embeddings = tok_embeddings
        self.layers = layers if isinstance(layers, nn.ModuleList) else nn.ModuleList(layers)
        self.norm = norm
        self.output = output

    @property
    def tied(self) -> bool:
        return self.output is None

    def setup_caches(self, batch_size: int, max_seq_len: int, dtype: torch.dtype,
                     device: torch.device | str | None = None) -> None:
        """Allocate a KV cache in every attention layer; forwards then need ``input_pos``."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.setup_cache(batch_size, max_seq_len, dtype, device)

    def reset_caches(self) -> None:
        """Zero every KV cache (keeps the allocation)."""
        for module in self.modules():
            if isinstance(module, Attention) and module.kv_cache is not None:
                module.kv_cache.reset()

    def remove_caches(self) -> None:
        for module in self.modules():
            if isinstance(module, Attention):
                module.kv_cache = None

    def caches_are_enabled(self) -> bool:
        return any(isinstance(m, Attention) and m.kv_cache is not None for m in self.modules())

    def forward(self, tokens: torch.Tensor, *, mask: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                logits_to_keep: int = 0, per_token: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, mask=mask, input_pos=input_pos)
        h = self.norm(h)
        if labels is not None and per_token:
            return self._token_log_probs(h, labels)
        if labels is not None:
            return self._loss_sum(h, labels)
        if logits_to_keep:  # generation's prefill needs the last position only: skip [b, s, vocab]
            h = h[:, -logits_to_keep:]
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight)
        return self.output(h)

    def _loss_sum(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.output is None:
            return linear_cross_entropy(h, self.tok_embeddings.weight, labels)
        if type(self.output) is nn.Linear and self.output.bias is None:
            return linear_cross_entropy(h, self.output.weight, labels)
        return chunked_cross_entropy(self.output(h), labels)  # e.g. a LoRA-adapted output projection

    def _token_log_probs(self, h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.output is None:
            return linear_token_log_probs(h, self.tok_embeddings.weight, labels)
        if type(self.output) is nn.Linear and self.output.bias is None:
            return linear_token_log_probs(h, self.output.weight, labels)
        # e.g. a LoRA-adapted output projection: ready logits (the [b, s, vocab] tensor exists here)
        logits = self.output(h).float()
        valid = labels != IGNORE_INDEX
        log_probs = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return log_probs * valid, (logits.detach().mean(-1) * valid)
