"""Map-style datasets: row source + message transform + tokenizer -> ``{"tokens", "labels"}``.

Rows are tokenized lazily on access (``dataset[i]``), so opening a large JSONL file costs one
newline scan. ``packed=True`` tokenizes everything once up front (packing needs every length) and
returns a :class:`~tunekit.data.packing.PackedDataset`. Every dataset has a ``collate`` method to
pass to ``DataLoader(collate_fn=...)``. Preference data (pairs, KTO) lives in
:mod:`tunekit.data.preference`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tunekit.config.errors import UserError
from tunekit.config.instantiate import config_kwargs
from tunekit.data.collate import padded_collate
from tunekit.data.errors import DataError
from tunekit.data.labels import shift_labels
from tunekit.data.messages import (
    AlpacaToMessages,
    InputOutputToMessages,
    OpenAIToMessages,
    ShareGPTToMessages,
    TextToDocument,
)
from tunekit.data.sources import HF_LOAD_KWARGS, load_rows

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation")


def split_indices(n: int, split: str, val_fraction: float, seed: int = 0) -> np.ndarray:
    """Row indices of ``split`` when a fraction of ``n`` rows is held out for validation.

    The held-out rows are a seeded random permutation's first ``round(n * val_fraction)`` rows:
    the same (n, fraction, seed) always gives the same split. Indices come back sorted.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0.0:
        if split == "validation":
            raise ValueError("split='validation' needs val_fraction > 0 or a source dict "
                             "{'train': ..., 'validation': ...}")
        return np.arange(n)
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    chosen = perm[:n_val] if split == "validation" else perm[n_val:]
    return np.sort(chosen)


def tokenize_item(tokenizer, item: Any, train_on_input: bool) -> tuple[list[int], list[bool] | None]:
    """Tokens and mask (True = not trained on; None = train on all) of one transformed row.

    ``item`` is a document string (encoded with BOS and EOS) or a list of messages.
    """
    if isinstance(item, str):
        return tokenizer.encode(item, add_bos=True, add_eos=True), None
    tokens, mask = tokenizer.tokenize_messages(item)
    return tokens, (None if train_on_input else mask)


def _labels(tokens: list[int], mask: list[bool] | None) -> list[int]:
    return shift_labels(tokens, mask if mask is not None else [False] * len(tokens))


class RowDataset(torch.utils.data.Dataset):
    """Rows of ``rows`` (restricted to ``indices``) passed through ``transform``; a bad row
    raises DataError (located at its ``file:line``) on access. ``num_skipped`` / ``skipped``:
    the rows a subclass dropped as bad (:class:`SFTDataset` with ``skip_bad_rows``)."""

    def __init__(self, rows: Sequence, transform: Callable, tokenizer, *, indices=None):
        self.rows, self.transform, self.tokenizer = rows, transform, tokenizer
        self.indices = np.arange(len(rows)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.num_skipped = 0
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.indices)

    def where(self, i: int) -> str:
        return self.rows.where(int(self.indices[i]))

    def transformed(self, i: int) -> Any:
        """The transform's output for item ``i`` (messages, a document, or a preference pair)."""
        j = int(self.indices[i])
        try:
            return self.transform(self.rows[j])
        except DataError as e:
            raise e.at(self.rows.where(j)) from None


def log_skipped(skipped: list[str], rows) -> None:
    if skipped:
        shown = "\n  ".join(skipped[:5])
        more = f"\n  ... and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        logger.warning("skipped %d bad row(s) of %s:\n  %s%s", len(skipped),
                       getattr(rows, "name", "data"), shown, more)


class SFTDataset(RowDataset):
    """Supervised examples: ``dataset[i] = {"tokens": list[int], "labels": list[int]}``.

    Labels are shifted (``labels[k]`` is the target of position ``k``), -100 on prompt tokens
    (unless ``train_on_input``) and on the last token. Examples longer than ``max_seq_len`` are
    truncated (the labels are computed after truncation).

    Every row is validated when the dataset is built (``validate=True``): transformed and
    tokenized once, in ``num_workers`` forked processes, so a bad row deep in the file stops the
    run before its first step, not hours into it. Bad rows raise one DataError naming the first
    of them (``file:line``, field, problem) and how many there are; with ``skip_bad_rows`` they are
    dropped, counted in ``num_skipped`` and logged. (Packing validates while it tokenizes, so its
    base dataset is built with ``validate=False``.)
    """

    def __init__(self, rows: Sequence, transform: Callable, tokenizer, *, train_on_input: bool = False,
                 max_seq_len: int | None = None, indices=None, skip_bad_rows: bool = False,
                 validate: bool = True, num_workers: int = 1):
        super().__init__(rows, transform, tokenizer, indices=indices)
        self.train_on_input = train_on_input
        self.max_seq_len = max_seq_len
        if validate:
            self._drop_bad_rows(skip_bad_rows, num_workers)

    def _bad_rows(self, lo: int, hi: int) -> list[tuple[int, DataError]]:
        bad = []
        for i in range(lo, hi):
            try:
                self.tokenize(i)
            except DataError as e:
                bad.append((i, e))
        return bad

    def _drop_bad_rows(self, skip_bad_rows: bool, num_workers: int) -> None:
        from tunekit.data.parallel import map_ranges

        bad = [b for part in map_ranges(self._bad_rows, len(self), num_workers) for b in part]
        if not bad:
            return
        if not skip_bad_rows:
            first = bad[0][1]
            others = ", ".join(self.where(i) for i, _ in bad[1:6]) + (", ..." if len(bad) > 6 else "")
            raise DataError(f"{first.reason} ({len(bad)} bad row(s) found before training"
                            + (f"; the others: {others}" if others else "")
                            + "; fix them, or set skip_bad_rows: true in the dataset to skip them)",
                            where=first.where, field=first.field)
        self.skipped = [str(e) for _, e in bad]
        self.num_skipped = len(bad)
        self.indices = np.delete(self.indices, [i for i, _ in bad])
        log_skipped(self.skipped, self.rows)

    def tokenize(self, i: int) -> tuple[list[int], list[bool] | None]:
        """Untruncated tokens and mask (True = not trained on, None = all trained) of item ``i``."""
        item = self.transformed(i)
        try:
            tokens, mask = tokenize_item(self.tokenizer, item, self.train_on_input)
        except DataError:
            raise
        except ValueError as e:  # e.g. the chat format rejects the conversation
            raise DataError(f"tokenizer: {e}", where=self.where(i)) from None
        if not tokens:
            raise DataError("tokenizes to no tokens", where=self.where(i))
        return tokens, mask

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        tokens, mask = self.tokenize(i)
        if self.max_seq_len is not None and len(tokens) > self.max_seq_len:
            tokens = tokens[: self.max_seq_len]
            mask = None if mask is None else mask[: self.max_seq_len]
        return {"tokens": tokens, "labels": _labels(tokens, mask)}

    def collate(self, batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-padded batch (see :func:`~tunekit.data.collate.padded_collate`)."""
        return padded_collate(batch, self.tokenizer.pad_id)


def _open(source, split: str, val_fraction: float, seed: int, text_split: str, hf_kwargs: dict):
    """Row source and indices of ``split``; ``source`` may be ``{"train": ..., "validation": ...}``
    to split by file."""
    if isinstance(source, Mapping):
        if split not in source:
            raise DataError(f"split {split!r} is not a key of the source mapping (keys: {', '.join(source)}); "
                            "set split to one of them")
        rows = _nonempty(load_rows(source[split], text_split=text_split, **hf_kwargs), source[split])
        return rows, np.arange(len(rows))
    rows = _nonempty(load_rows(source, text_split=text_split, **hf_kwargs), source)
    return rows, split_indices(len(rows), split, val_fraction, seed)


def _nonempty(rows: Sequence, source) -> Sequence:
    if len(rows) == 0:  # caught here, naming the file, not as an empty sampler or loader later on
        where = source if isinstance(source, (str, os.PathLike)) else getattr(rows, "name", "the source")
        raise DataError("holds no examples (an empty file?); point the dataset's source at the data", where=str(where))
    return rows


def _sft(tokenizer, source, transform, *, train_on_input, max_seq_len, packed, long_examples, split,
         val_fraction, seed, skip_bad_rows, text_split, num_workers, streaming, shuffle_buffer, hf_kwargs):
    if streaming:
        return _stream(tokenizer, source, transform, train_on_input=train_on_input, max_seq_len=max_seq_len,
                       packed=packed, long_examples=long_examples, split=split, val_fraction=val_fraction,
                       skip_bad_rows=skip_bad_rows, shuffle_buffer=shuffle_buffer, hf_kwargs=hf_kwargs)
    if shuffle_buffer:
        raise UserError("shuffle_buffer applies to streaming: true only (map-style datasets are shuffled by the "
                        "recipe's sampler); remove it")
    rows, indices = _open(source, split, val_fraction, seed, text_split, hf_kwargs)
    if not packed:
        if long_examples != "truncate":
            raise UserError("long_examples='split' needs packed=True (unpacked rows are truncated)")
        return SFTDataset(rows, transform, tokenizer, train_on_input=train_on_input, max_seq_len=max_seq_len,
                          indices=indices, skip_bad_rows=skip_bad_rows, num_workers=num_workers)
    if max_seq_len is None:
        raise UserError("packed=True needs max_seq_len (the length of a packed row)")
    from tunekit.data.packing import pack_dataset  # packing imports this module

    base = SFTDataset(rows, transform, tokenizer, train_on_input=train_on_input,
                      max_seq_len=max_seq_len, indices=indices, validate=False)
    return pack_dataset(base, max_seq_len, long_examples=long_examples, skip_bad_rows=skip_bad_rows,
                        num_workers=num_workers)


def _stream(tokenizer, source, transform, *, train_on_input, max_seq_len, packed, long_examples, split,
            val_fraction, skip_bad_rows, shuffle_buffer, hf_kwargs):
    """``streaming: true``: packed rows from a stream (:mod:`tunekit.data.streaming`)."""
    from tunekit.data.sources import open_stream
    from tunekit.data.streaming import StreamingPackedDataset

    if not packed or max_seq_len is None:
        raise UserError("streaming: true packs as it reads: set packed: true and max_seq_len")
    if val_fraction:
        raise UserError("streaming: true cannot hold out a random val_fraction (the stream's length is unknown); "
                        "give the source as {train: ..., validation: ...} or use the hub dataset's hf_split")
    if isinstance(source, Mapping):
        if split not in source:
            raise DataError(f"split {split!r} is not a key of the source mapping (keys: {', '.join(source)})")
        source = source[split]
    stream = open_stream(source, **hf_kwargs)
    return StreamingPackedDataset(stream, transform, tokenizer, max_seq_len=max_seq_len,
                                  train_on_input=train_on_input, long_examples=long_examples,
                                  skip_bad_rows=skip_bad_rows, shuffle_buffer=shuffle_buffer)


@config_kwargs(*HF_LOAD_KWARGS)
def instruct_dataset(tokenizer, source, *, format: str = "alpaca", column_map: Mapping[str, str] | None = None,
                     system_prompt: str | None = None, train_on_input: bool = False,
                     max_seq_len: int | None = None, packed: bool = False, long_examples: str = "truncate",
                     split: str = "train", val_fraction: float = 0.0, seed: int = 0,
                     skip_bad_rows: bool = False, text_split: str = "file", num_workers: int = 1,
                     streaming: bool = False, shuffle_buffer: int = 0, **hf_kwargs):
    """Single-turn instruction data. ``format``: ``"alpaca"`` (instruction/input/output with the
    Alpaca prompt) or ``"input_output"`` (input -> user, output -> assistant, optional system)."""
    if format == "alpaca":
        transform = AlpacaToMessages(column_map)
    elif format == "input_output":
        transform = InputOutputToMessages(column_map, system_prompt)
    else:
        raise UserError(f"instruct_dataset format must be 'alpaca' or 'input_output', got {format!r}")
    return _sft(tokenizer, source, transform, train_on_input=train_on_input, max_seq_len=max_seq_len,
                packed=packed, long_examples=long_examples, split=split, val_fraction=val_fraction,
                seed=seed, skip_bad_rows=skip_bad_rows, text_split=text_split, num_workers=num_workers, streaming=streaming,
                shuffle_buffer=shuffle_buffer, hf_kwargs=hf_kwargs)


@config_kwargs(*HF_LOAD_KWARGS)
def chat_dataset(tokenizer, source, *, format: str = "openai", column_map: Mapping[str, str] | None = None,
                 train_on_input: bool = False, max_seq_len: int | None = None, packed: bool = False,
                 long_examples: str = "truncate", split: str = "train", val_fraction: float = 0.0,
                 seed: int = 0, skip_bad_rows: bool = False, text_split: str = "file", num_workers: int = 1,
                 streaming: bool = False, shuffle_buffer: int = 0, **hf_kwargs):
    """Multi-turn conversations. ``format``: ``"openai"`` (``messages`` with role/content) or
    ``"sharegpt"`` (``conversations`` with from/value)."""
    transforms = {"openai": OpenAIToMessages, "sharegpt": ShareGPTToMessages}
    if format not in transforms:
        raise UserError(f"chat_dataset format must be 'openai' or 'sharegpt', got {format!r}")
    return _sft(tokenizer, source, transforms[format](column_map), train_on_input=train_on_input,
                max_seq_len=max_seq_len, packed=packed, long_examples=long_examples, split=split,
                val_fraction=val_fraction, seed=seed, skip_bad_rows=skip_bad_rows,
                text_split=text_split, num_workers=num_workers, streaming=streaming,
                shuffle_buffer=shuffle_buffer, hf_kwargs=hf_kwargs)


@config_kwargs(*HF_LOAD_KWARGS)
def text_completion_dataset(tokenizer, source, *, column_map: Mapping[str, str] | None = None,
                            max_seq_len: int | None = None, packed: bool = False,
                            long_examples: str = "truncate", split: str = "train",
                            val_fraction: float = 0.0, seed: int = 0, skip_bad_rows: bool = False,
                            text_split: str = "file", num_workers: int = 1, streaming: bool = False,
                            shuffle_buffer: int = 0, **hf_kwargs):
    """Plain text for continued pretraining: every token after BOS is a target. ``.txt`` files are
    one document per file (``text_split="file"``) or per blank-line separated block (``"paragraph"``)."""
    return _sft(tokenizer, source, TextToDocument(column_map), train_on_input=True,
                max_seq_len=max_seq_len, packed=packed, long_examples=long_examples, split=split,
                val_fraction=val_fraction, seed=seed, skip_bad_rows=skip_bad_rows,
                text_split=text_split, num_workers=num_workers, streaming=streaming,
                shuffle_buffer=shuffle_buffer, hf_kwargs=hf_kwargs)
