"""Datasets built from files with a byte-level fake tokenizer: labels, masking, errors, collate."""

import json
import logging

import pytest
import torch
from fake_tokenizer import ByteTokenizer

import tunekit.config

from tunekit.data import (
    CROSS_ENTROPY_IGNORE_INDEX,
    DataError,
    chat_dataset,
    instruct_dataset,
    preference_dataset,
    text_completion_dataset,
)

IGNORE = CROSS_ENTROPY_IGNORE_INDEX
TOK = ByteTokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(user, answer):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def test_ignore_index_value():
    assert IGNORE == -100


def test_labels_are_shifted_and_prompt_masked(tmp_path):
    ds = chat_dataset(TOK, write_jsonl(tmp_path / "c.jsonl", [chat("hi", "yo")]))
    ex = ds[0]
    # <bos> <user> h i <eot> <assistant> y o <eot>
    assert ex["tokens"] == [256, 260, 104, 105, 263, 261, 121, 111, 263]
    # position k predicts token k+1; only assistant content and its <eot> are targets.
    assert ex["labels"] == [IGNORE] * 5 + [121, 111, 263, IGNORE]


def test_train_on_input_trains_every_next_token(tmp_path):
    ds = chat_dataset(TOK, write_jsonl(tmp_path / "c.jsonl", [chat("hi", "yo")]), train_on_input=True)
    ex = ds[0]
    assert ex["labels"] == ex["tokens"][1:] + [IGNORE]


def test_alpaca_learns_only_the_response(tmp_path):
    ds = instruct_dataset(TOK, write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "1 2", "output": "3"}]))
    ex = ds[0]
    targets = [t for t in ex["labels"] if t != IGNORE]
    assert targets == [ord("3"), TOK.eot_id]
    assert TOK.decode(ex["tokens"]).startswith("Below is an instruction")


def test_truncation_and_padded_collate(tmp_path):
    rows = [chat("a" * 10, "b" * 30), chat("c", "d")]
    ds = chat_dataset(TOK, write_jsonl(tmp_path / "c.jsonl", rows), max_seq_len=20)
    long, short = ds[0], ds[1]
    assert len(long["tokens"]) == 20 and long["labels"][-1] == IGNORE
    # <bos> <user> a*10 <eot> <assistant> b*6 | cut: targets are the 6 kept b's, last label ignored
    assert long["labels"] == [IGNORE] * 13 + [ord("b")] * 6 + [IGNORE]
    batch = ds.collate([short, long])
    assert batch["tokens"].shape == batch["labels"].shape == (2, 20)
    n = len(short["tokens"])
    assert batch["tokens"][0, :n].tolist() == short["tokens"]
    assert (batch["tokens"][0, n:] == TOK.pad_id).all() and (batch["labels"][0, n:] == IGNORE).all()
    assert batch["labels"][1].tolist() == long["labels"]
    assert set(batch) == {"tokens", "labels"}


def test_sharegpt_and_column_map(tmp_path):
    rows = [{"dialog": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    ds = chat_dataset(TOK, write_jsonl(tmp_path / "s.jsonl", rows), format="sharegpt",
                      column_map={"conversations": "dialog"})
    assert TOK.decode(ds[0]["tokens"]) == "qa"


def test_bad_row_error_names_file_line_and_field(tmp_path):
    rows = [chat("a", "b"), {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}]
    p = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError) as e:  # found when the dataset is built, before any training
        chat_dataset(TOK, p)
    assert str(e.value).startswith(f"{p}:2: field 'messages[1].content': empty text (1 bad row(s) found")
    assert "skip_bad_rows: true" in str(e.value)
    with pytest.raises(DataError, match=rf"{p.name}:2: field 'messages\[1\].content'"):
        chat_dataset(TOK, p, packed=True, max_seq_len=64)


def test_skip_bad_rows_counts_and_logs(tmp_path, caplog):
    p = tmp_path / "c.jsonl"
    lines = [json.dumps(chat("a", "b")), "{not json", json.dumps({"other": 1}), json.dumps(chat("c", "d"))]
    p.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING):
        ds = chat_dataset(TOK, p, skip_bad_rows=True)
    assert len(ds) == 2 and ds.num_skipped == 2
    assert TOK.decode(ds[1]["tokens"]) == "cd"
    assert "skipped 2 bad row(s)" in caplog.text and f"{p}:2: malformed JSON" in caplog.text
    packed = chat_dataset(TOK, p, skip_bad_rows=True, packed=True, max_seq_len=64)
    assert packed.num_skipped == 2 and packed.num_documents == 2


def test_split_by_fraction_and_by_file(tmp_path):
    rows = [chat(f"q{i}", f"a{i}") for i in range(50)]
    p = write_jsonl(tmp_path / "c.jsonl", rows)
    train = chat_dataset(TOK, p, val_fraction=0.2, seed=1)
    val = chat_dataset(TOK, p, split="validation", val_fraction=0.2, seed=1)
    texts = lambda ds: {TOK.decode(ds[i]["tokens"]) for i in range(len(ds))}  # noqa: E731
    assert len(train) == 40 and len(val) == 10 and not texts(train) & texts(val)
    assert len(texts(train) | texts(val)) == 50
    v = write_jsonl(tmp_path / "v.jsonl", rows[:3])
    by_file = chat_dataset(TOK, {"train": str(p), "validation": str(v)}, split="validation")
    assert len(by_file) == 3


def test_text_completion_from_txt_paragraphs(tmp_path):
    (tmp_path / "doc.txt").write_text("first block\n\nsecond\n")
    ds = text_completion_dataset(TOK, tmp_path / "doc.txt", text_split="paragraph")
    assert len(ds) == 2
    ex = ds[1]
    assert ex["tokens"] == [TOK.bos_id] + list(b"second") + [TOK.eos_id]
    assert ex["labels"] == list(b"second") + [TOK.eos_id, IGNORE]


def test_preference_dataset_and_collate(tmp_path):
    rows = [{"prompt": "p", "chosen": "good answer", "rejected": "bad"},
            {"prompt": "q", "chosen": "x", "rejected": "worse answer!"}]
    ds = preference_dataset(TOK, write_jsonl(tmp_path / "p.jsonl", rows))
    ex = ds[0]
    assert TOK.decode(ex["chosen_tokens"]) == "pgood answer" and TOK.decode(ex["rejected_tokens"]) == "pbad"
    assert [t for t in ex["chosen_labels"] if t != IGNORE] == list(b"good answer") + [TOK.eot_id]
    batch = ds.collate([ds[0], ds[1]])
    assert batch["tokens"].shape[0] == 4
    assert TOK.decode(batch["tokens"][1].tolist()) == "qx" and TOK.decode(batch["tokens"][3].tolist()) == "qworse answer!"


def test_dataloader_with_workers_pickles_the_lazy_source(tmp_path):
    p = write_jsonl(tmp_path / "c.jsonl", [chat(f"q{i}", f"a{i}") for i in range(8)])
    ds = chat_dataset(TOK, p)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=ds.collate, num_workers=1)
    assert sum(b["tokens"].shape[0] for b in loader) == 8


def test_built_from_a_config_node(tmp_path):
    config = pytest.importorskip("tunekit.config")
    from omegaconf import OmegaConf

    p = write_jsonl(tmp_path / "s.jsonl", [{"dialog": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}])
    node = OmegaConf.create({"_component_": "tunekit.data.chat_dataset", "source": [str(p)], "format": "sharegpt",
                             "column_map": {"conversations": "dialog"}, "max_seq_len": 64, "packed": True})
    ds = config.instantiate(node, TOK)
    assert ds.num_documents == 1 and TOK.decode(ds[0]["tokens"].tolist()) == "qa"
    node.max_seq_length = 64  # misspelt: must not pass silently
    with pytest.raises(tunekit.config.ConfigError, match="max_seq_length: no such argument of tunekit.data.chat_dataset; did you mean max_seq_len"):
        config.instantiate(node, TOK)
