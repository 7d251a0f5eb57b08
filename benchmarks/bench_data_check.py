"""Time and peak memory of ``tunekit data check`` (``tunekit.data.check.check_data``) at scale.

Data sets (generated once into ``--data-dir``, JSONL):

- ``random``: 1M rows of 100 words drawn from a 50k-word vocabulary (about 0.7 GB), with 1,000
  planted exact copies and 1,000 planted near copies (one word changed, Jaccard ~0.9), and a
  1,000-row eval set of which 100 rows contain a 20-word span of a training row;
- ``templated``: 100k Alpaca rows that share one 60-word instruction, each with its own 40-word
  answer (every pair has Jaccard ~0.45: the rows fill common LSH buckets but are not near
  duplicates), plus 100 planted near copies.

Each check runs in a fresh process (``--child``) so its peak RSS (``VmHWM``) is its own; the
report gives wall time, the process's CPU time, peak RSS, the RSS after imports, what was found,
and the load average before and after (the machine may be shared: wall time then depends on the
other processes, CPU time much less).

``--reference`` also times the pre-rework implementation (git commit 473f897, pairwise comparison
of every LSH bucket) on 2,000 and 4,000 templated rows next to the current one.

    python benchmarks/bench_data_check.py                 # both data sets, 3 repeats, medians
    python benchmarks/bench_data_check.py --rows 100000 --repeats 1 --reference
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_COMMIT = "473f897"


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> None:
    """Run one check in this process and print its measurements as JSON."""
    if args.reference:
        import importlib.util

        spec = importlib.util.spec_from_file_location("reference_check", args.reference)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look themselves up there
        spec.loader.exec_module(module)
        check_data = module.check_data
    else:
        from tunekit.data.check import check_data
    rss_imports = _rss_mb("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    report = check_data(args.child, args.eval)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    near = report.near_duplicates
    contaminated = (report.evals[0].contaminated if getattr(report, "evals", None)
                    else getattr(report, "contaminated", []))
    print(json.dumps({
        "wall_s": wall, "cpu_s": cpu, "peak_rss_mb": _rss_mb("VmHWM"), "rss_after_imports_mb": rss_imports,
        "rows": report.num_rows, "exact_dup_rows": sum(len(g) - 1 for g in report.exact_duplicates),
        # current: clusters (lists of rows); reference: pairs (a, b, similarity)
        "near_dup_rows": sum(len(c) - 1 for c in near) if near and isinstance(near[0], list) else len(near),
        "near_dup_comparisons": getattr(report, "near_dup_comparisons", None),
        "near_dup_uncompared": getattr(report, "near_dup_uncompared", None),
        "contaminated_eval_rows": len(contaminated),
    }))


def make_random(path: Path, eval_path: Path, rows: int, words: int, seed: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(50_000)])
    planted = min(1000, rows // 100)
    base = rng.choice(rows - 2 * planted, 2 * planted, replace=False)
    with open(path, "w") as f:
        for start in range(0, rows - 2 * planted, 100_000):
            ids = rng.integers(0, len(vocab), (min(100_000, rows - 2 * planted - start), words))
            f.writelines(json.dumps({"text": " ".join(vocab[r])}) + "\n" for r in ids)
    lines = _read_lines(path, base)  # the planted copies' originals, read back
    with open(path, "a") as f:
        for k, line in enumerate(lines):
            text = json.loads(line)["text"]
            if k < planted:  # exact copy, different case and punctuation
                f.write(json.dumps({"text": text.upper() + " !"}) + "\n")
            else:  # near copy: one word changed
                w = text.split()
                w[len(w) // 2] = "changed"
                f.write(json.dumps({"text": " ".join(w)}) + "\n")
    leaked = _read_lines(path, rng.choice(rows - 2 * planted, 100, replace=False))
    with open(eval_path, "w") as f:
        for k in range(1000):
            ids = rng.integers(0, len(vocab), words)
            text = " ".join(vocab[ids])
            if k < len(leaked):
                text += " " + " ".join(json.loads(leaked[k])["text"].split()[30:50])
            f.write(json.dumps({"text": text}) + "\n")


def _read_lines(path: Path, indices) -> list[str]:
    wanted, out = {int(i) for i in indices}, {}
    with open(path) as f:
        for i, line in enumerate(f):
            if i in wanted:
                out[i] = line
    return [out[i] for i in sorted(out)]


def make_templated(path: Path, rows: int, seed: int = 1) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(50_000)])
    instruction = " ".join(vocab[rng.integers(0, len(vocab), 60)])
    planted = min(100, rows // 100)
    with open(path, "w") as f:
        outputs = []
        for k in range(rows - planted):
            out = " ".join(vocab[rng.integers(0, len(vocab), 40)])
            if k < planted:
                outputs.append(out)
            f.write(json.dumps({"instruction": instruction, "input": "", "output": out}) + "\n")
        for out in outputs:
            w = out.split()
            w[20] = "changed"
            f.write(json.dumps({"instruction": instruction, "input": "", "output": " ".join(w)}) + "\n")


def run_child(data: Path, eval_path: Path | None = None, reference: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(data)]
    if eval_path:
        cmd += ["--eval", str(eval_path)]
    if reference:
        cmd += ["--reference", str(reference)]
    load_before = os.getloadavg()[0]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    result = json.loads(proc.stdout.splitlines()[-1])
    result["load_before"], result["load_after"] = load_before, os.getloadavg()[0]
    return result


def summarise(name: str, runs: list[dict]) -> dict:
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall_s", "cpu_s", "peak_rss_mb")}
    last = runs[-1]
    loads = ", ".join(f"{r['load_before']:.1f}->{r['load_after']:.1f}" for r in runs)
    print(f"{name}: {last['rows']} rows, {len(runs)} run(s): wall {med['wall_s']:.1f} s (median; "
          f"{min(r['wall_s'] for r in runs):.1f}-{max(r['wall_s'] for r in runs):.1f}), CPU {med['cpu_s']:.1f} s, "
          f"peak RSS {med['peak_rss_mb']:.0f} MB ({last['rss_after_imports_mb']:.0f} MB after imports); "
          f"load average {loads}; "
          f"found: {last['exact_dup_rows']} exact, {last['near_dup_rows']} near-duplicate rows, "
          f"{last['contaminated_eval_rows']} contaminated eval rows; "
          f"{last['near_dup_comparisons']} signature comparisons ({last['near_dup_uncompared']} left uncompared)",
          flush=True)
    return {"name": name, "median": med, "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--eval", help=argparse.SUPPRESS)
    p.add_argument("--reference", nargs="?", const="git", default=None,
                   help="also time the pre-rework implementation on 2k/4k templated rows")
    p.add_argument("--rows", type=int, default=1_000_000, help="rows of the random data set")
    p.add_argument("--templated-rows", type=int, default=100_000)
    p.add_argument("--words", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "tunekit_bench_data_check"))
    p.add_argument("--json", default=None, help="write all measurements here")
    args = p.parse_args()
    if args.child:
        return child(args)
    data = Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()}", flush=True)
    templated = data / f"templated_{args.templated_rows}.jsonl"
    if not templated.exists():
        make_templated(templated, args.templated_rows)
    results.append(summarise("templated", [run_child(templated) for _ in range(args.repeats)]))
    random_rows = data / f"random_{args.rows}x{args.words}.jsonl"
    random_eval = data / f"random_{args.rows}x{args.words}_eval.jsonl"
    if not random_rows.exists():
        t = time.perf_counter()
        make_random(random_rows, random_eval, args.rows, args.words)
        print(f"generated {random_rows} ({random_rows.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
    results.append(summarise("random", [run_child(random_rows, random_eval) for _ in range(args.repeats)]))
    if args.reference:
        reference = data / "reference_check.py"
        source = subprocess.run(["git", "-C", str(ROOT), "show", f"{REFERENCE_COMMIT}:tunekit/data/check.py"],
                                capture_output=True, text=True, check=True).stdout
        reference.write_text(source)
        for n in (2000, 4000):
            small = data / f"templated_{n}.jsonl"
            if not small.exists():
                make_templated(small, n)
            ours = summarise(f"templated {n} (current)", [run_child(small)])
            ref = summarise(f"templated {n} (reference {REFERENCE_COMMIT})", [run_child(small, reference=reference)])
            print(f"  reference / current wall time: {ref['median']['wall_s'] / ours['median']['wall_s']:.0f}x")
            results += [ours, ref]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
