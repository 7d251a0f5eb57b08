"""Uniform random token sequences: a dataset for benchmarks and smoke runs that needs no files.

    dataset:
      _component_: tunekit.data.synthetic.random_token_dataset
      vocab_size: 32000
      seq_len: 512
      num_samples: 80

Every row is exactly ``seq_len`` tokens with a label at every position (no padding, no mask), so
a step's work is known in advance: what a throughput benchmark such as
``benchmarks/bench_train.py`` needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset


class RandomTokenDataset(Dataset):
    """``num_samples`` rows of ``seq_len + 1`` uniform random ids in ``[0, vocab_size)``; row i
    depends only on (``seed``, i), so any subset or order is reproducible.

    Item: ``tokens`` = ids[:-1], ``labels`` = ids[1:] (already shifted, as the Batch contract says),
    both LongTensor[seq_len].
    """

    def __init__(self, *, vocab_size: int, seq_len: int, num_samples: int, seed: int = 0):
        for name, value in (("vocab_size", vocab_size), ("seq_len", seq_len), ("num_samples", num_samples)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"random_token_dataset: {name} must be a positive integer, got {value!r}")
        self.vocab_size, self.seq_len, self.num_samples, self.seed = vocab_size, seq_len, num_samples, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        ids = torch.randint(self.vocab_size, (self.seq_len + 1,), generator=generator)
        return {"tokens": ids[:-1], "labels": ids[1:]}

    def collate(self, batch: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack equal-length rows: ``tokens``/``labels`` LongTensor[b, seq_len]."""
        return {key: torch.stack([row[key] for row in batch]) for key in ("tokens", "labels")}


def random_token_dataset(tokenizer=None, *, vocab_size: int, seq_len: int, num_samples: int,
                         seed: int = 0) -> RandomTokenDataset:
    """Dataset builder with the recipes' signature (the tokenizer they pass is not needed)."""
    return RandomTokenDataset(vocab_size=vocab_size, seq_len=seq_len, num_samples=num_samples, seed=seed)
