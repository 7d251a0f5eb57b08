"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import torch

from tunekit.config.errors import ConfigError


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming the bad argument (``temperature >= 0``, ``top_k >= 1``,
    ``0 < top_p <= 1``; None switches a filter off)."""
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k must be a positive integer or null, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ConfigError(f"top_p must be in (0, 1] or null, got {top_p!r}")


def next_token_probs(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                     top_p: float | None = None) -> torch.Tensor:
    """Sampling distribution ``Float32[b, vocab]`` from ``logits: [b, vocab]``.

    Applied in this order (as transformers does): divide by ``temperature`` (> 0), keep the
    ``top_k`` largest logits (ties with the k-th are kept too), then keep the smallest set of most
    likely tokens whose probability mass reaches ``top_p`` (the most likely token is always kept),
    and renormalise.
    """
    if temperature <= 0:
        raise ValueError(f"next_token_probs needs temperature > 0, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_next_token(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids ``Long[b]`` from ``logits: [b, vocab]``.

    ``temperature == 0`` (or ``top_k == 1``) is greedy: the arg-max, lowest id on ties, no
    randomness. Otherwise one draw from :func:`next_token_probs` per row with ``generator`` (a
    ``torch.Generator`` on the logits' device; seed it for reproducible samples).
    """
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0 or top_k == 1:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
