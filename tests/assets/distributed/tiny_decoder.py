"""A tiny decoder-shaped model (embedding, ModuleList `layers`, norm, output) and a deterministic
data stream, shared by the distributed test script and tests/test_distributed.py."""

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, DIM, HIDDEN, N_LAYERS, SEQ = 96, 64, 128, 3, 8


class Block(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.norm = nn.RMSNorm(DIM)
        self.w1 = nn.Linear(DIM, hidden, bias=False)
        self.w2 = nn.Linear(hidden, DIM, bias=False)

    def forward(self, x):
        x = x + self.w2(F.silu(self.w1(self.norm(x))))
        # causal token mixing (running mean) so positions interact like attention would
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype).view(1, -1, 1)
        return x + x.cumsum(dim=1) / steps


class TinyDecoder(nn.Module):
    def __init__(self, hidden: int = HIDDEN):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList(Block(hidden) for _ in range(N_LAYERS))
        self.norm = nn.RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.output(self.norm(h))


def global_micro_batches(step: int, n_micro: int, rows: int):
    """n_micro (tokens, labels) pairs of [rows, SEQ]; later rows keep fewer labels so ranks see
    uneven token counts."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(n_micro):
        tokens = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
        labels = torch.randint(0, VOCAB, (rows, SEQ), generator=g)
        keep_prob = torch.linspace(0.9, 0.2, rows).view(-1, 1)
        drop = torch.rand(rows, SEQ, generator=g) > keep_prob
        labels[drop] = -100
        out.append((tokens, labels))
    return out


def token_loss_sum(model, tokens, labels):
    logits = model(tokens)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
