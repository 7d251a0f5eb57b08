"""Data at scale: parquet and saved `datasets` through the hf extra, streaming into packing
(deterministic, resumable, disjoint rank shares), weighted mixing, and up-front row validation."""

import json
import logging
import random

import pytest
import torch
from fake_tokenizer import ByteTokenizer

from tunekit.data import DataError, chat_dataset, text_completion_dataset
from tunekit.data.sources import load_rows

datasets = pytest.importorskip("datasets")
pq = pytest.importorskip("pyarrow.parquet")
import pyarrow as pa

TOK = ByteTokenizer()
S = 64  # packed row length


def random_chats(n, seed=0):
    rng = random.Random(seed)
    text = lambda k: " ".join("".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 4))) for _ in range(k))
    return [{"messages": [{"role": "user", "content": text(rng.randint(1, 5))},
                          {"role": "assistant", "content": text(rng.randint(1, 25))}]} for _ in range(n)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows_of(ds):
    return [(ds[i]["tokens"].tolist(), ds[i]["labels"].tolist(), ds[i]["seq_lens"].tolist()) for i in range(len(ds))]


def rows_of_stream(items):
    return [(r["tokens"].tolist(), r["labels"].tolist(), r["seq_lens"].tolist()) for r in items]


# -- parquet and save_to_disk through our sources ------------------------------------------------

def test_parquet_file_loads_through_load_rows_and_a_dataset(tmp_path):
    rows = random_chats(7)
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    source = load_rows(path)
    assert len(source) == 7 and source[3] == rows[3] and source.where(3) == f"{path} row 3"
    from_parquet = chat_dataset(TOK, path)
    from_jsonl = chat_dataset(TOK, write_jsonl(tmp_path / "chat.jsonl", rows))
    assert [from_parquet[i] for i in range(7)] == [from_jsonl[i] for i in range(7)]


def test_saved_dataset_and_dataset_dict_load_from_disk(tmp_path):
    rows = random_chats(6)
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "one")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                          "test": datasets.Dataset.from_list(rows[4:])}).save_to_disk(tmp_path / "two")
    assert [load_rows(tmp_path / "one")[i] for i in range(6)] == rows
    assert len(load_rows(tmp_path / "two")) == 4
    test = chat_dataset(TOK, tmp_path / "two", hf_split="test")
    assert len(test) == 2 and test[1] == chat_dataset(TOK, rows[5:])[0]
    with pytest.raises(DataError, match="hf_split 'validation' is not a split .*splits: train, test"):
        load_rows(tmp_path / "two", hf_split="validation")
    packed = chat_dataset(TOK, tmp_path / "one", packed=True, max_seq_len=S)
    assert packed.num_documents == 6


# -- streaming ----------------------------------------------------------------------------------

@pytest.fixture
def chat_file(tmp_path):
    return write_jsonl(tmp_path / "chat.jsonl", random_chats(40))


@pytest.mark.parametrize("long_examples", ["truncate", "split"])
def test_stream_packs_exactly_like_the_packed_dataset(chat_file, tmp_path, long_examples):
    s = 24 if long_examples == "split" else S  # some documents longer than a row
    packed = chat_dataset(TOK, chat_file, packed=True, max_seq_len=s, long_examples=long_examples)
    stream = chat_dataset(TOK, chat_file, packed=True, max_seq_len=s, long_examples=long_examples, streaming=True)
    assert isinstance(stream, torch.utils.data.IterableDataset)
    assert rows_of_stream(stream) == rows_of(packed)
    assert rows_of_stream(stream) == rows_of(packed)  # a second pass: the same epoch again
    # parquet streams the same way
    pq.write_table(pa.Table.from_pylist([json.loads(line) for line in chat_file.read_text().splitlines()]),
                   tmp_path / "chat.parquet")
    from_parquet = chat_dataset(TOK, tmp_path / "chat.parquet", packed=True, max_seq_len=s,
                                long_examples=long_examples, streaming=True)
    assert rows_of_stream(from_parquet) == rows_of(packed)


def test_stream_rank_shares_are_disjoint_complete_and_equal(chat_file):
    packed = rows_of(chat_dataset(TOK, chat_file, packed=True, max_seq_len=S))
    world = 3
    assert len(packed) % world  # the last round needs completing
    shares = []
    for rank in range(world):
        ds = chat_dataset(TOK, chat_file, packed=True, max_seq_len=S, streaming=True)
        ds.shard(rank=rank, world_size=world)
        shares.append(rows_of_stream(ds))
    assert len({len(s) for s in shares}) == 1  # every rank takes the same number of steps
    interleaved = [shares[g % world][g // world] for g in range(len(packed))]
    assert interleaved == packed  # disjoint shares covering every packed row once
    padding = [shares[r][-1] for r in range(len(packed) % world, world)]
    assert padding == packed[:len(padding)]  # the last round is completed from the epoch's start


def loop_rows(loader, sampler, *, steps, accumulation, step=0, epoch=0):
    """(step, epoch, consumed, rows) of training_steps over a streaming loader."""
    from tunekit.training.train_step import training_steps

    out = []
    for s, e, consumed, batches in training_steps(loader, sampler, gradient_accumulation_steps=accumulation,
                                                  step=step, epoch=epoch, total_steps=steps):
        rows = [t for b in batches for t in b["tokens"].tolist()]
        out.append((s, e, consumed, rows, sampler.state_dict(consumed=consumed)))
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_stream_resume_continues_with_the_same_rows(tmp_path, world):
    from tunekit.training.data_loaders import (
        batches_per_epoch,
        count_training_steps,
        training_loader,
    )

    small = write_jsonl(tmp_path / "small.jsonl", random_chats(14))

    def make(rank):
        ds = chat_dataset(TOK, small, packed=True, max_seq_len=S, long_examples="split", streaming=True)
        return training_loader(ds, batch_size=2, shuffle=False, seed=0, num_workers=0, rank=rank, world_size=world)

    loader, sampler = make(0)
    assert batches_per_epoch(loader) is None
    with pytest.raises(Exception, match="max_steps"):
        count_training_steps(None, gradient_accumulation_steps=2, epochs=1, max_steps=None)
    assert count_training_steps(None, gradient_accumulation_steps=2, epochs=1, max_steps=9) == (None, 9)
    for rank in range(world):
        full = loop_rows(*make(rank), steps=9, accumulation=2)
        epochs = [e for _, e, *_ in full]
        assert len(set(epochs)) >= 3  # crosses epoch ends (the stream is read again)
        for stop in range(1, 9):  # every step: mid-epoch, an epoch's (short) last step, ...
            _, epoch, _, _, state = full[stop - 1]
            loader, sampler = make(rank)
            sampler.load_state_dict(json.loads(json.dumps(state)))  # as stored in a checkpoint
            resumed = loop_rows(loader, sampler, steps=9, accumulation=2, step=stop, epoch=epoch)
            assert [r[:4] for r in resumed] == [r[:4] for r in full[stop:]]


def test_stream_shuffle_buffer_is_seeded_and_bad_rows(tmp_path, chat_file, caplog):
    def order(seed, epoch):
        ds = chat_dataset(TOK, chat_file, packed=True, max_seq_len=S, streaming=True, shuffle_buffer=16)
        ds.shard(shuffle=True, seed=seed)
        ds.set_epoch(epoch)
        return rows_of_stream(ds)

    assert order(0, 0) == order(0, 0) != order(0, 1)
    in_order = rows_of(chat_dataset(TOK, chat_file, packed=True, max_seq_len=S))
    assert order(0, 0) != in_order  # shuffled ...
    tokens = lambda rows: sorted(t for r in rows for t in r[0])
    assert tokens(order(0, 0)) == tokens(in_order)  # ... the same documents
    bad = write_jsonl(tmp_path / "bad.jsonl", random_chats(3) + [{"messages": []}] + random_chats(2, seed=1))
    with pytest.raises(DataError, match=r"bad.jsonl row 3"):
        list(chat_dataset(TOK, bad, packed=True, max_seq_len=S, streaming=True))
    with caplog.at_level(logging.WARNING):
        ds = chat_dataset(TOK, bad, packed=True, max_seq_len=S, streaming=True, skip_bad_rows=True)
        got = rows_of_stream(ds)
    assert ds.num_skipped == 1 and "skipped bad row" in caplog.text
    good = random_chats(3) + random_chats(2, seed=1)
    assert got == rows_of(chat_dataset(TOK, good, packed=True, max_seq_len=S))


def test_stream_config_mistakes_are_user_errors(chat_file):
    from tunekit.config.errors import UserError

    with pytest.raises(UserError, match="packed: true and max_seq_len"):
        chat_dataset(TOK, chat_file, streaming=True)
    with pytest.raises(UserError, match="val_fraction"):
        chat_dataset(TOK, chat_file, packed=True, max_seq_len=S, streaming=True, val_fraction=0.1)
    with pytest.raises(UserError, match="shuffle_buffer applies to streaming"):
        chat_dataset(TOK, chat_file, shuffle_buffer=8)
    with pytest.raises(DataError, match="file not found"):
        text_completion_dataset(TOK, "missing/file.jsonl", packed=True, max_seq_len=S, streaming=True)
