"""Prompt tuning (Lester et al. 2021): n learned "virtual token" embeddings prepended to every
sequence, everything else frozen.

The decoder's ``tok_embeddings`` is replaced by a ``PromptEmbedding`` that keeps the original
``weight`` (same tensor, same state-dict key) and adds ``soft_prompt`` [n, dim]. Virtual tokens are
written as negative ids (-1 .. -n) which no vocabulary uses, so the decoder's own causal mask,
rotary positions and KV cache see an ordinary sequence of n + s tokens, and a decoder called
directly with real ids behaves exactly as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PromptEmbedding(nn.Module):
    """Token embedding that maps id -k-1 to row k of ``soft_prompt`` and ids >= 0 to ``weight``.

    Shapes: tokens [b, s] -> [b, s, dim].
    """

    def __init__(self, weight: nn.Parameter, soft_prompt: torch.Tensor):
        super().__init__()
        self.weight = weight
        self.soft_prompt = nn.Parameter(soft_prompt)
        self.num_embeddings, self.embedding_dim = weight.shape

    @property
    def n_virtual_tokens(self) -> int:
        return self.soft_prompt.shape[0]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        is_virtual = tokens < 0
        real = F.embedding(tokens.clamp(min=0), self.weight)
        virtual_ids = (-tokens - 1).clamp(0, self.n_virtual_tokens - 1)
        virtual = F.embedding(virtual_ids, self.soft_prompt.to(real.dtype))
        return torch.where(is_virtual.unsqueeze(-1), virtual, real)


class PromptTuning(nn.Module):
    """Wrap a decoder (tunekit model contract) so every sequence is prefixed by learned soft-prompt
    embeddings. Only ``decoder.tok_embeddings.soft_prompt`` trains.

    Labels need no change: ``forward`` strips the virtual positions, so logits[b, i] still
    belongs to tokens[b, i]. Virtual tokens get rotary positions 0..n-1 and the real tokens are
    shifted by n (as PEFT does with ``inputs_embeds``); every real token, in every packed
    document, attends to all virtual tokens.

    Args:
        decoder: model with ``tok_embeddings`` (an ``nn.Embedding``) and the forward contract
            ``decoder(tokens, mask=, input_pos=) -> logits``. Load its weights before wrapping.
        n_virtual_tokens: number of soft-prompt vectors.
        init_token_ids: n token ids whose embeddings initialise the prompt (e.g. the tokenized
            task description); default: n ids drawn uniformly from the vocabulary.
        generator: RNG for the default initialisation.
    """

    def __init__(
        self,
        decoder: nn.Module,
        n_virtual_tokens: int,
        init_token_ids: list[int] | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        embedding = getattr(decoder, "tok_embeddings", None)
        if not isinstance(embedding, nn.Embedding):
            raise ValueError("PromptTuning: the decoder needs an nn.Embedding `tok_embeddings` "
                             f"(got {type(embedding).__name__}); wrap an unwrapped tunekit model")
        if not isinstance(n_virtual_tokens, int) or n_virtual_tokens <= 0:
            raise ValueError(f"PromptTuning: n_virtual_tokens must be a positive integer, got {n_virtual_tokens!r}")
        vocab = embedding.weight.shape[0]
        if init_token_ids is None:
            init_token_ids = torch.randint(0, vocab, (n_virtual_tokens,), generator=generator).tolist()
        if len(init_token_ids) != n_virtual_tokens or not all(0 <= i < vocab for i in init_token_ids):
            raise ValueError(f"PromptTuning: init_token_ids must be {n_virtual_tokens} ids in [0, {vocab})")
        ids = torch.tensor(init_token_ids, device=embedding.weight.device)
        soft_prompt = embedding.weight.detach()[ids].clone()
        for p in decoder.parameters():
            p.requires_grad_(False)
        decoder.tok_embeddings = PromptEmbedding(embedding.weight, soft_prompt)
        self.decoder = decoder
        self.n_virtual_tokens = n_virtual_tokens

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [b, s], mask [b, s, s] (True = may attend) or None, input_pos [b, s] or None
        -> logits [b, s, vocab] for the real tokens only."""
        n = self.n_virtual_tokens
        b, s = tokens.shape
        device = tokens.device
        virtual = -torch.arange(1, n + 1, device=device).expand(b, n)
        tokens = torch.cat([virtual, tokens], dim=1)
        if input_pos is not None:
            prefix_pos = torch.arange(n, device=device, dtype=input_pos.dtype).expand(b, n)
            input_pos = torch.cat([prefix_pos, input_pos + n], dim=1)
        if mask is not None:
            mask = extend_mask_with_prefix(mask, n)
        logits = self.decoder(tokens, mask=mask, input_pos=input_pos)
        return logits[:, n:]


def extend_mask_with_prefix(mask: torch.Tensor, n: int) -> torch.Tensor:
    """[b, s, s] attention mask -> [b, n + s, n + s]: the n prefix positions attend causally among
    themselves, every original position additionally attends to all of them."""
    b, s, _ = mask.shape
    out = torch.zeros(b, n + s, n + s, dtype=torch.bool, device=mask.device)
    out[:, :n, :n] = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    out[:, n:, :n] = True
    out[:, n:, n:] = mask
    return out
