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

from tunekit.config.errors import UserError
from tunekit.data.preference import preference_collate


def _check_sizes(builder: str, **sizes: int) -> None:
    """A UserError naming the first of ``sizes`` that is not a positive integer."""
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{builder}: {name} must be a positive integer, got {value!r}")


class RandomTokenDataset(Dataset):
    """``num_samples`` rows of ``seq_len + 1`` uniform random ids in ``[0, vocab_size)``; row i
    depends only on (``seed``, i), so any subset or order is reproducible.

    Item: ``tokens`` = ids[:-1], ``labels`` = ids[1:] (already shifted, as the Batch contract says),
    both LongTensor[seq_len].
    """

    def __init__(self, *, vocab_size: int, seq_len: int, num_samples: int, seed: int = 0):
        _check_sizes("random_token_dataset", vocab_size=vocab_size, seq_len=seq_len, num_samples=num_samples)
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


class RandomPreferenceDataset(Dataset):
    """``num_pairs`` preference pairs of uniform random ids: a prompt of ``prompt_len`` tokens and
    two completions of ``completion_len`` (so two sequences of ``prompt_len + completion_len``
    tokens per pair, no padding). Pair i depends only on (``seed``, i). Items and batches are
    those of ``tunekit.data.preference.PreferenceDataset`` (the Preference batch contract): the
    targets are the completions' tokens, each predicted from the position before it."""

    def __init__(self, *, vocab_size: int, prompt_len: int, completion_len: int, num_pairs: int, seed: int = 0,
                 packed_len: int | None = None):
        _check_sizes("random_preference_dataset", vocab_size=vocab_size, prompt_len=prompt_len,
                     completion_len=completion_len, num_pairs=num_pairs)
        self.vocab_size, self.prompt_len, self.completion_len = vocab_size, prompt_len, completion_len
        self.num_pairs, self.seed, self.packed_len = num_pairs, seed, packed_len

    def __len__(self) -> int:
        return self.num_pairs

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        if not 0 <= index < self.num_pairs:
            raise IndexError(f"index {index} out of range for {self.num_pairs} pairs")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        ids = torch.randint(self.vocab_size, (self.prompt_len + 2 * self.completion_len,), generator=generator).tolist()
        prompt, chosen, rejected = (ids[:self.prompt_len], ids[self.prompt_len:self.prompt_len + self.completion_len],
                                    ids[self.prompt_len + self.completion_len:])
        item = {}
        for name, completion in (("chosen", chosen), ("rejected", rejected)):
            tokens = prompt + completion
            # labels[i] = tokens[i + 1] where that token is a completion token, else -100
            labels = [-100] * (self.prompt_len - 1) + completion + [-100]
            item[f"{name}_tokens"], item[f"{name}_labels"] = tokens, labels
        return item

    def collate(self, batch: Sequence[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return preference_collate(batch, pad_id=0, packed_len=self.packed_len)


def random_preference_dataset(tokenizer=None, *, vocab_size: int, prompt_len: int, completion_len: int,
                              num_pairs: int, seed: int = 0, packed_len: int | None = None) -> RandomPreferenceDataset:
    """Preference dataset builder with the recipes' signature (the tokenizer is not needed);
    ``packed_len``: the packed shared-prompt layout with rows of that many tokens."""
    return RandomPreferenceDataset(vocab_size=vocab_size, prompt_len=prompt_len, completion_len=completion_len,
                                   num_pairs=num_pairs, seed=seed, packed_len=packed_len)
