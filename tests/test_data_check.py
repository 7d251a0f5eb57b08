"""tunekit data check: planted exact/near duplicates and eval contamination are found, clean data is clean."""

import json
import random
import re

import numpy as np
import pytest
from fake_tokenizer import ByteTokenizer

from tunekit.cli.data_check import main as data_check_main
from tunekit.data.check import check_data, format_report, ngram_hashes

WORDS = [f"w{i}" for i in range(5000)]


def doc(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def planted(tmp_path):
    rng = random.Random(0)
    train = [{"instruction": doc(rng, 15), "input": "", "output": doc(rng, 80)} for _ in range(300)]
    exact = dict(train[10], output=train[10]["output"].upper() + " !")  # same after normalisation
    near = dict(train[20])
    words = near["output"].split()
    words[40] = "changed"
    near["output"] = " ".join(words)
    train += [exact, near]
    evals = [{"instruction": doc(rng, 15), "input": "", "output": doc(rng, 80)} for _ in range(40)]
    leaked = " ".join(train[50]["output"].split()[30:45])  # a 15-word span of a training answer
    evals.append({"instruction": "Repeat this.", "input": "", "output": f"Sure: {leaked}"})
    return write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "eval.jsonl", evals)


def test_finds_planted_duplicates_and_contamination(planted):
    train, evals = planted
    report = check_data(str(train), str(evals))
    assert report.format == "alpaca" and report.num_rows == 302 and report.num_eval_rows == 41
    assert report.exact_duplicates == [[f"{train}:11", f"{train}:301"]]
    assert [(a, b) for a, b, _ in report.near_duplicates] == [(f"{train}:21", f"{train}:302")]
    assert report.near_duplicates[0][2] >= 0.8
    assert report.contamination_ngram == 13
    assert report.contaminated == [(f"{evals}:41", f"{train}:51")]
    text = format_report(report)
    assert "exact duplicates: 1 row(s)" in text and "near duplicates (MinHash, word 5-grams): 1 pair(s)" in text
    assert "eval contamination (13-gram overlap): 1 of 41 eval rows" in text


def test_clean_data_has_no_findings(tmp_path):
    rng = random.Random(1)
    rows = [{"text": doc(rng, 60)} for _ in range(200)]
    report = check_data(str(write_jsonl(tmp_path / "t.jsonl", rows)),
                        str(write_jsonl(tmp_path / "e.jsonl", [{"text": doc(rng, 60)} for _ in range(20)])))
    assert report.exact_duplicates == [] and report.near_duplicates == [] and report.contaminated == []


def test_lengths_bad_rows_and_tokenizer(tmp_path):
    p = tmp_path / "c.jsonl"
    good = {"messages": [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}]}
    p.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    words = check_data(str(p), max_seq_len=2)
    assert words.length_unit == "words" and words.lengths.tolist() == [3]
    assert words.bad_rows == [f"{p}:2: field 'messages': conversation has no assistant message, nothing to train on"]
    tokens = check_data(str(p), tokenizer=ByteTokenizer())
    assert tokens.length_unit == "tokens" and tokens.lengths.tolist() == [1 + 1 + 8 + 1 + 1 + 5 + 1]
    assert "longer than max_seq_len=2: 1 (100.0%)" in format_report(words)


def test_ngram_hashes_are_window_hashes():
    ids = np.array([1, 2, 3, 1, 2, 3], np.uint64)
    h = ngram_hashes(ids, 3)
    assert len(h) == 4 and h[0] == h[3] and len(set(h.tolist())) == 3
    assert len(ngram_hashes(ids[:2], 3)) == 0


def test_cli_report_and_exit_codes(planted, capsys, tmp_path):
    train, evals = planted
    assert data_check_main(["check", str(train), "--eval", str(evals)]) == 0
    out = capsys.readouterr().out
    assert "rows: 302 train, 41 eval" in out and f"{evals}:41 overlaps {train}:51" in out
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"dataset:\n  _component_: tunekit.data.instruct_dataset\n  source:\n"
                   f"    train: {train}\n    validation: {evals}\n  max_seq_len: 64\n")
    assert data_check_main(["check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "format: alpaca" in out and "longer than max_seq_len=64" in out and "1 of 41 eval rows" in out
    assert data_check_main(["check", str(tmp_path / "missing.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_registered_in_the_tunekit_command(planted, capsys):
    cli_main = pytest.importorskip("tunekit.cli.main")
    train, evals = planted
    args = cli_main.build_parser().parse_args(["data", "check", str(train), "--eval", str(evals)])
    assert args.func(args) == 0
    assert "near duplicates (MinHash, word 5-grams): 1 pair(s)" in capsys.readouterr().out


@pytest.mark.parametrize("config, fmt", [("tiny/lora", "openai"), ("tiny/dpo", "preference"), ("tiny/kto", "kto")])
def test_shipped_configs_by_name(config, fmt, capsys):
    """A built-in config name: its dataset and val_dataset files, in the format its builder reads."""
    assert data_check_main(["check", config]) == 0
    out = capsys.readouterr().out
    assert f"format: {fmt}" in out and "bad rows: 0" in out
    assert re.search(r"rows: \d+ train, \d+ eval", out), out


def test_kto_rows_are_checked_for_bad_labels(tmp_path, capsys):
    rows = [{"prompt": "2+2?", "completion": "4", "label": True}, {"prompt": "2+2?", "completion": "5", "label": "maybe"}]
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert data_check_main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "format: kto" in out and "kto.jsonl:2" in out and "label" in out
