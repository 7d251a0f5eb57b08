"""Boolean attention masks: ``mask[..., i, j] = True`` means query i may attend to key j."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def causal_mask(seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Lower-triangular ``Bool[seq_len, seq_len]``."""
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()


def document_ids_from_seq_lens(seq_lens: Sequence[Sequence[int]], seq_len: int | None = None) -> torch.Tensor:
    """``Long[b, seq_len]`` document index of every token from per-row document lengths.

    A row whose lengths sum to less than ``seq_len`` gets one extra document for the tail.
    """
    seq_len = seq_len if seq_len is not None else max(sum(row) for row in seq_lens)
    out = torch.empty(len(seq_lens), seq_len, dtype=torch.long)
    for b, row in enumerate(seq_lens):
        lengths = list(row)
        if sum(lengths) > seq_len:
            raise ValueError(f"row {b}: document lengths sum to {sum(lengths)} > seq_len {seq_len}")
        if sum(lengths) < seq_len:
            lengths.append(seq_len - sum(lengths))
        out[b] = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return out


def block_causal_mask(document_ids: torch.Tensor | None = None, *,
                      seq_lens: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """``Bool[b, s, s]``: causal within each document, nothing across documents.

    Give either ``document_ids: Long[b, s]`` (equal ids = same document) or ``seq_lens``
    (per-row document lengths, see :func:`document_ids_from_seq_lens`).
    """
    if (document_ids is None) == (seq_lens is None):
        raise ValueError("block_causal_mask: pass exactly one of document_ids or seq_lens")
    if document_ids is None:
        document_ids = document_ids_from_seq_lens(seq_lens)
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    return same_doc & causal_mask(document_ids.shape[-1], document_ids.device)


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """``Long[b, s]`` position of each token inside its document (the ``input_pos`` of packed rows).

    Assumes each document is one contiguous run of equal ids.
    """
    s = document_ids.shape[-1]
    idx = torch.arange(s, device=document_ids.device).expand_as(document_ids)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return idx - start_idx


def padding_mask(is_token: torch.Tensor) -> torch.Tensor:
    """``Bool[b, s, s]`` causal mask that hides padding keys; ``is_token: Bool[b, s]`` (False = pad).

    Works for left or right padding. Every query may also attend to itself, so a padding query's
    row is never empty (an all-False row would make softmax produce NaN); its output is garbage
    that the loss must ignore.
    """
    s = is_token.shape[-1]
    mask = causal_mask(s, is_token.device) & is_token[:, None, :]
    return mask | torch.eye(s, dtype=torch.bool, device=is_token.device)


def padding_positions(is_token: torch.Tensor) -> torch.Tensor:
    """``Long[b, s]`` rotary positions for (left-)padded rows: real tokens count from 0, pads get 0."""
    return (is_token.long().cumsum(-1) - 1).clamp(min=0)


def sliding_window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """``Bool[..., q, k]``: key within the last ``window`` positions of the query (``q - k < window``).

    Only the window constraint: combine it with a causal/block mask.
    """
    return (q_pos[..., :, None] - k_pos[..., None, :]) < window
