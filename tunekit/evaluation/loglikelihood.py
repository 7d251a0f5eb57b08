"""Log-likelihood of continuations given contexts, batched, as lm-evaluation-harness computes it.

Tokenization (lm-eval's ``TemplateLM._encode_pair`` for causal models): trailing whitespace of the
context moves to the front of the continuation; ``whole = encode(context + continuation)`` and
``ctx = encode(context)`` (both with the tokenizer's BOS, as a Hugging Face tokenizer's default
``add_special_tokens=True`` adds it), and the continuation's tokens are ``whole[len(ctx):]``. So the
continuation is tokenized in its context (``" 9"`` after ``"is"`` becomes the same pieces as in
running text), not on its own.

Scoring: the model reads ``(ctx + cont)[:-1]`` (left-truncated to the model's positions) and the
log-likelihood is ``sum_t log p(cont_t | everything before it)``; ``is_greedy`` says whether every
continuation token is the argmax at its position. Rows of a batch are right-padded: with causal
attention no real token sees the padding, so no mask is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tunekit.generation import max_positions
from tunekit.losses.cross_entropy import IGNORE_INDEX
from tunekit.modules.transformer import TransformerDecoder


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` the way lm-eval splits them (see the module docstring).
    An empty context scores the continuation after the BOS token (EOS if the tokenizer has none)."""
    if not context:
        cont = tokenizer.encode(continuation, add_bos=False, add_eos=False)
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_bos=True, add_eos=False)
    ctx = tokenizer.encode(context, add_bos=True, add_eos=False)
    return ctx, whole[len(ctx):]


def _token_log_probs(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, need_greedy: bool
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``log p(labels)`` float32 ``[b, s]`` (0 where the label is IGNORE_INDEX) and, when asked,
    ``Bool[b, s]``: the label is the argmax (True where there is no label)."""
    if isinstance(model, TransformerDecoder) and not need_greedy:
        return model(tokens, labels=labels, per_token=True)[0], None  # fused: no [b, s, vocab] logits
    log_probs = torch.log_softmax(model(tokens).float(), dim=-1)
    valid = labels != IGNORE_INDEX
    target = labels.clamp(min=0)[..., None]
    picked = log_probs.gather(-1, target).squeeze(-1) * valid
    greedy = (log_probs.argmax(-1) == labels) | ~valid
    return picked, greedy


@torch.no_grad()
def continuation_log_likelihoods(model: nn.Module, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                                 batch_size: int, device: torch.device | str | None = None, pad_id: int = 0,
                                 need_greedy: bool = False) -> list[tuple[float, bool | None]]:
    """``(sum of log p(continuation tokens), is_greedy)`` for each ``(context_ids, continuation_ids)``.

    ``batch_size`` rows per forward, longest first (lm-eval's order); the model runs in eval mode
    (its mode is restored). ``is_greedy`` is None unless ``need_greedy`` (which takes the full
    ``[b, s, vocab]`` logits instead of the fused per-token projection). Sharded models: every rank
    must pass the same requests (each forward needs every rank).
    """
    if device is None:
        device = next(model.parameters()).device
    limit = max_positions(model)
    rows = []
    for ctx, cont in requests:
        if len(ctx) == 0 or len(cont) == 0:
            raise ValueError("continuation_log_likelihoods: context and continuation need at least one token each")
        whole = list(ctx) + list(cont)
        if limit is not None and len(whole) - 1 > limit:
            whole = whole[len(whole) - 1 - limit:]  # left-truncate, as lm-eval does
        rows.append((whole, len(cont)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool | None]] = [(0.0, None)] * len(rows)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            width = max(len(rows[i][0]) for i in chunk) - 1
            tokens = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for r, i in enumerate(chunk):
                whole, n_cont = rows[i]
                n = len(whole) - 1
                tokens[r, :n] = torch.as_tensor(whole[:-1])
                labels[r, n - n_cont:n] = torch.as_tensor(whole[-n_cont:])
            log_probs, greedy = _token_log_probs(model, tokens.to(device), labels.to(device), need_greedy)
            sums = log_probs.double().sum(-1).tolist()
            flags = greedy.all(-1).tolist() if greedy is not None else [None] * len(chunk)
            for i, total, flag in zip(chunk, sums, flags):
                results[i] = (total, flag)
    finally:
        model.train(was_training)
    return results
