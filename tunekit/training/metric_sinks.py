"""Where training metrics go. Each sink is a ``_component_`` under the config's ``metric_logging``
(a mapping of names to sinks, or a plain list of them); ``tunekit.training.metric_logging.MetricLogger``
builds them on rank 0 and feeds each one row of plain numbers per optimizer step::

    metric_logging:
      stdout: {_component_: tunekit.training.metric_sinks.StdoutSink}
      jsonl: {_component_: tunekit.training.metric_sinks.JsonlSink}
      tensorboard: {_component_: tunekit.training.metric_sinks.TensorBoardSink}
      progress_bar: {_component_: tunekit.training.metric_sinks.ProgressBarSink}
      wandb: {_component_: tunekit.training.metric_sinks.WandbSink, project: my-project}  # tunekit[wandb]
      mlflow: {_component_: tunekit.training.metric_sinks.MlflowSink, experiment: my-exp}  # tunekit[mlflow]

``metric_logging.tensorboard=false`` (or ``=null``) switches a named sink off on the command line.

A sink is built from its config arguments alone; ``open(run)`` hands it the run (:class:`RunInfo`),
``log(step, metrics)`` one row (names like ``loss`` or ``rewards/accuracies``; numbers, never
tensors), ``close()`` ends it. Every sink gets the same names. A resumed run (``run.initial_step >
0``) continues what the interrupted run wrote: the jsonl and TensorBoard drop the rows it logged
after its last checkpoint; W&B and MLflow continue the same run (its id is kept in
``<output_dir>/logs/``), where rows cannot be deleted: W&B keeps the interrupted run's rows up to
the step it reached and takes the rest, MLflow keeps both (see docs/recipes.md).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunekit.config.errors import MissingPackageError


@dataclass(frozen=True)
class RunInfo:
    """What a sink knows about the run: ``output_dir`` (logs go to ``output_dir/logs``),
    ``total_steps`` of the whole run, ``initial_step`` (the resume step, 0 for a fresh run),
    ``log_every`` (``log_every_n_steps``), the resolved ``config`` (plain containers, or None) and
    the library ``versions``."""

    output_dir: Path
    total_steps: int
    initial_step: int = 0
    log_every: int = 1
    config: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.output_dir / "logs"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def _numbers(metrics: dict[str, Any]):
    """The finite numbers of a row (booleans and strings aside)."""
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            yield key, value


class StdoutSink:
    """One ``step=N name=value ...`` line every ``log_every_n_steps`` steps (written above a
    progress bar when there is one)."""

    def open(self, run: RunInfo) -> None:
        self._every = run.log_every

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if step % self._every == 0:
            from tqdm import tqdm

            tqdm.write(" ".join(f"{k}={_fmt(v)}" for k, v in {"step": step, **metrics}.items()), file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        pass


def _drop_rows_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


class JsonlSink:
    """``<output_dir>/logs/metrics.jsonl``: one JSON row per step with ``step``, the metrics and
    ``time`` (Unix seconds when logged: differences between rows are wall-clock step times, data
    loading and evaluation included; benchmarks/bench_train.py reads them)."""

    def open(self, run: RunInfo) -> None:
        run.log_dir.mkdir(parents=True, exist_ok=True)
        _drop_rows_after(run.log_dir / "metrics.jsonl", run.initial_step)
        self._file = open(run.log_dir / "metrics.jsonl", "a")  # noqa: SIM115  (open until close())

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps({"step": step, **metrics, "time": time.time()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardSink:
    """TensorBoard event files in ``<output_dir>/logs/tensorboard/`` (finite numbers only)."""

    def open(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run hides what the interrupted run logged after its checkpoint
        self._writer = SummaryWriter(log_dir=str(run.log_dir / "tensorboard"),
                                     purge_step=run.initial_step + 1 if run.initial_step else None)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for key, value in _numbers(metrics):
            self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


class ProgressBarSink:
    """A tqdm bar on stderr over the run's steps, with ETA, ``loss``, ``tokens_per_second`` and
    ``val_loss``."""

    def open(self, run: RunInfo) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=run.total_steps, initial=run.initial_step, dynamic_ncols=True, unit="step",
                         file=sys.stderr)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._bar.update(step - self._bar.n)
        shown = {k: _fmt(metrics[k]) for k in ("loss", "tokens_per_second", "val_loss") if k in metrics}
        self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self._bar.close()


def _require(module: str, extra: str, sink: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingPackageError(f"metric_logging: {sink} needs the {module} package, which is not installed; "
                                  f"pip install 'tunekit[{extra}]' (or remove the sink from metric_logging)")


def _kept_run_id(run: RunInfo, name: str) -> str | None:
    """The run id an earlier start of this run kept in ``logs/<name>``, when resuming."""
    path = run.log_dir / name
    if run.initial_step == 0 or not path.is_file():
        return None
    return path.read_text().strip() or None


def _keep_run_id(run: RunInfo, name: str, run_id: str) -> None:
    run.log_dir.mkdir(parents=True, exist_ok=True)
    (run.log_dir / name).write_text(run_id + "\n")


class WandbSink:
    """A Weights & Biases run (``pip install 'tunekit[wandb]'``); its files go to
    ``<output_dir>/logs/wandb/``, the resolved config and versions to the run's config. The run id
    is kept in ``logs/wandb_run_id``, so a resumed run continues the same W&B run.

    Args: ``project``, ``entity``, ``name``, ``group``, ``tags``, ``notes`` as in ``wandb.init``;
    ``mode``: ``online``, ``offline`` (sync later with ``wandb sync``) or ``disabled``; null
    leaves it to W&B (``WANDB_MODE``, default online).
    """

    def __init__(self, project: str | None = "tunekit", entity: str | None = None, name: str | None = None,
                 group: str | None = None, tags: list[str] | None = None, notes: str | None = None,
                 mode: str | None = None):
        _require("wandb", "wandb", "WandbSink")
        self._init_kwargs = {"project": project, "entity": entity, "name": name, "group": group,
                             "tags": list(tags) if tags else None, "notes": notes, "mode": mode}

    def open(self, run: RunInfo) -> None:
        import wandb

        run_id = _kept_run_id(run, "wandb_run_id")
        run.log_dir.mkdir(parents=True, exist_ok=True)
        config = {**(run.config or {}), "versions": run.versions}
        self._run = wandb.init(**self._init_kwargs, dir=str(run.log_dir), config=config, id=run_id,
                               resume="allow" if run_id else None)
        _keep_run_id(run, "wandb_run_id", self._run.id)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        # W&B history steps only grow: after a resume, the steps the interrupted run already logged
        # (up to run.step) would be refused with a warning each, so they are not sent again
        if step >= self._run.step:
            self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


_MLFLOW_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def mlflow_key(name: str) -> str:
    """``name`` as an MLflow metric/param key: MLflow allows letters, digits, ``_ - . /`` and
    spaces (``rewards/accuracies`` stays as is), in a normalised relative path (no empty, ``.``
    or ``..`` parts); anything else becomes ``_``."""
    parts = [p.replace("..", "__") for p in _MLFLOW_BAD_CHARS.sub("_", name).split("/") if p not in ("", ".")]
    return "/".join(parts) or "_"


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[mlflow_key(f"{prefix}{key}")] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return flat


_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


class MlflowSink:
    """An MLflow run (``pip install 'tunekit[mlflow]'``: the mlflow-skinny client, for tracking
    servers ``http(s)://...``, Databricks and ``file:`` stores; a local database store such as
    MLflow's default ``sqlite:///mlflow.db`` needs the full ``pip install mlflow``). The run gets
    the flattened config as params, the versions as tags and ``config.yaml`` as an artifact; its
    id is kept in ``logs/mlflow_run_id`` so a resumed run continues it.

    Args: ``tracking_uri`` (null: MLflow's own, ``MLFLOW_TRACKING_URI`` or its default),
    ``experiment`` (created when missing), ``run_name``.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "tunekit", run_name: str | None = None):
        _require("mlflow", "mlflow", "MlflowSink")
        self._tracking_uri, self._experiment, self._run_name = tracking_uri, experiment, run_name

    def open(self, run: RunInfo) -> None:
        import mlflow
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = self._tracking_uri or mlflow.get_tracking_uri()
        if uri.split(":", 1)[0].split("+", 1)[0] in _DATABASE_SCHEMES and importlib.util.find_spec("sqlalchemy") is None:
            raise MissingPackageError(
                f"metric_logging: MlflowSink's tracking URI {uri} is a database store, which needs the full mlflow "
                "package (pip install mlflow); or set its tracking_uri (or MLFLOW_TRACKING_URI) to a tracking server")
        self._client = client = MlflowClient(tracking_uri=uri)
        run_id = _kept_run_id(run, "mlflow_run_id")
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
        else:
            found = client.get_experiment_by_name(self._experiment)
            experiment_id = found.experiment_id if found is not None else client.create_experiment(self._experiment)
            tags = {f"tunekit.version.{k}": v for k, v in run.versions.items()}
            run_id = client.create_run(experiment_id, run_name=self._run_name, tags=tags).info.run_id
            params = [Param(k, v) for k, v in _flatten(run.config or {}).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per call
                client.log_batch(run_id, params=params[i:i + 100])
            _keep_run_id(run, "mlflow_run_id", run_id)
        self._run_id = run_id
        if (run.output_dir / "config.yaml").is_file():
            client.log_artifact(run_id, str(run.output_dir / "config.yaml"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(mlflow_key(k), float(v), now, step) for k, v in _numbers(metrics)]
        if rows:
            self._client.log_batch(self._run_id, metrics=rows)

    def close(self) -> None:
        self._client.set_terminated(self._run_id)
