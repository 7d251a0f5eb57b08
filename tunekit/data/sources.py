"""Rows from files on disk (JSONL, JSON, CSV, plain text) or, through ``datasets``, parquet and the hub.

A *row source* is a sequence of dicts with random access (``len``, ``source[i]``) plus
``where(i) -> str`` naming the row for error messages (``train.jsonl:17``).

JSONL files are never loaded whole: the first pass records the byte offset of every line (a
vectorised newline scan, ~1 GB/s) and rows are parsed on access from a memory map, so a
multi-gigabyte file costs 8 bytes per row of RAM and shuffled access still works.
"""

from __future__ import annotations

import csv
import itertools
import json
import mmap
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tunekit.config.errors import MissingPackageError, UserError
from tunekit.data.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".txt", ".parquet")
HF_INSTALL_HINT = 'pip install "tunekit[hf]"'


class JsonlRows(Sequence):
    """Lazily parsed JSONL file: one JSON object per line; blank lines are ignored."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.name = str(path)
        self._mm = None
        starts, ends = _line_spans(self.path)
        keep = ends - starts > 0
        # Line numbers are 1-based positions among all lines, kept so errors point at the file.
        self._line_numbers = np.flatnonzero(keep).astype(np.int64) + 1
        self._starts, self._ends = starts[keep], ends[keep]

    def __len__(self) -> int:
        return len(self._starts)

    def _map(self):
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += len(self)
        raw = self._map()[int(self._starts[i]):int(self._ends[i])]
        try:
            row = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            detail = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
            raise DataError(f"malformed JSON: {detail}", where=self.where(i)) from None
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object per line, got {type(row).__name__}",
                            where=self.where(i))
        return row

    def where(self, i: int) -> str:
        return f"{self.name}:{int(self._line_numbers[i])}"

    def __getstate__(self):  # memory maps do not pickle; DataLoader workers reopen the file
        state = self.__dict__.copy()
        state["_mm"] = None
        return state


def _line_spans(path: Path, chunk_bytes: int = 1 << 24) -> tuple[np.ndarray, np.ndarray]:
    """Byte spans ``[start, end)`` of every line (without its ``\\n``); blank lines get empty spans."""
    newlines = []
    size = path.stat().st_size
    with open(path, "rb") as f:
        offset = 0
        while chunk := f.read(chunk_bytes):
            newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + offset)
            offset += len(chunk)
    nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [size]]).astype(np.int64)
    if len(starts) and starts[-1] >= size:  # trailing newline: no last line
        starts, ends = starts[:-1], ends[:-1]
    # Blank lines (whitespace only) are skipped; only lines that are empty or start with
    # whitespace can be blank, so just those are read back.
    first = np.full(len(starts), 32, np.uint8)
    nonempty = np.flatnonzero(ends > starts)
    if len(nonempty):
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            first[nonempty] = np.frombuffer(mm, np.uint8)[starts[nonempty]]
    maybe_blank = np.flatnonzero(np.isin(first, np.frombuffer(b" \t\r\x0b\x0c", np.uint8)))
    if len(maybe_blank):
        with open(path, "rb") as f:
            for k in maybe_blank:
                f.seek(int(starts[k]))
                if not f.read(int(ends[k] - starts[k])).strip():
                    ends[k] = starts[k]
    return starts, ends


class ListRows(Sequence):
    """Rows already in memory (JSON lists, CSV, text files, Python lists)."""

    def __init__(self, rows: list[dict[str, Any]], name: str, wheres: list[str] | None = None):
        self.rows, self.name, self._wheres = rows, name, wheres

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = self.rows[i]
        if not isinstance(row, Mapping):
            raise DataError(f"expected an object, got {type(row).__name__}", where=self.where(i))
        return row

    def where(self, i: int) -> str:
        if i < 0:
            i += len(self)
        return self._wheres[i] if self._wheres is not None else f"{self.name} record {i + 1}"


class HFRows(Sequence):
    """A ``datasets.Dataset`` (parquet files or the hub)."""

    def __init__(self, dataset, name: str):
        self.dataset, self.name = dataset, name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.dataset[int(i)]

    def where(self, i: int) -> str:
        return f"{self.name} row {i}"


class ConcatRows(Sequence):
    """Several row sources read one after the other."""

    def __init__(self, parts: list[Sequence]):
        self.parts = parts
        self._offsets = np.cumsum([0] + [len(p) for p in parts])
        self.name = ", ".join(p.name for p in parts)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _locate(self, i: int) -> tuple[Sequence, int]:
        if i < 0:
            i += len(self)
        k = int(np.searchsorted(self._offsets, i, side="right")) - 1
        return self.parts[k], i - int(self._offsets[k])

    def __getitem__(self, i: int) -> dict[str, Any]:
        part, j = self._locate(i)
        return part[j]

    def where(self, i: int) -> str:
        part, j = self._locate(i)
        return part.where(j)


def read_json_list(path: Path) -> ListRows:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}",
                        where=str(path)) from None
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of objects, got {type(data).__name__}; "
                        "use .jsonl for one object per line", where=str(path))
    return ListRows(data, str(path))


def read_csv(path: Path) -> ListRows:
    rows, wheres = [], []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        start = 2  # the header is line 1
        for row in reader:
            if None in row:
                raise DataError(f"{len(row[None])} more value(s) than header columns",
                                where=f"{path}:{start}")
            missing = [k for k, v in row.items() if v is None]
            if missing:
                raise DataError("fewer values than header columns", where=f"{path}:{start}",
                                field=missing[0])
            rows.append(row)
            wheres.append(f"{path}:{start}")
            start = reader.line_num + 1
    return ListRows(rows, str(path), wheres)


def read_text(path: Path, text_split: str) -> ListRows:
    """``text_split="file"``: the whole file is one document; ``"paragraph"``: blank-line separated
    blocks are documents."""
    text = path.read_text(encoding="utf-8")
    if text_split == "file":
        return ListRows([{"text": text}] if text.strip() else [], str(path))
    if text_split != "paragraph":
        raise ValueError(f"text_split must be 'file' or 'paragraph', got {text_split!r}")
    rows, wheres, block, first = [], [], [], 0
    for n, line in enumerate(text.splitlines() + [""], start=1):
        if line.strip():
            if not block:
                first = n
            block.append(line)
        elif block:
            rows.append({"text": "\n".join(block)})
            wheres.append(f"{path}:{first}")
            block = []
    return ListRows(rows, str(path), wheres)


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _load_from_disk(path: Path, hf_split: str) -> HFRows:
    datasets = _require_datasets(f"reading the saved dataset {path}")
    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if hf_split not in data:
            raise DataError(f"hf_split {hf_split!r} is not a split of this saved DatasetDict (splits: "
                            f"{', '.join(data)}); set the dataset's hf_split", where=str(path))
        data = data[hf_split]
    return HFRows(data, str(path))


def _require_datasets(what: str):
    try:
        import datasets  # noqa: F401  (optional dependency, imported only when needed)
    except ImportError:
        raise MissingPackageError(f"{what} needs the optional 'datasets' package: {HF_INSTALL_HINT}") from None
    return datasets


class HFStream:
    """Rows of a ``datasets.IterableDataset`` (``streaming: true``): read in order as they arrive,
    never downloaded or held whole. ``rows(skip=k)`` starts at row ``k`` (the rows before it are
    read and discarded: a resumed stream costs a re-read, not a re-tokenization)."""

    def __init__(self, dataset, name: str):
        self.dataset, self.name = dataset, name

    def rows(self, *, skip: int = 0, shuffle_buffer: int = 0, seed: int = 0) -> Iterator[dict[str, Any]]:
        """The rows from row ``skip`` on; ``shuffle_buffer > 0``: in ``datasets``' buffered shuffle
        order for ``seed`` (the same order for the same seed)."""
        data = self.dataset.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer else self.dataset
        return itertools.islice(iter(data), skip, None)

    def where(self, k: int) -> str:
        return f"{self.name} row {k}"


# datasets' builder for each local file type it can stream
_STREAM_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text", ".parquet": "parquet"}


def open_stream(source: str | os.PathLike | Sequence, *, hf_split: str = "train", **hf_kwargs) -> HFStream:
    """``source`` as a stream through ``datasets.load_dataset(..., streaming=True)``: local files
    (a file, a directory of them or a list; one file type) or a hub dataset name (``hf_split`` and
    ``hf_kwargs`` as for :func:`load_rows`, e.g. ``open_stream("json", data_files="big/*.jsonl")``)."""
    datasets = _require_datasets("streaming: true")
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in _STREAM_BUILDERS)
        elif path.is_file():
            files.append(path)
    if not files:
        if len(items) != 1 or Path(str(items[0])).suffix.lower() in LOCAL_SUFFIXES:
            raise DataError("file not found (or no .jsonl/.json/.csv/.txt/.parquet files)", where=str(source))
        data = datasets.load_dataset(str(items[0]), split=hf_split, streaming=True, **hf_kwargs)
        return HFStream(data, str(items[0]))
    builders = {_STREAM_BUILDERS.get(p.suffix.lower()) for p in files}
    if None in builders or len(builders) > 1:
        raise DataError(f"streaming reads one file type at a time through datasets ({', '.join(_STREAM_BUILDERS)}); "
                        f"got {', '.join(sorted({p.suffix for p in files}))}", where=str(source))
    data = datasets.load_dataset(builders.pop(), data_files=[str(p) for p in files], split="train", streaming=True,
                                 **hf_kwargs)
    return HFStream(data, ", ".join(str(p) for p in files))


# The keywords of datasets.load_dataset that dataset builders pass through from a config (their
# **hf_kwargs): declared so that a misspelled builder argument is reported, not swallowed.
HF_LOAD_KWARGS = ("hf_split", "name", "data_dir", "data_files", "revision", "cache_dir", "token",
                  "trust_remote_code", "num_proc", "verification_mode", "keep_in_memory")


def load_rows(source: str | os.PathLike | Sequence | Mapping, *, text_split: str = "file",
              hf_split: str = "train", **hf_kwargs) -> Sequence:
    """Open ``source`` as a row source.

    ``source`` is a file (``.jsonl``, ``.json``, ``.csv``, ``.txt``, ``.parquet``), a directory (its
    files with those suffixes, sorted), a list of those, an in-memory list of dicts, or a Hugging Face
    hub dataset name (needs ``datasets``; ``hf_split`` and ``hf_kwargs`` go to ``load_dataset``, e.g.
    ``load_rows("json", data_files="big/*.jsonl")``). Extra keywords for local files are an error.
    """
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("empty source list: give at least one file, directory or row")
        if all(isinstance(r, Mapping) for r in source):
            return ListRows(list(source), "<rows>")
        parts = [load_rows(s, text_split=text_split, hf_split=hf_split, **hf_kwargs) for s in source]
        return parts[0] if len(parts) == 1 else ConcatRows(parts)
    path = Path(source)
    if path.is_dir() and _is_saved_dataset(path):
        return _load_from_disk(path, hf_split)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DataError(f"no {'/'.join(LOCAL_SUFFIXES)} files in the directory", where=str(path))
        return load_rows(files, text_split=text_split, **hf_kwargs)
    if path.is_file():
        suffix = path.suffix.lower()
        if hf_kwargs and suffix != ".parquet":
            raise DataError(f"argument(s) {', '.join(hf_kwargs)} apply to Hugging Face hub datasets only "
                            "(datasets.load_dataset); remove them for a local file", where=str(path))
        if suffix == ".jsonl":
            return JsonlRows(path)
        if suffix == ".json":
            return read_json_list(path)
        if suffix == ".csv":
            return read_csv(path)
        if suffix == ".txt":
            return read_text(path, text_split)
        if suffix == ".parquet":
            datasets = _require_datasets(f"reading {path}")
            return HFRows(datasets.load_dataset("parquet", data_files=str(path), split="train", **hf_kwargs),
                          str(path))
        raise DataError(f"unsupported file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}",
                        where=str(path))
    text = str(source)
    if path.suffix.lower() in LOCAL_SUFFIXES or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise DataError("file not found", where=text)
    datasets = _require_datasets(f"{str(source)!r} is not a local file; loading it from the Hugging Face hub")
    try:
        return HFRows(datasets.load_dataset(str(source), split=hf_split, **hf_kwargs), str(source))
    except (ConnectionError, FileNotFoundError) as e:  # hub unreachable / offline, or no such dataset
        raise UserError(f"{str(source)!r} is not a local file and could not be loaded from the Hugging Face "
                        f"hub ({e}); check the name and the network (HF_HUB_OFFLINE, HF_TOKEN), or point "
                        "source at downloaded files") from None
