"""The metric sinks of ``metric_logging`` (stdout, jsonl, TensorBoard, progress bar, W&B offline,
MLflow with a local file store), the ``MetricLogger`` that feeds them, the config schema of the
section, and the run record (``config.yaml`` with the versions) in ``output_dir``."""

import glob
import json
import struct
import sys
import time

import pytest
import torch
import yaml
from omegaconf import OmegaConf

import tunekit.config
from tunekit.config import ConfigError
from tunekit.config.errors import MissingPackageError
from tunekit.config.schema import Components, check_schema
from tunekit.training.metric_logging import MetricLogger
from tunekit.training.metric_sinks import (
    JsonlSink,
    MlflowSink,
    ProgressBarSink,
    TensorBoardSink,
    WandbSink,
    mlflow_key,
)
from tunekit.training.run_record import write_run_config

# a row as the preference recipes log it: TRL-style names with '/', a tensor, an int
ROWS = {step: {"loss": 1.0 / step, "rewards/accuracies": 0.25 * step, "lr": torch.tensor(0.5), "tokens": 10 * step}
        for step in (1, 2, 3, 4)}


def _config(lr=1e-4):
    return OmegaConf.create({"output_dir": "run", "resume": False, "resume_from": None,
                             "optimizer": {"_component_": "torch.optim.AdamW", "lr": lr},
                             "scaled": "${optimizer.lr}"})


def _run(out, sinks, steps, *, initial_step=0, config=None, total_steps=4):
    with MetricLogger(out, sinks, config=config, total_steps=total_steps, initial_step=initial_step,
                      log_every=2) as logger:
        for step in steps:
            logger.log(step, ROWS[step])


def test_builtin_sinks_from_config_nodes(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sinks = OmegaConf.create({name: {"_component_": f"tunekit.training.metric_sinks.{cls}"} for name, cls in (
        ("stdout", "StdoutSink"), ("jsonl", "JsonlSink"), ("tensorboard", "TensorBoardSink"),
        ("progress_bar", "ProgressBarSink"))} | {"off": False, "also_off": None})
    _run(tmp_path, sinks, [1, 2, 3], config=_config())
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"], r["rewards/accuracies"], r["lr"], r["tokens"]) for r in rows] == [
        (1, 1.0, 0.25, 0.5, 10), (2, 0.5, 0.5, 0.5, 20), (3, 1 / 3, 0.75, 0.5, 30)]
    assert isinstance(rows[0]["tokens"], int) and all(r["time"] > 1e9 for r in rows)
    events = EventAccumulator(str(tmp_path / "logs" / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("rewards/accuracies")] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    captured = capsys.readouterr()
    assert "step=2 loss=0.5 rewards/accuracies=0.5 lr=0.5 tokens=20" in captured.out
    assert "step=1 " not in captured.out and "step=3 " not in captured.out  # log_every=2
    assert "3/4" in captured.err  # the progress bar
    assert (tmp_path / "config.yaml").is_file()


def test_resume_drops_rows_after_the_resume_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _run(tmp_path, [JsonlSink(), TensorBoardSink()], [1, 2, 3])
    _run(tmp_path, [JsonlSink(), TensorBoardSink()], [2, 3, 4], initial_step=1)
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    events = EventAccumulator(str(tmp_path / "logs" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]


def test_a_sink_that_fails_to_open_closes_the_others(tmp_path):
    class Broken:
        def open(self, run):
            raise RuntimeError("cannot open")

    bar = ProgressBarSink()
    with pytest.raises(RuntimeError, match="cannot open"):
        MetricLogger(tmp_path, [bar, Broken()], total_steps=2)
    assert bar._bar.disable  # tqdm.close() disables the bar


def test_components_schema_and_validate_catch_mistakes():
    spec = {"metric_logging": Components()}
    ok = [{"a": {"_component_": "x.Y"}, "b": None, "c": False}, [{"_component_": "x.Y"}], {}, []]
    for value in ok:
        assert check_schema(OmegaConf.create({"metric_logging": value}), spec) == []
    bad = check_schema(OmegaConf.create({"metric_logging": {"a": True, "b": {"x": 1}}}), spec)
    expected = "expected a mapping with _component_ (or null / false to switch it off), got"
    assert bad == [f"metric_logging.a: {expected} True", f"metric_logging.b: {expected} {{'x': 1}}"]
    assert check_schema(OmegaConf.create({"metric_logging": [None]}), spec) == [
        "metric_logging.0: expected a mapping with _component_, got None"]
    assert "expected a mapping of names" in check_schema(OmegaConf.create({"metric_logging": 3}), spec)[0]

    # a shipped config: sinks switch off with false, their arguments and names are checked
    from tunekit.config import validate
    from tunekit.training import recipe_config as recipe

    schema = {**recipe.RUN_KEYS, **recipe.MODEL_AND_DATA_KEYS, **recipe.TRAINING_LOOP_KEYS, "fsdp": recipe.FSDP,
              "lora": recipe.LORA}  # lora_finetune_single_device's keys
    validate(tunekit.config.load("tiny/lora", ["metric_logging.tensorboard=false"]), schema=schema)
    cfg = tunekit.config.load("tiny/lora", [
        "+metric_logging.wandb={_component_: tunekit.training.metric_sinks.WandbSink, projct: x}",
        "metric_logging.stdout=tunekit.training.metric_sinks.StdotSink"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, schema=schema)
    assert "metric_logging.wandb.projct: no such argument of tunekit.training.metric_sinks.WandbSink; " \
           "did you mean project?" in str(err.value)
    assert "did you mean tunekit.training.metric_sinks.StdoutSink?" in str(err.value)


@pytest.mark.parametrize("sink,extra", [(WandbSink, "wandb"), (MlflowSink, "mlflow")])
def test_missing_package_is_one_user_error_naming_the_extra(monkeypatch, tmp_path, sink, extra):
    monkeypatch.setitem(sys.modules, extra, None)  # as if not installed: find_spec returns None
    with pytest.raises(MissingPackageError, match=rf"pip install 'tunekit\[{extra}\]'"):
        MetricLogger(tmp_path, OmegaConf.create({extra: {"_component_": f"{sink.__module__}.{sink.__name__}"}}),
                     config=_config(), total_steps=2)
    assert not (tmp_path / "config.yaml").exists()  # nothing written before the error


def test_run_record_keeps_the_original_config_across_resumes(tmp_path):
    first = write_run_config(tmp_path, _config(), step=0)
    text = first.read_text()
    assert first == tmp_path / "config.yaml" and text.startswith("# the resolved config of this run")
    assert f"torch {torch.__version__}" in text and "tunekit " in text and "python 3." in text
    record = yaml.safe_load(text)
    assert record["scaled"] == 1e-4 and record["optimizer"]["lr"] == 1e-4  # interpolation resolved
    # a resume that only sets resume=true: nothing new
    resumed = _config()
    resumed.resume = True
    assert write_run_config(tmp_path, resumed, step=3) == first and first.read_text() == text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    # a resume with another lr: its config beside the original
    changed = write_run_config(tmp_path, _config(lr=5e-5), step=5)
    assert changed.name == "config.step_5.yaml" and yaml.safe_load(changed.read_text())["optimizer"]["lr"] == 5e-5
    assert first.read_text() == text
    # versions differ (another torch): also kept beside
    (tmp_path / "config.yaml").write_text(text.replace(f"torch {torch.__version__}", "torch 2.0.0"))
    assert write_run_config(tmp_path, _config(), step=7).name == "config.step_7.yaml"
    # a fresh start (step 0) in the same folder writes config.yaml anew
    write_run_config(tmp_path, _config(lr=1.0), step=0)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optimizer"]["lr"] == 1.0


def test_mlflow_key_follows_mlflow_rules():
    assert mlflow_key("rewards/accuracies") == "rewards/accuracies"
    assert mlflow_key("loss (val)") == "loss _val_"
    assert mlflow_key("/a//b/./../c:d@") == "a/b/__/c_d_"
    validation = pytest.importorskip("mlflow.utils.validation")
    for name in ("rewards/accuracies", "/a//b/./../c:d@", "x" * 10, "é/ü", "."):
        validation._validate_metric_name(mlflow_key(name))  # raises when MLflow refuses it


def _wandb_records(path):
    """The records of a W&B transaction log (``run-<id>.wandb``): a 7-byte header, then 32 KiB
    blocks of chunks (crc32c: 4 bytes, length: 2, type: 1 = full, 2/3/4 = first/middle/last)
    holding serialized ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, block, chunks, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # no room for a chunk header: the block is padded
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return records


def _finished_records(path, timeout=60.0):
    """The records of a run's log once it holds the run's ``exit`` record: W&B's service process
    writes the log asynchronously and may still be at it when ``finish()`` has returned."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = _wandb_records(path)
            if records and records[-1].WhichOneof("record_type") == "exit":
                return records
        except Exception:  # a record half written: read again
            if time.monotonic() > deadline:
                raise
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s"
        time.sleep(0.1)


def _wandb_history(run_dir, runs):
    paths = sorted(glob.glob(str(run_dir / "logs" / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(paths) == runs, paths
    rows, run_ids = {}, set()
    for path in paths:
        for record in _finished_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_ids.add(record.run.run_id)
                config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
            elif kind == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                rows.setdefault(row["_step"], []).append({k: v for k, v in row.items() if not k.startswith("_")})
    return rows, run_ids, config


def test_wandb_offline_run_holds_the_metrics_and_resume_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    sink = {"wandb": {"_component_": "tunekit.training.metric_sinks.WandbSink", "project": "tests", "tags": ["t"]}}
    _run(out, OmegaConf.create(sink), [1, 2, 3], config=_config())
    run_id = (out / "logs" / "wandb_run_id").read_text().strip()
    rows, run_ids, config = _wandb_history(out, runs=1)
    assert run_ids == {run_id}
    assert rows == {s: [{"loss": 1.0 / s, "rewards/accuracies": 0.25 * s, "lr": 0.5, "tokens": 10 * s}] for s in (1, 2, 3)}
    assert config["optimizer"] == {"_component_": "torch.optim.AdamW", "lr": 1e-4}
    assert config["versions"]["torch"] == torch.__version__

    # a resume from step 2 continues the same run (id), from the step after it
    _run(out, OmegaConf.create(sink), [3, 4], initial_step=2, config=_config())
    rows, run_ids, _ = _wandb_history(out, runs=2)
    assert run_ids == {run_id} and (out / "logs" / "wandb_run_id").read_text().strip() == run_id
    assert rows[4] == [{"loss": 0.25, "rewards/accuracies": 1.0, "lr": 0.5, "tokens": 40}]
    # a fresh run in another folder is another W&B run
    _run(tmp_path / "other", OmegaConf.create(sink), [1])
    assert (tmp_path / "other" / "logs" / "wandb_run_id").read_text().strip() != run_id


def test_mlflow_file_store_holds_the_metrics_and_resume_continues_the_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.x refuses file stores without it
    uri = f"file:{tmp_path / 'mlruns'}"
    out = tmp_path / "run"
    sink = {"mlflow": {"_component_": "tunekit.training.metric_sinks.MlflowSink", "tracking_uri": uri,
                       "experiment": "tests", "run_name": "first"}}
    _run(out, OmegaConf.create(sink), [1, 2, 3], config=_config())
    run_id = (out / "logs" / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "first"
    assert run.data.params["optimizer.lr"] == "0.0001" and run.data.params["resume"] == "False"
    assert run.data.tags["tunekit.version.torch"] == torch.__version__
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]
    history = client.get_metric_history(run_id, "rewards/accuracies")
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.5), (3, 0.75)]

    _run(out, OmegaConf.create(sink), [3, 4], initial_step=2, config=_config())
    assert (out / "logs" / "mlflow_run_id").read_text().strip() == run_id
    assert len(client.search_runs([run.info.experiment_id])) == 1
    # MLflow cannot delete rows: the re-run step 3 is there twice, step 4 once
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss")) == [
        (1, 1.0), (2, 0.5), (3, 1 / 3), (3, 1 / 3), (4, 0.25)]
    assert client.get_run(run_id).info.status == "FINISHED"
