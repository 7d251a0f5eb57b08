"""tunekit data check: planted exact/near duplicates and eval contamination are found, clean data is clean."""

import json
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fake_tokenizer import ByteTokenizer

from tunekit.cli.data_check import main as data_check_main
from tunekit.data.check import BANDS, check_data, format_report, ngram_hashes

ROOT = Path(__file__).resolve().parents[1]
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
    assert report.format == "alpaca" and report.num_rows == 302 and [e.num_rows for e in report.evals] == [41]
    assert report.exact_duplicates == [[f"{train}:11", f"{train}:301"]]
    assert report.near_duplicates == [[f"{train}:21", f"{train}:302"]]
    assert report.evals[0].name == "eval" and report.evals[0].ngram == 13
    assert report.evals[0].contaminated == [(f"{evals}:41", f"{train}:51")]
    text = format_report(report)
    assert "exact duplicates: 1 row(s)" in text
    assert "near duplicates (MinHash, word 5-grams, Jaccard >= 0.8): 1 row(s) close to an earlier one (1 cluster(s)" in text
    assert "eval contamination (13-gram overlap with train): 1 of 41 rows" in text


def test_clean_data_has_no_findings(tmp_path):
    rng = random.Random(1)
    rows = [{"text": doc(rng, 60)} for _ in range(200)]
    report = check_data(str(write_jsonl(tmp_path / "t.jsonl", rows)),
                        str(write_jsonl(tmp_path / "e.jsonl", [{"text": doc(rng, 60)} for _ in range(20)])))
    assert report.exact_duplicates == [] and report.near_duplicates == [] and report.evals[0].contaminated == []


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
    assert "format: alpaca" in out and "longer than max_seq_len=64" in out
    assert "validation contamination (13-gram overlap with train): 1 of 41 rows" in out
    assert data_check_main(["check", str(tmp_path / "missing.jsonl")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_registered_in_the_tunekit_command(planted, capsys):
    cli_main = pytest.importorskip("tunekit.cli.main")
    train, evals = planted
    args = cli_main.build_parser().parse_args(["data", "check", str(train), "--eval", str(evals)])
    assert args.func(args) == 0
    assert "1 row(s) close to an earlier one (1 cluster(s), largest 2 rows)" in capsys.readouterr().out


@pytest.mark.parametrize("config, fmt", [("tiny/lora", "openai"), ("tiny/dpo", "preference"), ("tiny/kto", "kto")])
def test_shipped_configs_by_name(config, fmt, capsys):
    """A built-in config name: its dataset and val_dataset files, in the format its builder reads."""
    assert data_check_main(["check", config]) == 0
    out = capsys.readouterr().out
    assert f"format: {fmt}" in out and "bad rows: 0" in out
    assert re.search(r"rows: \d+ train, \d+ val_dataset, \d+ forget_dataset", out), out
    assert "forget_dataset contamination" in out


def test_kto_rows_are_checked_for_bad_labels(tmp_path, capsys):
    rows = [{"prompt": "2+2?", "completion": "4", "label": True}, {"prompt": "2+2?", "completion": "5", "label": "maybe"}]
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert data_check_main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "format: kto" in out and "kto.jsonl:2" in out and "label" in out


def test_readme_line_runs_as_written():
    """The README's `tunekit data check tiny/lora`, run exactly as written (the command's module)."""
    line = next(raw.split("#")[0].strip() for raw in (ROOT / "README.md").read_text().splitlines()
                if raw.strip().startswith("tunekit data check tiny/lora"))
    argv = shlex.split(line)
    assert argv == ["tunekit", "data", "check", "tiny/lora"]
    proc = subprocess.run([sys.executable, "-m", "tunekit.cli.main", *argv[1:]], check=False, capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "format: openai" in proc.stdout and "bad rows: 0" in proc.stdout
    assert "val_dataset contamination" in proc.stdout and "forget_dataset contamination" in proc.stdout


_ALL_CONFIGS = """
import contextlib, io, json, sys
from tunekit.cli.main import main
from tunekit.config.catalog import builtin_configs
results = {}
for name in builtin_configs():
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            main(["data", "check", name])
            code = 0
        except SystemExit as e:
            code = e.code
        except BaseException as e:  # a traceback: reported, not raised
            code, err = "traceback", io.StringIO(f"{type(e).__name__}: {e}")
    results[name] = [code, err.getvalue()]
print(json.dumps(results))
"""


def test_every_shipped_config():
    """Every built-in config by name: a report, or (data not on this machine: hub datasets with
    the hub offline, no dataset node) one `tunekit: error:` line naming the config and key."""
    proc = subprocess.run([sys.executable, "-c", _ALL_CONFIGS], check=False, capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    results = json.loads(proc.stdout.splitlines()[-1])
    assert len(results) >= 25
    for name, (code, err) in results.items():
        errors = [line for line in err.splitlines() if line.startswith("tunekit: error:")]
        assert code in (0, 2) and "Traceback" not in err, (name, code, err)
        if name.startswith("tiny/") and name != "tiny/generate":
            assert code == 0, (name, err)
        if code == 2:
            assert len(errors) == 1 and f"{name}.yaml" in errors[0], (name, err)
            assert "dataset.source" in errors[0] or "no 'dataset' key" in errors[0], (name, err)


def test_config_mode_string_sources_and_every_eval_set(tmp_path, capsys):
    """String sources in a config: train, val_dataset (alpaca) and forget_dataset (plain text), each
    in its own format, contamination reported per set."""
    rng = random.Random(2)
    train = [{"instruction": doc(rng, 12), "input": "", "output": doc(rng, 60)} for _ in range(100)]
    val = [{"instruction": doc(rng, 12), "input": "", "output": doc(rng, 60)} for _ in range(10)]
    val[3]["output"] = " ".join(train[7]["output"].split()[10:30])  # 20 words of a training answer
    forget = [{"text": doc(rng, 50)} for _ in range(20)]
    forget[5]["text"] += " " + " ".join(train[42]["output"].split()[:20])
    paths = {k: write_jsonl(tmp_path / f"{k}.jsonl", v) for k, v in (("train", train), ("val", val), ("forget", forget))}
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"dataset:\n  _component_: tunekit.data.instruct_dataset\n  source: {paths['train']}\n"
                   f"val_dataset:\n  _component_: tunekit.data.instruct_dataset\n  source: {paths['val']}\n"
                   f"forget_dataset:\n  _component_: tunekit.data.text_completion_dataset\n"
                   f"  source: {paths['forget']}\n  max_seq_len: 64\n")
    assert data_check_main(["check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "format: alpaca" in out and "rows: 100 train, 10 val_dataset, 20 forget_dataset" in out
    assert "val_dataset contamination (13-gram overlap with train): 1 of 10 rows" in out
    assert f"{paths['val']}:4 overlaps {paths['train']}:8" in out
    assert f"{paths['forget']}:6 overlaps {paths['train']}:43" in out


def test_exact_duplicates_same_on_ascii_and_unicode_paths(tmp_path):
    """ASCII rows take a byte-table fast path, others the Unicode regex: equal normalised text is
    an exact duplicate either way."""
    rows = [{"text": "Hello, World -- this is it"}, {"text": "hello world … this IS it!"},
            {"text": "Café au lait, s'il vous plaît"}, {"text": "CAFÉ AU LAIT S IL VOUS PLAÎT"},
            {"text": "hello world this is not it"}]
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    report = check_data(str(path))
    assert report.exact_duplicates == [[f"{path}:1", f"{path}:2"], [f"{path}:3", f"{path}:4"]]
    assert report.lengths.tolist() == [5, 5, 7, 7, 6]


def variant(rng, text, changes):
    words = text.split()
    for k in rng.sample(range(len(words)), changes):
        words[k] = f"x{rng.randrange(10**6)}"
    return " ".join(words)


def test_near_duplicate_clusters(tmp_path):
    """Planted groups of variants come back as exactly those clusters; distinct rows join none."""
    rng = random.Random(3)
    rows = [doc(rng, 200) for _ in range(400)]
    # base row -> number of variants (one or two words changed: Jaccard 0.95 / 0.90, estimated
    # from 64 bins with a standard deviation of about 0.03)
    planted = {12: 3, 100: 2, 250: 1}
    for base, k in planted.items():
        rows += [variant(rng, rows[base], 1 + j % 2) for j in range(k)]
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": r} for r in rows])
    report = check_data(str(path))
    expected, extra = [], 401
    for base, k in planted.items():
        expected.append([f"{path}:{base + 1}"] + [f"{path}:{extra + j}" for j in range(k)])
        extra += k
    assert report.near_duplicates == expected  # largest cluster first
    assert report.exact_duplicates == [] and report.near_dup_uncompared == 0
    assert "6 row(s) close to an earlier one (3 cluster(s), largest 4 rows)" in format_report(report)


def templated(n, rng, instruction_words, output_words):
    """Alpaca rows sharing one long instruction, each with its own output."""
    instruction = doc(random.Random(99), instruction_words)
    return [{"instruction": instruction, "input": "", "output": doc(rng, output_words)} for _ in range(n)]


def test_templated_rows_are_not_merged(tmp_path):
    """Rows sharing a long instruction (Jaccard ~0.45) land in common LSH buckets but are not near
    duplicates: no cluster, and a planted near copy among them is still found."""
    rng = random.Random(4)
    rows = templated(1000, rng, 60, 50)
    rows.append(dict(rows[500], output=variant(rng, rows[500]["output"], 1)))
    report = check_data(str(write_jsonl(tmp_path / "t.jsonl", rows)))
    assert report.near_duplicates == [[f"{tmp_path / 't.jsonl'}:501", f"{tmp_path / 't.jsonl'}:1001"]]
    assert report.near_dup_comparisons > 0


def test_near_duplicate_work_is_linear_on_templated_rows(tmp_path):
    """Signature comparisons grow linearly with the rows of one template (the pairwise version made
    n^2/2 of them: 8 million for 4000 rows), bounded by rows x bands x leaders."""
    counts = {}
    for n in (1000, 4000):
        rows = templated(n, random.Random(n), 60, 40)
        report = check_data(str(write_jsonl(tmp_path / f"t{n}.jsonl", rows)))
        assert report.near_duplicates == []
        counts[n] = report.near_dup_comparisons
        assert counts[n] <= BANDS * report.max_leaders * n
    assert counts[1000] > 1000  # the buckets are shared: a pairwise comparison would be quadratic
    assert counts[4000] <= 5 * counts[1000]
    # Rows that all are near duplicates (a long shared text, a few own words): one cluster, each
    # row compared about once (joined rows are not compared again in later bands).
    rows = templated(4000, random.Random(5), 300, 3)
    report = check_data(str(write_jsonl(tmp_path / "near.jsonl", rows)))
    assert [len(c) for c in report.near_duplicates] == [4000]
    assert report.near_dup_comparisons < 2 * 4000
