"""Autoregressive generation for batches of left-padded prompts, with or without the KV cache.

How the KV cache is used with left padding: the cache is indexed by position, so every row keeps
its real tokens in cache slots ``0 .. L-1`` (``L`` = that row's prompt length) and its n-th new
token in slot ``L + n``, whatever padding the row had in the input. The prompt's pad tokens are
given the positions ``L .. s-1``: their keys land in slots that no query of that row can see yet
(the cache's default mask lets a query see the slots up to its own position) and that the row's
new tokens overwrite before they become visible. So rows of different lengths decode in one
batch with exactly the positions and keys they would have alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from tunekit.config.errors import UserError
from tunekit.generation.sampling import check_sampling_args, sample_next_token
from tunekit.modules.masks import padding_mask, padding_positions
from tunekit.modules.transformer import TransformerDecoder
from tunekit.modules.rope import RotaryEmbedding


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prompts of different lengths, padded on the left.

    Returns ``tokens: Long[b, s]`` (``s`` = the longest prompt) and ``is_token: Bool[b, s]``
    (False on padding).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("left_pad: every prompt needs at least one token")
    s = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), s), pad_id, dtype=torch.long)
    is_token = torch.zeros((len(prompts), s), dtype=torch.bool)
    for i, p in enumerate(prompts):
        tokens[i, s - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        is_token[i, s - len(p):] = True
    return tokens.to(device), is_token.to(device)


def max_positions(model: nn.Module) -> int | None:
    """The shortest rotary table in ``model`` (positions must stay below it), or None."""
    lengths = [m.max_seq_len for m in model.modules() if isinstance(m, RotaryEmbedding)]
    return min(lengths) if lengths else None


def _compute_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())


@contextlib.contextmanager
def kv_caches(model: nn.Module, batch_size: int, max_seq_len: int, device: torch.device) -> Iterator[None]:
    """Give ``model`` fresh KV caches for ``batch_size`` rows of ``max_seq_len`` positions, and
    remove them on exit (the model is left as it was found)."""
    if model.caches_are_enabled():
        raise ValueError("generate: the model already has KV caches set up; call model.remove_caches() first "
                         "(generate sizes its own caches for each call)")
    model.setup_caches(batch_size, max_seq_len, dtype=_compute_dtype(model), device=device)
    try:
        yield
    finally:
        model.remove_caches()


def _cache_prefill_positions(is_token: torch.Tensor) -> torch.Tensor:
    """``Long[b, s]``: real tokens get ``0 .. L-1``, pads get ``L .. s-1`` (see the module docstring)."""
    lengths = is_token.sum(dim=-1, keepdim=True)
    pad_rank = (~is_token).long().cumsum(dim=-1) - 1
    return torch.where(is_token, padding_positions(is_token), lengths + pad_rank)


@torch.no_grad()
def generate(model: nn.Module, tokens: torch.Tensor, *, max_new_tokens: int, is_token: torch.Tensor | None = None,
             stop_tokens: Sequence[int] = (), pad_id: int = 0, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None,
             use_cache: bool = True) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    Args:
        model: a :class:`~tunekit.modules.TransformerDecoder` (run in eval mode here; its mode is
            restored afterwards).
        tokens: ``Long[b, s]`` prompts, LEFT-padded (see :func:`left_pad`).
        is_token: ``Bool[b, s]``, False on padding; None = no padding.
        stop_tokens: a row is finished once it produces one of these ids (the id is kept in the
            output); generation ends when every row is finished or after ``max_new_tokens``.
        pad_id: written after a row's stop token.
        temperature, top_k, top_p, generator: see :func:`~tunekit.generation.sample_next_token`
            (``temperature=0``: greedy).
        use_cache: decode with the KV cache (one token per step); False recomputes the full
            forward over prompt + generated tokens at every step (slow; for checking).

    Returns:
        ``Long[b, n]`` new tokens, ``n <= max_new_tokens`` (shorter when every row stopped early).
    """
    check_sampling_args(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be [batch, prompt_len] with prompt_len >= 1, got shape {tuple(tokens.shape)}")
    if is_token is None:
        is_token = torch.ones_like(tokens, dtype=torch.bool)
    if not bool(is_token[:, -1].all()):
        raise ValueError("generate: prompts must be left-padded (the last column of is_token must be all True)")
    b, s = tokens.shape
    limit = max_positions(model)
    if limit is not None and s + max_new_tokens > limit:
        raise UserError(f"generate: prompt length {s} + max_new_tokens {max_new_tokens} exceeds the model's "
                        f"{limit} positions; shorten the prompts or lower max_new_tokens")
    device = tokens.device
    stop = torch.as_tensor(list(stop_tokens), dtype=torch.long, device=device)
    out = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    lengths = is_token.sum(dim=-1)

    was_training = model.training
    model.eval()
    cache = kv_caches(model, b, s + max_new_tokens, device) if use_cache else contextlib.nullcontext()
    try:
        with cache:
            if use_cache:
                logits = _last_logits(model, tokens, input_pos=_cache_prefill_positions(is_token))
            else:
                logits = _full_forward_last(model, tokens, is_token)
            for t in range(max_new_tokens):
                next_token = sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                               generator=generator)
                next_token = torch.where(done, pad_id, next_token)
                out[:, t] = next_token
                done |= torch.isin(next_token, stop)
                if t == max_new_tokens - 1 or bool(done.all()):
                    break
                if use_cache:
                    logits = model(next_token[:, None], input_pos=(lengths + t)[:, None])[:, -1]
                else:
                    tokens = torch.cat([tokens, next_token[:, None]], dim=1)
                    is_token = torch.cat([is_token, is_token.new_ones(b, 1)], dim=1)
                    logits = _full_forward_last(model, tokens, is_token)
    finally:
        model.train(was_training)
    return out[:, :t + 1]


def _full_forward_last(model: nn.Module, tokens: torch.Tensor, is_token: torch.Tensor) -> torch.Tensor:
    """Logits ``[b, vocab]`` of the last column, from a forward over the whole (left-padded) rows."""
    if bool(is_token.all()):
        return _last_logits(model, tokens)
    return _last_logits(model, tokens, mask=padding_mask(is_token), input_pos=padding_positions(is_token))


def _last_logits(model: nn.Module, tokens: torch.Tensor, **inputs) -> torch.Tensor:
    """``model(tokens, **inputs)[:, -1]``; a ``TransformerDecoder`` projects only that position (a
    128k vocabulary would otherwise take 1 GiB per 4k prompt tokens in fp32 for logits never used)."""
    if isinstance(model, TransformerDecoder):
        return model(tokens, logits_to_keep=1, **inputs)[:, -1]
    return model(tokens, **inputs)[:, -1]


def trim_at_stop(ids: Sequence[int], stop_tokens: Sequence[int]) -> list[int]:
    """``ids`` up to and including the first stop token."""
    ids = list(ids)
    for i, token in enumerate(ids):
        if token in stop_tokens:
            return ids[:i + 1]
    return ids


def generate_ids(model: nn.Module, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 stop_tokens: Sequence[int] = (), pad_id: int = 0, device: torch.device | str | None = None,
                 **kwargs) -> list[list[int]]:
    """:func:`generate` for a list of prompts of any lengths: left-pads them on ``device``
    (default: the model's) and returns each row's new ids, up to and including its stop token.
    ``kwargs``: temperature, top_k, top_p, generator, use_cache."""
    if device is None:
        device = next(model.parameters()).device
    tokens, is_token = left_pad(prompts, pad_id, device)
    out = generate(model, tokens, is_token=is_token, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                   pad_id=pad_id, **kwargs)
    return [trim_at_stop(row, stop_tokens) for row in out.tolist()]
