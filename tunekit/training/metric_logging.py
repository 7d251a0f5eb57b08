"""Training metrics: ``MetricLogger.log(step, metrics)``, once per optimizer step, feeds every sink
of the config's ``metric_logging`` (stdout, ``logs/metrics.jsonl``, TensorBoard, a progress bar,
W&B, MLflow: tunekit.training.metric_sinks); the logger also writes the run's ``config.yaml``
(tunekit.training.run_record). Peak-memory numbers for the rows."""

from __future__ import annotations

import resource
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig

from tunekit.config.instantiate import instantiate
from tunekit.training.metric_sinks import RunInfo
from tunekit.training.process_group import is_rank_zero
from tunekit.training.run_record import (
    library_versions,
    resolved_config,
    write_run_config,
)


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


class MetricLogger:
    """Feeds one row of metrics per optimizer step to every sink of the config's ``metric_logging``
    (tunekit.training.metric_sinks: stdout, jsonl, TensorBoard, progress bar, W&B, MLflow).

    Args:
        output_dir: run folder; the sinks write below ``output_dir/logs``.
        sinks: ``cfg.metric_logging``: a mapping of names to ``_component_`` nodes (a null or
            false entry is off) or a list of them; built sink objects are taken as they are.
        config: the run's config; written to ``output_dir/config.yaml`` with the library versions
            (tunekit.training.run_record) before the sinks open, and handed to them (W&B, MLflow).
        total_steps: optimizer steps of the whole run (progress bar length and ETA).
        initial_step: the step the run starts at (the resume step; 0 for a fresh run).
        log_every: ``log_every_n_steps`` (the stdout line; the other sinks get every step).
    """

    def __init__(self, output_dir: str | Path, sinks: Any, *, config: Any = None, total_steps: int,
                 initial_step: int = 0, log_every: int = 1):
        built = [_build(sink) for sink in _entries(sinks)]  # a missing package fails before any file is written
        output_dir = Path(output_dir)
        resolved = None
        if config is not None:
            write_run_config(output_dir, config, step=initial_step)
            resolved = resolved_config(config)
        run = RunInfo(output_dir, total_steps=total_steps, initial_step=initial_step, log_every=log_every,
                      config=resolved, versions=library_versions())
        self._sinks = []
        try:
            for sink in built:
                sink.open(run)
                self._sinks.append(sink)
        except BaseException:
            self.close()
            raise

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Record ``metrics`` (numbers or one-element tensors) for optimizer step ``step``."""
        row = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
        row = {k: (float(v) if isinstance(v, float) else v) for k, v in row.items()}
        for sink in self._sinks:
            sink.log(step, row)

    def close(self) -> None:
        for sink in reversed(self._sinks):
            sink.close()
        self._sinks = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _entries(sinks: Any) -> list:
    if sinks is None:
        return []
    if isinstance(sinks, (DictConfig, Mapping)) and "_component_" not in sinks:
        return [s for s in sinks.values() if s is not None and s is not False]
    if isinstance(sinks, (ListConfig, list, tuple)):
        return list(sinks)
    return [sinks]


def _build(sink: Any):
    if isinstance(sink, (DictConfig, Mapping)):
        return instantiate(sink)
    return sink


class _SilentMetricLogger:
    def log(self, step: int, metrics: dict) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def rank_zero_metric_logger(output_dir, sinks, **kwargs):
    """``MetricLogger(output_dir, sinks, **kwargs)`` on rank 0 and a logger that records nothing on
    the other ranks (the metrics the recipes log are already global), so one process writes
    ``logs/``, ``config.yaml`` and the W&B / MLflow run."""
    if not is_rank_zero():
        return _SilentMetricLogger()
    return MetricLogger(output_dir, sinks, **kwargs)
