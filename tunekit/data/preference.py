"""Preference data: chosen/rejected pairs (DPO and its family) and unpaired examples (KTO).

Rows come in the formats TRL accepts (:class:`~tunekit.data.messages.ChosenRejectedToMessages`,
:class:`~tunekit.data.messages.UnpairedPreferenceToMessages`) and become a prompt and its
completions. The chat template is applied as in SFT: ``tokenizer.tokenize_messages(prompt +
completion)``; the completion starts where the prompt rendered with its generation prompt stops
matching, and only completion tokens the chat format trains on are targets. Every row is tokenized
when the dataset is built, so bad rows and truncated pairs are found (and counted) before training.

Truncation (``max_seq_len``, per sequence = prompt + completion): the prompt is cut from its left
first (keeping its end, and at least one token), then the completion's end. The sequences of one
example lose the same number of prompt tokens, so both completions are scored after the same
prompt (and the packed layout can share it).

Batches follow the Preference batch contract (docs/design.md): ``tokens``/``labels`` ``[R, S]``,
``sequence_ids`` ``[R, S]`` (completion index of every target position, -1 elsewhere),
``num_pairs`` (0-d) and, for KTO, ``desirable`` ``[P]``; packed batches add ``mask`` ``[R, S, S]``
and ``input_pos`` ``[R, S]``. Completion ``2i`` is the chosen (KTO: the example's own) completion
of the batch's example ``i``, ``2i + 1`` the rejected one (KTO: the mismatched KL completion).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from tunekit.config import config_kwargs
from tunekit.config.errors import UserError
from tunekit.data.datasets import _open, log_skipped
from tunekit.data.errors import DataError
from tunekit.data.labels import CROSS_ENTROPY_IGNORE_INDEX, shift_labels
from tunekit.data.messages import ChosenRejectedToMessages, Message, UnpairedPreferenceToMessages
from tunekit.data.packing import greedy_pack
from tunekit.data.sources import HF_LOAD_KWARGS
from tunekit.modules.masks import block_causal_mask

logger = logging.getLogger(__name__)

IGNORE = CROSS_ENTROPY_IGNORE_INDEX

TokensLabels = tuple[Sequence[int], Sequence[int]]


# -- tokenization and truncation ----------------------------------------------------------------

class Completion(NamedTuple):
    """One prompt + completion sequence before its labels are computed.

    ``tokens``: list[int]; ``trained[k]``: token k is a target (a completion token the chat
    format trains on); ``prompt_len``: how many leading tokens are the prompt (>= 1).
    """

    tokens: list[int]
    trained: list[bool]
    prompt_len: int

    def labels(self) -> list[int]:
        """Shifted labels: ``labels[k] = tokens[k + 1]`` where that token is a target, else -100."""
        return shift_labels(self.tokens, [not t for t in self.trained])


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading elements ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def _tokenize(tokenizer, messages: list[Message], add_generation_prompt: bool = False
              ) -> tuple[list[int], list[bool]]:
    try:
        tokens, mask = tokenizer.tokenize_messages(messages, add_generation_prompt=add_generation_prompt)
    except UserError:
        raise
    except ValueError as e:  # the chat format rejects the conversation (e.g. a role it cannot show)
        raise DataError(f"tokenizer: {e}") from None
    limit = getattr(tokenizer, "max_seq_len", None)
    if limit is not None and len(tokens) >= limit:
        # The tokenizer cuts at the right, which would drop the completion's end before this
        # dataset could cut the prompt: a config problem, so not skippable as a bad row.
        raise UserError(f"a conversation reaches the tokenizer's max_seq_len={limit}, where the tokenizer "
                        "cuts it from the right; preference datasets cut the prompt first themselves: "
                        "build the tokenizer with max_seq_len=null and set the dataset's max_seq_len")
    return tokens, mask


def _trained_run_start(mask: Sequence[bool], skip: int) -> int:
    """Index where the run of trained tokens (``mask`` False) after the first ``skip`` runs
    starts; 0 when there is no such run."""
    runs = 0
    for k, masked in enumerate(mask):
        if not masked and (k == 0 or mask[k - 1]):
            if runs == skip:
                return k
            runs += 1
    return 0


def tokenize_completions(tokenizer, prompt: list[Message], completions: Sequence[list[Message]]
                         ) -> list[Completion]:
    """``prompt + completion`` for each completion, tokenized with the tokenizer's chat template.

    The prompt ends where the tokens of the prompt rendered with its generation prompt stop
    matching the whole conversation (normally all of them; templates that render the final turn
    differently, such as Qwen3's empty think block, match a little less, as TRL takes the common
    prefix too), and never before the completion's first trained token: the tokens of the
    completion's first assistant turn, after as many trained runs as the prompt has assistant
    turns (this keeps the prompt's assistant turns out of the targets when a template renders the
    prompt differently, e.g. Mistral v3 moves the system message to the last user turn). Raises
    DataError when a completion has no trained token.
    """
    prompt_tokens, _ = _tokenize(tokenizer, prompt, add_generation_prompt=True)
    prompt_turns = sum(m.get("role") == "assistant" for m in prompt)
    out = []
    for completion in completions:
        tokens, mask = _tokenize(tokenizer, prompt + completion)
        start = max(1, common_prefix_len(prompt_tokens, tokens),  # a target needs a position before it
                    _trained_run_start(mask, prompt_turns))
        if start >= len(tokens):
            raise DataError("the completion adds no tokens to the prompt")
        trained = [k >= start and not m for k, m in enumerate(mask)]
        if not any(trained):
            raise DataError("the chat format trains on none of the completion's tokens")
        out.append(Completion(tokens, trained, start))
    return out


def truncate(sequences: Sequence[Completion], max_seq_len: int | None, *, require_target: bool = True
             ) -> tuple[list[Completion], bool]:
    """Fit each sequence into ``max_seq_len`` tokens; returns (sequences, whether any was cut).

    All sequences lose the same number of prompt tokens from the left (what the longest needs,
    keeping at least one prompt token); a sequence still too long then loses its completion's end.
    """
    sequences = list(sequences)
    if max_seq_len is None:
        return sequences, False
    excess = max(len(s.tokens) for s in sequences) - max_seq_len
    if excess <= 0:
        return sequences, False
    out = []
    for s in sequences:
        cut = min(excess, s.prompt_len - 1)
        tokens, trained = s.tokens[cut:cut + max_seq_len], s.trained[cut:cut + max_seq_len]
        if require_target and not any(trained):
            raise DataError(f"no trained completion token is left after truncation to max_seq_len={max_seq_len}; "
                            "raise max_seq_len")
        out.append(Completion(tokens, trained, s.prompt_len - cut))
    return out, True


# -- the two layouts ------------------------------------------------------------------------------

def _as_list(x: Any) -> list[int]:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def shared_prefix_len(x_tokens: Sequence[int], y_tokens: Sequence[int], y_labels: Sequence[int]) -> int:
    """How many leading tokens the second sequence of a packed pair reads from the first one's
    segment instead of holding them itself.

    Those tokens must be the same in both sequences, carry no target of the second sequence (its
    segment starts at its first target position at the latest) and lie in the first segment
    (``x[:-1]``). 0 means the second sequence is a separate segment with its own prompt copy.
    """
    first_target = next((k for k, t in enumerate(y_labels) if t != IGNORE), len(y_labels) - 1)
    return max(0, min(common_prefix_len(x_tokens, y_tokens), first_target, len(x_tokens) - 1))


def collate_sequence_pairs(pairs: Sequence[tuple[TokensLabels, TokensLabels]], pad_id: int, *,
                           packed_len: int | None = None) -> dict[str, torch.Tensor]:
    """Batch the completions ``2i`` (``pairs[i][0]``) and ``2i + 1`` (``pairs[i][1]``), each given
    as (tokens, shifted labels) of its whole prompt + completion sequence.

    ``packed_len=None``: one sequence per row, right-padded: rows ``0..P-1`` hold the first
    sequences, rows ``P..2P-1`` the second ones. Returns tokens/labels/sequence_ids Long[2P, S]
    (S = the longest sequence) and num_pairs Long[] = P.

    ``packed_len=n``: each pair is one unit ``[x[:-1], y[s:-1]]`` (``s`` =
    :func:`shared_prefix_len`): y's segment starts at position ``s`` and attends to ``x[:s]`` and
    itself, so the tokens both share are computed once; units fill rows of up to ``n`` tokens in
    batch order (a longer unit gets a row of its own) and rows are right-padded to the fullest
    one, the padding being one more causal block. Returns tokens/labels/sequence_ids/input_pos
    Long[R, S], mask Bool[R, S, S] (True = may attend) and num_pairs. The last token of a sequence
    never has a target, hence ``[:-1]``.
    """
    num_pairs = torch.tensor(len(pairs), dtype=torch.long)
    if not pairs:
        raise ValueError("collate_sequence_pairs: empty batch")
    if packed_len is None:
        seqs = [x for x, _ in pairs] + [y for _, y in pairs]
        width = max(len(t) for t, _ in seqs)
        tokens = np.full((len(seqs), width), pad_id, dtype=np.int64)
        labels = np.full((len(seqs), width), IGNORE, dtype=np.int64)
        for r, (t, lab) in enumerate(seqs):
            tokens[r, :len(t)] = _as_list(t)
            labels[r, :len(lab)] = _as_list(lab)
        p = len(pairs)
        index = np.concatenate([2 * np.arange(p), 2 * np.arange(p) + 1])
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                "sequence_ids": torch.from_numpy(np.where(labels != IGNORE, index[:, None], -1)),
                "num_pairs": num_pairs}

    units = []
    for (xt, xl), (yt, yl) in pairs:
        xt, xl, yt, yl = _as_list(xt), _as_list(xl), _as_list(yt), _as_list(yl)
        s = shared_prefix_len(xt, yt, yl)
        units.append((xt[:-1], xl[:-1], s, yt[s:-1], yl[s:-1]))
    lengths = np.array([len(u[0]) + len(u[3]) for u in units], dtype=np.int64)
    row_of = greedy_pack(lengths, packed_len)
    n_rows = int(row_of[-1]) + 1
    width = max(1, int(np.bincount(row_of, weights=lengths, minlength=n_rows).max()))
    tokens = np.full((n_rows, width), pad_id, dtype=np.int64)
    labels = np.full((n_rows, width), IGNORE, dtype=np.int64)
    completion = np.full((n_rows, width), -1, dtype=np.int64)   # completion index of each position
    input_pos = np.zeros((n_rows, width), dtype=np.int64)
    unit_id = np.zeros((n_rows, width), dtype=np.int64)         # which unit (attention block)
    segment = np.zeros((n_rows, width), dtype=np.int8)          # 0 shared, 1 x only, 2 y
    used = np.zeros(n_rows, dtype=np.int64)
    units_in_row = np.zeros(n_rows, dtype=np.int64)
    for i, (at, al, s, bt, bl) in enumerate(units):
        r = int(row_of[i])
        o, na, nb = int(used[r]), len(at), len(bt)
        tokens[r, o:o + na], labels[r, o:o + na] = at, al
        tokens[r, o + na:o + na + nb], labels[r, o + na:o + na + nb] = bt, bl
        completion[r, o:o + na], completion[r, o + na:o + na + nb] = 2 * i, 2 * i + 1
        input_pos[r, o:o + na] = np.arange(na)
        input_pos[r, o + na:o + na + nb] = np.arange(s, s + nb)  # y continues from the shared tokens
        unit_id[r, o:o + na + nb] = units_in_row[r]
        segment[r, o + s:o + na] = 1
        segment[r, o + na:o + na + nb] = 2
        used[r] += na + nb
        units_in_row[r] += 1
    for r in range(n_rows):  # padding: one more causal block with its own positions, as SFT packing
        o = int(used[r])
        unit_id[r, o:] = units_in_row[r]
        input_pos[r, o:] = np.arange(width - o)
    seg = torch.from_numpy(segment)
    # Block-causal per unit, and y's segment never sees x's own tokens (nor x y's: y comes later).
    mask = block_causal_mask(torch.from_numpy(unit_id)) & ~((seg == 2)[:, :, None] & (seg == 1)[:, None, :])
    return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
            "sequence_ids": torch.from_numpy(np.where(labels != IGNORE, completion, -1)),
            "input_pos": torch.from_numpy(input_pos), "mask": mask, "num_pairs": num_pairs}


def preference_collate(batch: Sequence[Mapping[str, Any]], pad_id: int, *, packed_len: int | None = None
                       ) -> dict[str, torch.Tensor]:
    """Pairs ``{"chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels"}`` -> a
    preference batch: chosen of pair i = completion 2i, rejected = 2i + 1 (see
    :func:`collate_sequence_pairs`; unpacked: rows ``[:P]`` chosen, ``[P:]`` rejected)."""
    pairs = [((ex["chosen_tokens"], ex["chosen_labels"]), (ex["rejected_tokens"], ex["rejected_labels"]))
             for ex in batch]
    return collate_sequence_pairs(pairs, pad_id, packed_len=packed_len)


def kl_sequence(example: Mapping[str, Any], other: Mapping[str, Any], max_seq_len: int | None
                ) -> tuple[list[int], list[int]]:
    """KTO's mismatched sequence: ``example``'s prompt followed by ``other``'s completion, cut to
    ``max_seq_len`` like any sequence (it may keep no target; its log-prob sum is then 0).
    Returns (tokens, shifted labels)."""
    p, q = int(example["prompt_len"]), int(other["prompt_len"])
    other_tokens, other_labels = _as_list(other["tokens"]), _as_list(other["labels"])
    # Whether other's token k is a target is stored as the label of position k - 1.
    trained = [False] * p + [t != IGNORE for t in other_labels[q - 1:-1]]
    seq = Completion(_as_list(example["tokens"])[:p] + other_tokens[q:], trained, p)
    (seq,), _ = truncate([seq], max_seq_len, require_target=False)
    return seq.tokens, seq.labels()


def kto_collate(batch: Sequence[Mapping[str, Any]], pad_id: int, *, max_seq_len: int | None = None,
                packed_len: int | None = None) -> dict[str, torch.Tensor]:
    """KTO examples ``{"tokens", "labels", "prompt_len", "desirable"}`` -> a preference batch:
    completion 2i is example i's own sequence, 2i + 1 its KL sequence: the prompt of example i with
    the completion of example (i - 1) mod B, B = len(batch) (TRL's rotation of the completions by
    one within a batch: (x1, y_B), (x2, y1), ..., (x_B, y_{B-1})). A batch of one pairs an example
    with itself (TRL refuses per-device batch size 1 for that reason). Adds ``desirable`` Bool[B]."""
    n = len(batch)
    pairs = [((ex["tokens"], ex["labels"]), kl_sequence(ex, batch[(i - 1) % n], max_seq_len))
             for i, ex in enumerate(batch)]
    out = collate_sequence_pairs(pairs, pad_id, packed_len=packed_len)
    out["desirable"] = torch.tensor([bool(ex["desirable"]) for ex in batch], dtype=torch.bool)
    return out


# -- datasets -----------------------------------------------------------------------------------

def _check_lengths(max_seq_len: int | None, packed: bool) -> None:
    if max_seq_len is not None and max_seq_len < 2:
        raise UserError(f"max_seq_len={max_seq_len}: a preference sequence needs at least 2 tokens "
                        "(one prompt and one completion token)")
    if packed and max_seq_len is None:
        raise UserError("packed=True needs max_seq_len (the length of a packed row)")


class _TokenizedRows(torch.utils.data.Dataset):
    """Tokenizes every row once (``examples_of(row)`` -> list of examples, each a list of
    :class:`Completion` and an extra value); rows raising DataError are skipped when
    ``skip_bad_rows``. Sequences are kept as flat int32 token and label arrays with offsets
    (8 bytes per token), example ``i``'s sequence ``k`` being number ``i * per_example + k``."""

    def __init__(self, rows: Sequence, indices, tokenizer, examples_of: Callable, *,
                 max_seq_len: int | None, packed: bool, skip_bad_rows: bool, what: str):
        _check_lengths(max_seq_len, packed)
        self.rows, self.tokenizer = rows, tokenizer
        self.max_seq_len, self.packed = max_seq_len, packed
        self.skipped: list[str] = []
        self.num_truncated = 0
        # Example k of every row comes after the examples k-1 of all rows (KTO from paired rows:
        # all chosen completions, then all rejected ones). Each entry: (row, arrays, extra).
        slots: list[list[tuple[int, list[tuple[np.ndarray, np.ndarray, int]], Any]]] = []
        indices = np.arange(len(rows)) if indices is None else np.asarray(indices, dtype=np.int64)
        for j in indices.tolist():
            try:
                examples = [(*truncate(seqs, max_seq_len), extra) for seqs, extra in examples_of(rows[j])]
            except DataError as e:
                if not skip_bad_rows:
                    raise e.at(rows.where(j)) from None
                self.skipped.append(str(e.at(rows.where(j))))
                continue
            for k, (seqs, cut, extra) in enumerate(examples):
                while len(slots) <= k:
                    slots.append([])
                # Arrays right away: Python lists of every token would take ~4x the memory.
                arrays = [(np.asarray(s.tokens, np.int32), np.asarray(s.labels(), np.int32), s.prompt_len)
                          for s in seqs]
                slots[k].append((j, arrays, extra))
                self.num_truncated += cut
        self.num_skipped = len(self.skipped)
        log_skipped(self.skipped, rows)
        examples = [ex for slot in slots for ex in slot]
        if not examples:
            raise DataError(f"no {what} left ({self.num_skipped} bad row(s) skipped)",
                            where=getattr(rows, "name", None))
        self.row_index = np.array([j for j, _, _ in examples], dtype=np.int64)
        self._extra = [extra for _, _, extra in examples]
        self._per_example = len(examples[0][1])
        sequences = [seq for _, arrays, _ in examples for seq in arrays]
        self._tokens = np.concatenate([t for t, _, _ in sequences])
        self._labels = np.concatenate([lab for _, lab, _ in sequences])
        self._offsets = np.concatenate([[0], np.cumsum([len(t) for t, _, _ in sequences])]).astype(np.int64)
        self._prompt_lens = np.array([p for _, _, p in sequences], dtype=np.int64)
        if max_seq_len is not None:
            logger.info("%s: %d %s, %d cut to max_seq_len=%d (prompt from its left first, then the "
                        "completion's end)", getattr(rows, "name", "data"), len(examples), what,
                        self.num_truncated, max_seq_len)

    def __len__(self) -> int:
        return len(self.row_index)

    def where(self, i: int) -> str:
        """The file:line (or record) example ``i`` came from."""
        return self.rows.where(int(self.row_index[i]))

    def _sequence(self, i: int, k: int) -> tuple[list[int], list[int], int]:
        """(tokens, labels, prompt_len) of example ``i``'s sequence ``k``."""
        n = i * self._per_example + k
        a, b = int(self._offsets[n]), int(self._offsets[n + 1])
        return self._tokens[a:b].tolist(), self._labels[a:b].tolist(), int(self._prompt_lens[n])


class PreferenceDataset(_TokenizedRows):
    """Tokenized preference pairs:
    ``dataset[i] = {"chosen_tokens", "chosen_labels", "rejected_tokens", "rejected_labels"}``
    (list[int]; labels shifted, -100 except where the next token is a trained completion token).

    ``transform(row) -> (prompt, chosen completion, rejected completion)`` messages, e.g.
    ``ChosenRejectedToMessages(column_map).split``. ``num_truncated`` counts the pairs cut to
    ``max_seq_len``, ``num_skipped`` / ``skipped`` the bad rows dropped with ``skip_bad_rows``.
    :meth:`collate` builds the unpacked or, with ``packed=True``, the packed shared-prompt layout.
    """

    def __init__(self, rows: Sequence, transform: Callable, tokenizer, *, max_seq_len: int | None = None,
                 packed: bool = False, indices=None, skip_bad_rows: bool = False):
        def examples_of(row):
            prompt, chosen, rejected = transform(row)
            return [(tokenize_completions(tokenizer, prompt, [chosen, rejected]), None)]

        super().__init__(rows, indices, tokenizer, examples_of, max_seq_len=max_seq_len, packed=packed,
                         skip_bad_rows=skip_bad_rows, what="pairs")

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        if i < 0:
            i += len(self)
        chosen_tokens, chosen_labels, _ = self._sequence(i, 0)
        rejected_tokens, rejected_labels, _ = self._sequence(i, 1)
        return {"chosen_tokens": chosen_tokens, "chosen_labels": chosen_labels,
                "rejected_tokens": rejected_tokens, "rejected_labels": rejected_labels}

    def collate(self, batch: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """A preference batch (see :func:`preference_collate`); packed rows hold up to
        ``max_seq_len`` tokens when ``packed``."""
        return preference_collate(batch, self.tokenizer.pad_id,
                                  packed_len=self.max_seq_len if self.packed else None)


class KTODataset(_TokenizedRows):
    """Tokenized unpaired examples: ``dataset[i] = {"tokens", "labels", "prompt_len", "desirable"}``
    (``tokens[:prompt_len]`` is the prompt; labels shifted, -100 except on completion targets).

    ``transform(row) -> [(prompt, completion, desirable), ...]`` (one example per unpaired row,
    two for a paired row); the k-th examples of all rows come after the (k-1)-th ones. The KL
    sequences are built per batch by :meth:`collate` (:func:`kto_collate`).
    """

    def __init__(self, rows: Sequence, transform: Callable, tokenizer, *, max_seq_len: int | None = None,
                 packed: bool = False, indices=None, skip_bad_rows: bool = False):
        def examples_of(row):
            return [(tokenize_completions(tokenizer, prompt, [completion]), bool(desirable))
                    for prompt, completion, desirable in transform(row)]

        super().__init__(rows, indices, tokenizer, examples_of, max_seq_len=max_seq_len, packed=packed,
                         skip_bad_rows=skip_bad_rows, what="examples")

    @property
    def num_desirable(self) -> int:
        return sum(self._extra)

    @property
    def num_undesirable(self) -> int:
        return len(self) - self.num_desirable

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += len(self)
        tokens, labels, prompt_len = self._sequence(i, 0)
        return {"tokens": tokens, "labels": labels, "prompt_len": prompt_len, "desirable": self._extra[i]}

    def collate(self, batch: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """A KTO preference batch (see :func:`kto_collate`)."""
        return kto_collate(batch, self.tokenizer.pad_id, max_seq_len=self.max_seq_len,
                           packed_len=self.max_seq_len if self.packed else None)


# -- builders -------------------------------------------------------------------------------------

class _Unpaired:
    """Unpaired rows as one KTO example each."""

    def __init__(self, column_map: Mapping[str, str] | None):
        self.transform = UnpairedPreferenceToMessages(column_map)

    def __call__(self, row: Mapping[str, Any]) -> list[tuple[list[Message], list[Message], bool]]:
        return [self.transform(row)]


class _Unpair:
    """Paired rows as two KTO examples (chosen desirable, rejected undesirable), as TRL's
    ``unpair_preference_dataset``."""

    def __init__(self, column_map: Mapping[str, str] | None):
        self.split = ChosenRejectedToMessages(column_map).split

    def __call__(self, row: Mapping[str, Any]) -> list[tuple[list[Message], list[Message], bool]]:
        prompt, chosen, rejected = self.split(row)
        return [(prompt, chosen, True), (prompt, rejected, False)]


@config_kwargs(*HF_LOAD_KWARGS)
def preference_dataset(tokenizer, source, *, column_map: Mapping[str, str] | None = None,
                       max_seq_len: int | None = None, packed: bool = False, split: str = "train",
                       val_fraction: float = 0.0, seed: int = 0, skip_bad_rows: bool = False,
                       **hf_kwargs) -> PreferenceDataset:
    """Chosen/rejected pairs for DPO-family losses: standard (``prompt``/``chosen``/``rejected``
    strings), conversational (message lists, explicit ``prompt`` optional) or implicit prompt (two
    whole conversations sharing their first messages); see ``ChosenRejectedToMessages``.
    ``packed=True`` lays pairs out with a shared prompt, several per row of ``max_seq_len``."""
    rows, indices = _open(source, split, val_fraction, seed, "file", hf_kwargs)
    return PreferenceDataset(rows, ChosenRejectedToMessages(column_map).split, tokenizer,
                             max_seq_len=max_seq_len, packed=packed, indices=indices,
                             skip_bad_rows=skip_bad_rows)


@config_kwargs(*HF_LOAD_KWARGS)
def kto_dataset(tokenizer, source, *, column_map: Mapping[str, str] | None = None,
                max_seq_len: int | None = None, packed: bool = False, split: str = "train",
                val_fraction: float = 0.0, seed: int = 0, skip_bad_rows: bool = False,
                **hf_kwargs) -> KTODataset:
    """Unpaired examples for KTO: ``prompt``, ``completion`` (strings or messages), ``label``
    (true = desirable). Paired files (``chosen``/``rejected`` columns and no ``completion``) are
    unpaired as TRL does: every chosen completion a desirable example, then every rejected one an
    undesirable example. ``packed=True``: each example shares its prompt with its KL sequence."""
    rows, indices = _open(source, split, val_fraction, seed, "file", hf_kwargs)
    cm = dict(column_map or {})
    first = {}
    for j in indices.tolist():  # the format is told by the first row that parses
        try:
            first = rows[j]
            break
        except DataError:
            if not skip_bad_rows:
                raise
    paired = (cm.get("chosen", "chosen") in first and cm.get("rejected", "rejected") in first
              and cm.get("completion", "completion") not in first)
    transform = _Unpair(cm) if paired else _Unpaired(cm)
    return KTODataset(rows, transform, tokenizer, max_seq_len=max_seq_len, packed=packed, indices=indices,
                      skip_bad_rows=skip_bad_rows)
