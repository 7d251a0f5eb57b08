"""Data at scale: parquet and saved `datasets` through the hf extra, streaming into packing
(deterministic, resumable, disjoint rank shares), weighted mixing, and up-front row validation."""

import json
import logging
import random

import numpy as np
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


# -- weighted mixing ----------------------------------------------------------------------------

def mix_config(tmp_path, weights=(3, 1), num_examples=None, seed=0):
    from omegaconf import OmegaConf

    a = write_jsonl(tmp_path / "a.jsonl", random_chats(10, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"doc {i}"} for i in range(30)])
    return OmegaConf.create({"dataset": {
        "_component_": "tunekit.data.mix_datasets", "seed": seed, "num_examples": num_examples,
        "datasets": [{"weight": weights[0], "dataset": {"_component_": "tunekit.data.chat_dataset", "source": str(a)}},
                     {"weight": weights[1], "dataset": {"_component_": "tunekit.data.text_completion_dataset",
                                                        "source": str(b)}}]}})


def test_mix_proportions_and_determinism_from_a_config(tmp_path):
    from tunekit.config import instantiate, validate
    from tunekit.data.mixing import mixture_counts

    cfg = mix_config(tmp_path, num_examples=100)
    validate(cfg)  # the nested dataset components are checked like any other
    mixed = instantiate(cfg.dataset, TOK)
    assert len(mixed) == 100
    sources = [mixed.source_of(j) for j in range(100)]
    assert sum(k == 0 for k, _ in sources) == 75 and sum(k == 1 for k, _ in sources) == 25  # 3:1
    # dataset 0 (10 rows) is upsampled: every row 7 or 8 times; dataset 1 (30 rows) downsampled: 25 distinct
    counts0 = np.bincount([i for k, i in sources if k == 0], minlength=10)
    assert counts0.min() >= 7 and counts0.max() <= 8
    assert len({i for k, i in sources if k == 1}) == 25
    again = instantiate(mix_config(tmp_path, num_examples=100).dataset, TOK)
    assert [again.source_of(j) for j in range(100)] == sources  # the same plan from the same seed
    other = instantiate(mix_config(tmp_path, num_examples=100, seed=1).dataset, TOK)
    assert [other.source_of(j) for j in range(100)] != sources
    # the default epoch: the sum of the sizes (40), split 30:10
    default = instantiate(mix_config(tmp_path).dataset, TOK)
    assert len(default) == 40 and sum(default.source_of(j)[0] == 0 for j in range(40)) == 30
    assert list(mixture_counts([1, 1, 1], 10)) == [4, 3, 3]
    assert default[0] == default.parts[default.source_of(0)[0]][default.source_of(0)[1]]
    batch = default.collate([default[j] for j in range(4)])  # both parts batch alike (unpacked)
    assert batch["tokens"].shape[0] == 4


def test_mix_resumes_exactly_with_the_sampler(tmp_path):
    from tunekit.config import instantiate
    from tunekit.training.data_loaders import training_loader

    def run(state=None, steps=7, step=0, epoch=0):
        from tunekit.training.train_step import training_steps

        mixed = instantiate(mix_config(tmp_path, num_examples=20).dataset, TOK)
        loader, sampler = training_loader(mixed, batch_size=3, shuffle=True, seed=5, num_workers=0)
        if state is not None:
            sampler.load_state_dict(state)
        return [(s, e, c, [t for b in mb for t in b["tokens"].tolist()], sampler.state_dict(consumed=c))
                for s, e, c, mb in training_steps(loader, sampler, gradient_accumulation_steps=2, step=step,
                                                  epoch=epoch, total_steps=steps)]

    full = run()
    assert {e for _, e, *_ in full} == {0, 1}  # 20 examples / batch 3 = 7 micro-batches: 4 steps per epoch
    for stop in range(1, 7):
        _, epoch, _, _, state = full[stop - 1]
        assert [r[:4] for r in run(state, step=stop, epoch=epoch)] == [r[:4] for r in full[stop:]]


def test_mix_rejects_datasets_that_batch_differently(tmp_path):
    from tunekit.config.errors import UserError
    from tunekit.data import mix_datasets

    a = write_jsonl(tmp_path / "a.jsonl", random_chats(5))
    with pytest.raises(UserError, match="batch alike"):
        mix_datasets(TOK, [{"weight": 1, "dataset": chat_dataset(TOK, a)},
                           {"weight": 1, "dataset": chat_dataset(TOK, a, packed=True, max_seq_len=S)}])
    with pytest.raises(UserError, match="weight must be a number > 0"):
        mix_datasets(TOK, [{"weight": 0, "dataset": chat_dataset(TOK, a)}])
    with pytest.raises(UserError, match=r"datasets\[0\] must be \{weight"):
        mix_datasets(TOK, [{"source": str(a), "weight": 1}])


# -- every example once per epoch, the short accumulation step included -------------------------

def test_every_example_once_per_epoch_with_a_short_last_step():
    from tunekit.training.data_loaders import count_training_steps, training_loader
    from tunekit.training.train_step import training_steps

    class Numbers(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return i

        def collate(self, batch):
            return {"tokens": torch.tensor(batch)}

    loader, sampler = training_loader(Numbers(), batch_size=2, shuffle=True, seed=0, num_workers=0)
    per_epoch, total = count_training_steps(len(loader), gradient_accumulation_steps=2, epochs=3, max_steps=None)
    assert (per_epoch, total) == (3, 9)  # 5 micro-batches: steps of 2, 2 and 1
    seen = {}
    for step, epoch, consumed, batches in training_steps(loader, sampler, gradient_accumulation_steps=2, step=0,
                                                         epoch=0, total_steps=total):
        seen.setdefault(epoch, []).extend(t for b in batches for t in b["tokens"].tolist())
    assert {e: sorted(v) for e, v in seen.items()} == {e: list(range(10)) for e in range(3)}
    assert consumed == 10
