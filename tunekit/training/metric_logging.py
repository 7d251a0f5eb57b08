"""Training metrics: one stdout line, ``<output_dir>/logs/metrics.jsonl``, TensorBoard and a tqdm
progress bar, all fed by one ``MetricLogger.log(step, metrics)`` call per optimizer step."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

from tunekit.training.process_group import is_rank_zero


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window on an accelerator (CPU peak RSS cannot be reset)."""
    if device.type != "cpu" and torch.accelerator.is_available():
        torch.accelerator.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory in GiB: the accelerator's max allocated bytes since the last reset, or the
    process's peak resident set size on CPU."""
    if device.type != "cpu" and torch.accelerator.is_available():
        return torch.accelerator.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def _drop_rows_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


class MetricLogger:
    """Writes each step's metrics to every enabled sink.

    Args:
        output_dir: run folder; ``logs/metrics.jsonl`` and ``logs/tensorboard/`` go below it.
        total_steps: optimizer steps of the whole run (progress bar length and ETA).
        initial_step: step to start the progress bar at (the resume step).
        log_every: print a stdout line every this many steps (the jsonl gets every step).
        stdout / tensorboard / progress_bar: enable each sink.
    A resumed run continues the same files: rows of steps after ``initial_step`` (logged by the
    interrupted run after its last checkpoint) are dropped from the jsonl and purged from
    TensorBoard, so each holds one curve.
    """

    def __init__(self, output_dir: str | Path, *, total_steps: int, initial_step: int = 0, log_every: int = 1,
                 stdout: bool = True, tensorboard: bool = True, progress_bar: bool = True):
        log_dir = Path(output_dir) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        _drop_rows_after(log_dir / "metrics.jsonl", initial_step)
        self._jsonl = open(log_dir / "metrics.jsonl", "a")
        self._log_every, self._stdout = log_every, stdout
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(log_dir / "tensorboard"),
                                     purge_step=initial_step + 1 if initial_step else None)
        self._bar = None
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, unit="step",
                             file=sys.stderr)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record ``metrics`` (plain numbers) for optimizer step ``step``. The jsonl row also gets
        ``time`` (Unix seconds when logged): differences between rows are wall-clock step times,
        data loading and evaluation included (benchmarks/bench_train.py reads them)."""
        record = {"step": step, **{k: (float(v) if isinstance(v, (float, torch.Tensor)) else v)
                                   for k, v in metrics.items()}}
        self._jsonl.write(json.dumps({**record, "time": time.time()}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            shown = {k: _fmt(record[k]) for k in ("loss", "tokens_per_second", "val_loss") if k in record}
            self._bar.set_postfix(shown, refresh=False)
        if self._stdout and step % self._log_every == 0:
            line = " ".join(f"{k}={_fmt(v)}" for k, v in record.items())
            if self._bar is not None:
                self._bar.write(line, file=sys.stdout)
            else:
                print(line, flush=True)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _SilentMetricLogger:
    def log(self, step: int, metrics: dict) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def rank_zero_metric_logger(output_dir, **kwargs):
    """``tunekit.training.metric_logging.MetricLogger(output_dir, **kwargs)`` on rank 0 and a
    logger that records nothing on the other ranks (the metrics the recipes log are already
    global), so one process writes ``logs/``."""
    if not is_rank_zero():
        return _SilentMetricLogger()
    return MetricLogger(output_dir, **kwargs)
