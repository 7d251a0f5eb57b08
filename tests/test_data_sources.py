"""Reading rows from files: JSONL (lazy), JSON, CSV, text, directories; errors with file and line."""

import json
import pickle

import numpy as np
import pytest

from tunekit.data import DataError, load_rows, split_indices
from tunekit.data.sources import JsonlRows


def write_jsonl(path, rows, newline="\n"):
    path.write_text("".join(json.dumps(r) + newline for r in rows), encoding="utf-8")
    return path


def test_jsonl_random_access_blank_lines_and_crlf(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"a": 1}\r\n\r\n{"a": "\xc3\xa9"}\n   \n{"a": 3}')  # CRLF, blank lines, no final newline
    rows = load_rows(p)
    assert isinstance(rows, JsonlRows)
    assert len(rows) == 3
    assert [rows[i]["a"] for i in (2, 0, 1)] == [3, 1, "é"]
    assert [rows.where(i) for i in range(3)] == [f"{p}:1", f"{p}:3", f"{p}:5"]
    assert rows[-1]["a"] == 3
    clone = pickle.loads(pickle.dumps(rows))  # DataLoader workers
    assert clone[1]["a"] == "é"


def test_jsonl_is_read_lazily(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [{"t": "aaaa"}, {"t": "bbbb"}])
    rows = load_rows(p)
    data = p.read_bytes().replace(b"bbbb", b"cccc")  # same length: offsets stay valid
    p.write_bytes(data)
    assert rows[1]["t"] == "cccc"  # parsed at access time, not at open time


def test_jsonl_many_rows_offsets(tmp_path):
    rows = [{"i": i, "pad": "x" * (i % 7)} for i in range(5000)]
    src = load_rows(write_jsonl(tmp_path / "big.jsonl", rows))
    idx = np.random.default_rng(0).permutation(5000)[:300]
    assert all(src[int(i)]["i"] == i for i in idx)


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"a": 1}\n{"a": 2\n[1, 2]\n')
    rows = load_rows(p)
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON: Expecting ',' delimiter at column 8"):
        rows[1]
    with pytest.raises(DataError, match=r"bad.jsonl:3: expected a JSON object per line, got list"):
        rows[2]


def test_json_list_csv_text(tmp_path):
    j = tmp_path / "d.json"
    j.write_text(json.dumps([{"x": 1}, {"x": 2}]))
    rows = load_rows(j)
    assert len(rows) == 2 and rows[1] == {"x": 2} and rows.where(1) == f"{j} record 2"
    (tmp_path / "obj.json").write_text('{"x": 1}')
    with pytest.raises(DataError, match="expected a JSON list of objects"):
        load_rows(tmp_path / "obj.json")

    c = tmp_path / "d.csv"
    c.write_text('input,output\nhi,"multi\nline"\nq,a\n', encoding="utf-8")
    rows = load_rows(c)
    assert rows[0] == {"input": "hi", "output": "multi\nline"}
    assert rows.where(1) == f"{c}:4"  # the quoted newline makes row 2 start on line 4
    c.write_text("input,output\nhi\n")
    with pytest.raises(DataError, match=r"d.csv:2: field 'output': fewer values than header columns"):
        load_rows(c)

    t = tmp_path / "doc.txt"
    t.write_text("para one\nstill one\n\n\npara two\n")
    assert [r["text"] for r in load_rows(t)] == ["para one\nstill one\n\n\npara two\n"]
    para = load_rows(t, text_split="paragraph")
    assert [r["text"] for r in para] == ["para one\nstill one", "para two"]
    assert para.where(1) == f"{t}:5"


def test_directory_and_file_list(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"i": 2}, {"i": 3}])
    write_jsonl(tmp_path / "a.jsonl", [{"i": 1}])
    (tmp_path / "notes.md").write_text("ignored")
    rows = load_rows(tmp_path)
    assert [rows[i]["i"] for i in range(len(rows))] == [1, 2, 3]
    assert rows.where(2) == f"{tmp_path / 'b.jsonl'}:2"


def test_missing_file_and_optional_datasets(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_rows(tmp_path / "nope.jsonl")
    try:
        import datasets  # noqa: F401
    except ImportError:
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match=r'pip install "tunekit\[hf\]"'):
            load_rows(tmp_path / "d.parquet")
        with pytest.raises(ImportError, match=r"Hugging Face hub.*pip install \"tunekit\[hf\]\""):
            load_rows("someorg/somedata")
    else:
        pytest.skip("datasets is installed: the missing-package message cannot be observed")


def test_split_by_fraction_is_deterministic_and_disjoint():
    train = split_indices(1000, "train", 0.1, seed=3)
    val = split_indices(1000, "validation", 0.1, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(1000))
    assert np.array_equal(val, split_indices(1000, "validation", 0.1, seed=3))
    assert not np.array_equal(val, split_indices(1000, "validation", 0.1, seed=4))
    with pytest.raises(ValueError, match="val_fraction"):
        split_indices(10, "validation", 0.0)


def test_misspelt_keyword_for_local_file_is_an_error(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\n')
    with pytest.raises(DataError, match="argument\\(s\\) max_seq_length apply to Hugging Face hub datasets only"):
        load_rows(p, max_seq_length=5)
    with pytest.raises(ValueError, match="empty source list"):
        load_rows([])
