"""Packed rows from a stream (``streaming: true``): a hub dataset or large files read as they arrive.

A :class:`StreamingPackedDataset` reads rows from a :class:`~tunekit.data.sources.HFStream`,
transforms and tokenizes each one as it comes, and packs the documents greedily into rows of at
most ``max_seq_len`` tokens with exactly the rule of :class:`~tunekit.data.packing.PackedDataset`
(a new row when the next document does not fit; ``long_examples`` truncate or split), so the
same data gives the same packed rows, without tokenizing or holding the whole dataset first.

One pass over the stream is an epoch. The order is the source's (deterministic), or ``datasets``'
buffered shuffle seeded with ``seed + epoch`` when the dataset has ``shuffle_buffer > 0`` and
the run shuffles.

Ranks: every rank reads and packs the whole stream (tokenization is repeated per rank; the model
step dominates) and takes the packed rows ``g`` with ``g % world_size == rank``, so the shares
are disjoint and deterministic. The epoch's last round is completed with the epoch's first rows
(as :class:`~tunekit.training.sampler.ResumableSampler` pads), so every rank gets the same number
of rows and takes the same number of steps.

Resume: the dataset plays the sampler's part for the training loop (``set_epoch``,
``position``, ``state_dict(consumed=...)``, ``load_state_dict``). After a rank has consumed ``c``
packed rows of an epoch, ``c * world_size`` rows were consumed in all; the state stores where the
next row starts (source row and, for a split document, chunk) and the resumed stream continues
there: the same rows as the uninterrupted run. Iterate it with ``num_workers=0`` (the loader
helper does): the position is tracked in this process.

Bad rows: the stream cannot be checked before training (that is what streaming avoids); a bad row
raises DataError when it is reached, or is skipped and counted with ``skip_bad_rows``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch

from tunekit.config.errors import UserError
from tunekit.data.collate import packed_collate
from tunekit.data.datasets import tokenize_item
from tunekit.data.errors import DataError
from tunekit.data.labels import shift_labels
from tunekit.data.sources import HFStream

logger = logging.getLogger(__name__)


class StreamPoint(NamedTuple):
    """Where a packed row starts: source row ``row``, chunk ``chunk`` of it (``long_examples:
    split``); ``done``: the epoch has no rows left."""

    row: int
    chunk: int = 0
    done: bool = False


class _Row(NamedTuple):
    tokens: list[int]
    labels: list[int]
    seq_lens: list[int]
    after: StreamPoint  # where the next packed row starts


class StreamingPackedDataset(torch.utils.data.IterableDataset):
    """Packed rows ``{"tokens": LongTensor[n], "labels": LongTensor[n], "seq_lens": LongTensor[k]}``
    (n <= max_seq_len) from ``stream``; :meth:`collate` pads them as ``PackedDataset.collate``."""

    def __init__(self, stream: HFStream, transform: Callable, tokenizer, *, max_seq_len: int,
                 train_on_input: bool = False, long_examples: str = "truncate", skip_bad_rows: bool = False,
                 shuffle_buffer: int = 0):
        if long_examples not in ("truncate", "split"):
            raise ValueError(f"long_examples must be 'truncate' or 'split', got {long_examples!r}")
        self.stream, self.transform, self.tokenizer = stream, transform, tokenizer
        self.max_seq_len, self.pad_id = max_seq_len, tokenizer.pad_id
        self.train_on_input, self.long_examples = train_on_input, long_examples
        self.skip_bad_rows, self.shuffle_buffer = skip_bad_rows, shuffle_buffer
        self.name = stream.name
        self.rank, self.world_size, self.shuffle, self.seed = 0, 1, False, 0
        self.epoch = 0
        self.position = 0  # packed rows of this rank consumed in the current epoch
        self._start = StreamPoint(0)  # where the epoch continues (the state of ``position``)
        self._after: dict[int, StreamPoint] = {0: self._start}  # position -> where the rest starts
        self.num_skipped = 0

    def shard(self, *, rank: int = 0, world_size: int = 1, shuffle: bool = False, seed: int = 0) -> None:
        """This process's share (rank of world_size) and the run's shuffle and seed (set by the
        loader helper before iterating)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.rank, self.world_size, self.shuffle, self.seed = rank, world_size, shuffle, seed

    # -- the sampler's part ---------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning (a no-op when resuming into the epoch that
        ``load_state_dict`` restored)."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0
            self._start = StreamPoint(0)
            self._after = {0: self._start}

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """{"epoch", "position", "seed", "world_size", "stream": [row, chunk, done], "source"}
        after ``consumed`` packed rows of this rank in this epoch (the same on every rank)."""
        position = self.position if consumed is None else consumed
        if position not in self._after:
            raise RuntimeError(f"stream position {position} was not reached in this epoch (iterate the "
                               "streaming dataset with num_workers=0)")
        return {"epoch": self.epoch, "position": position, "seed": self.seed, "world_size": self.world_size,
                "stream": list(self._after[position]), "source": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` stopped (also with another number of ranks when the rows
        consumed so far split evenly over them)."""
        if state.get("source") != self.name or state["seed"] != self.seed:
            raise UserError(f"the checkpoint's data position is for the stream {state.get('source')!r} with seed "
                            f"{state['seed']}, this run reads {self.name!r} with seed {self.seed}; resume with the "
                            "same data and seed (or start a fresh output_dir)")
        consumed = state["position"] * state["world_size"]
        if consumed % self.world_size:
            raise UserError(f"the checkpoint stopped after {consumed} packed rows of epoch {state['epoch']}, which "
                            f"do not split over {self.world_size} processes; resume with a process count dividing "
                            f"{consumed}")
        self.epoch, self.position = state["epoch"], consumed // self.world_size
        self._start = StreamPoint(*state["stream"])
        self._after = {self.position: self._start}

    # -- the rows ---------------------------------------------------------------------------------

    def _documents(self, start: StreamPoint) -> Iterator[tuple[list[int], list[int], StreamPoint]]:
        """(tokens, labels, where this document starts) of every document (chunk) from ``start``."""
        seed = self.seed + self.epoch
        shuffle_buffer = self.shuffle_buffer if self.shuffle else 0
        k = start.row
        for row in self.stream.rows(skip=start.row, shuffle_buffer=shuffle_buffer, seed=seed):
            try:
                tokens, mask = self._tokenize(row, k)
            except DataError as e:
                if not self.skip_bad_rows:
                    raise
                self.num_skipped += 1
                logger.warning("skipped bad row (%d so far): %s", self.num_skipped, e)
                k += 1
                continue
            if self.long_examples == "truncate":
                tokens, mask = tokens[:self.max_seq_len], mask[:self.max_seq_len]
            labels = shift_labels(tokens, mask)
            first_chunk = start.chunk if k == start.row else 0
            for c in range(first_chunk, -(-len(tokens) // self.max_seq_len)):
                lo, hi = c * self.max_seq_len, (c + 1) * self.max_seq_len
                yield tokens[lo:hi], labels[lo:hi], StreamPoint(k, c)
            k += 1

    def _tokenize(self, row: dict[str, Any], k: int) -> tuple[list[int], list[bool]]:
        where = self.stream.where(k)
        try:
            item = self.transform(row)
            tokens, mask = tokenize_item(self.tokenizer, item, self.train_on_input)
        except DataError as e:
            raise e.at(where) from None
        except ValueError as e:  # e.g. the chat format rejects the conversation
            raise DataError(f"tokenizer: {e}", where=where) from None
        if not tokens:
            raise DataError("tokenizes to no tokens", where=where)
        return tokens, [False] * len(tokens) if mask is None else list(mask)

    def _packed(self, start: StreamPoint) -> Iterator[_Row]:
        """Packed rows from ``start`` in stream order (all ranks' rows)."""
        tokens: list[int] = []
        labels: list[int] = []
        seq_lens: list[int] = []
        for doc_tokens, doc_labels, at in self._documents(start):
            if tokens and len(tokens) + len(doc_tokens) > self.max_seq_len:
                yield _Row(tokens, labels, seq_lens, at)
                tokens, labels, seq_lens = [], [], []
            tokens += doc_tokens
            labels += doc_labels
            seq_lens.append(len(doc_tokens))
        if tokens:
            yield _Row(tokens, labels, seq_lens, StreamPoint(0, done=True))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if torch.utils.data.get_worker_info() is not None:
            raise UserError("a streaming dataset is read in the training process: set num_workers: 0")
        if self._start.done and self.position == 0:  # the epoch ended before: iterating again starts it over
            self._start = StreamPoint(0)
            self._after = {0: self._start}
        rows = iter(() if self._start.done else self._packed(self._start))
        head: list[_Row] = []  # the epoch's first rows, to complete its last round
        while True:
            round_ = [r for _, r in zip(range(self.world_size), rows)]
            if not round_:
                break
            if self.position == 0 and self._start.row == 0 and self._start.chunk == 0 and not head:
                head = list(round_)
            if len(round_) < self.world_size:  # the epoch's last round: complete it from its start
                head = head or [r for _, r in zip(range(self.world_size), self._packed(StreamPoint(0)))]
                round_ += (head * self.world_size)[:self.world_size - len(round_)]
                round_[-1] = round_[-1]._replace(after=StreamPoint(0, done=True))
            own = round_[self.rank]
            self.position += 1
            self._after[self.position] = round_[-1].after
            self._after.pop(self.position - 4096, None)  # a checkpoint asks for a recent position
            yield {"tokens": torch.tensor(own.tokens), "labels": torch.tensor(own.labels),
                   "seq_lens": torch.tensor(own.seq_lens)}
            if round_[-1].after.done:
                break
        # The epoch is over. Its last positions stay known (the loop saves after the epoch's last,
        # possibly short, accumulation group, which ends after this iterator); iterating again
        # without set_epoch starts the epoch over.
        self.position, self._start = 0, StreamPoint(0, done=True)

    def collate(self, batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Fixed-length batch with input_pos and block-causal mask (``packed_collate``)."""
        return packed_collate(batch, self.pad_id, self.max_seq_len)
