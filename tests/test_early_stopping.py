"""keep_best, early_stopping and the overfitting warning (tunekit.training.early_stopping): the
rules on made-up numbers, the best-folder link of the step-folder format, and end-to-end runs on a
tiny random Llama whose validation loss is made to rise: four training conversations trained for
many epochs, validated on the same prompts with conflicting answers, so the validation loss first
falls (the model learns the format) and then rises (it memorises the training answers)."""

import json
import logging
import os

import pytest
import torch
from test_recipes_single_device import (  # noqa: F401
    _SignalAtStep,
    load_recipe,
    make_cfg,
    read_metrics,
    tiny_run,
)

from tunekit.checkpoint.errors import CheckpointError
from tunekit.checkpoint.step_folders import (
    best_checkpoint,
    commit_step_folder,
    link_best,
    new_tmp_folder,
)
from tunekit.config import ConfigError
from tunekit.training.early_stopping import (
    OVERFIT_EVALS,
    Decision,
    ValidationWatch,
    improves,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

OFF = {"metric": None, "mode": "min"}


def watch_of(keep_best=None, early_stopping=None, evaluated=("val_loss", "forget_loss")):
    early = {"metric": None, "patience": 1, "min_delta": 0.0, "mode": "min", **(early_stopping or {})}
    return ValidationWatch({**OFF, **(keep_best or {})}, early, evaluated=evaluated)


# -- the rules -------------------------------------------------------------------------------

def test_improves_by_more_than_min_delta_in_either_direction():
    assert improves(1.0, None, mode="min") and improves(0.0, None, mode="max")
    assert improves(0.9, 1.0, mode="min") and not improves(1.0, 1.0, mode="min")
    assert not improves(0.95, 1.0, mode="min", min_delta=0.05) and improves(0.94, 1.0, mode="min", min_delta=0.05)
    assert improves(0.8, 0.7, mode="max") and not improves(0.7, 0.8, mode="max")
    assert not improves(0.74, 0.7, mode="max", min_delta=0.05)
    for bad in (float("nan"), float("inf"), float("-inf")):
        assert not improves(bad, None, mode="min") and not improves(bad, 1.0, mode="max")


def feed(watch, rows):
    """Step the watch through ``rows`` of metrics; returns {step: Decision} where not the default."""
    out = {}
    for step, metrics in enumerate(rows, start=1):
        decision = watch.update(step, metrics)
        if decision != Decision():
            out[step] = decision
    return out


# val_loss evaluated every second step: best 1.0 at step 4, then three evaluations without a
# better value by more than 0.05 (0.98 improves on 1.0 by less) -> stop at step 10
VAL = [None, 2.0, None, 1.0, None, 0.98, None, 1.1, None, 1.2, None, 0.5]
ROWS = [{"loss": 3.0 - 0.1 * i, **({} if v is None else {"val_loss": v, "forget_loss": 5.0})}
        for i, v in enumerate(VAL)]


def test_keep_best_saves_each_new_best_and_early_stopping_counts_evaluations():
    watch = watch_of({"metric": "val_loss"}, {"metric": "val_loss", "patience": 3, "min_delta": 0.05})
    decisions = feed(watch, ROWS[:10])
    assert decisions == {2: Decision(save=True), 4: Decision(save=True), 6: Decision(save=True),
                         10: Decision(save=True, stop=True)}
    assert watch.best_record == {"step": 6, "metric": "val_loss", "value": 0.98, "mode": "min"}
    assert (watch.early.value, watch.early.step, watch.early.bad_evals) == (1.0, 4, 3)


def test_max_mode_on_a_preference_metric_and_nothing_without_an_evaluation():
    watch = watch_of({"metric": "eval_rewards/accuracies", "mode": "max"}, evaluated=["eval_*"])
    rows = [{"loss": 1.0}, {"loss": 0.9, "eval_loss": 0.6, "eval_rewards/accuracies": 0.5}, {"loss": 0.8},
            {"loss": 0.7, "eval_loss": 0.7, "eval_rewards/accuracies": 0.75},
            {"loss": 0.6, "eval_loss": 0.8, "eval_rewards/accuracies": 0.25}]
    assert feed(watch, rows) == {2: Decision(save=True), 4: Decision(save=True)}
    assert watch.best_record["step"] == 4 and watch.best_record["value"] == 0.75
    assert feed(watch_of(), rows) == {}  # both off: the watch only warns


def test_state_dict_round_trip_continues_with_the_same_decisions():
    cfg = ({"metric": "val_loss"}, {"metric": "val_loss", "patience": 3, "min_delta": 0.05})
    whole = feed(watch_of(*cfg), ROWS[:10])
    for cut in range(1, 10):
        first = watch_of(*cfg)
        before = feed(first, ROWS[:cut])
        state = torch.load(_saved(first.state_dict()), weights_only=True)  # as recipe_state/ holds it
        second = watch_of(*cfg)
        second.load_state_dict(state)
        after = {step: d for step, d in ((s, second.update(s, m)) for s, m in enumerate(ROWS[cut:10], start=cut + 1))
                 if d != Decision()}
        assert {**before, **after} == whole, cut


def _saved(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_a_changed_metric_on_resume_starts_that_watch_afresh():
    first = watch_of({"metric": "val_loss"})
    feed(first, ROWS[:4])
    second = watch_of({"metric": "forget_loss"})
    second.load_state_dict(first.state_dict())
    assert second.best_record is None
    watch_of({"metric": "val_loss"}).load_state_dict(None)  # a checkpoint from before these keys


def test_overfitting_warning_after_consecutive_evaluations_of_falling_train_and_rising_val_loss(caplog):
    # the mean training loss since the previous evaluation: steps (1,2), (3,4), ...
    train = [3.0, 2.0, 1.9, 1.8, 1.5, 1.5, 1.2, 1.2, 1.0, 1.0, 0.9, 0.9]
    val = [None, 2.0, None, 2.1, None, 2.2, None, 1.0, None, 1.1, None, 1.2]
    rows = [{"loss": t, **({} if v is None else {"val_loss": v})} for t, v in zip(train, val)]
    # a falling training loss alone is not enough: also the validation loss must rise, OVERFIT_EVALS times in a row
    rows += [{"loss": 0.8}, {"loss": 0.8, "val_loss": 1.3}]
    assert OVERFIT_EVALS == 3
    with caplog.at_level(logging.WARNING, logger="tunekit.training.early_stopping"):
        feed(watch_of(), rows)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # evaluations at 2, 4, 6 rise, 8 falls (streak broken), 10, 12, 14 rise again
    assert len(warned) == 1 and warned[0].startswith("warning: step 14:"), warned
    assert "training loss fell (1.2000 -> 0.8000) while val_loss rose (1.0000 -> 1.3000)" in warned[0]


def test_a_metric_the_run_does_not_evaluate_is_a_config_error_at_start_up():
    with pytest.raises(ConfigError, match=r"keep_best.metric: val_loss is not evaluated by this run \(it evaluates "
                                          r"forget_loss\); set val_dataset \(it is null\)"):
        watch_of({"metric": "val_loss"}, evaluated=["forget_loss"])
    with pytest.raises(ConfigError, match="early_stopping.metric: val_los .*did you mean val_loss"):
        watch_of(early_stopping={"metric": "val_los"})
    with pytest.raises(ConfigError, match="eval_loss .*it evaluates nothing: no held-out dataset is set.*val_dataset"):
        watch_of({"metric": "eval_loss"}, evaluated=[])
    # a preference metric that this loss does not produce is known at the first evaluation
    watch = watch_of({"metric": "eval_rewards/accuracies", "mode": "max"}, evaluated=["eval_*"])
    with pytest.raises(ConfigError, match=r"eval_rewards/accuracies is not among this run's evaluation metrics "
                                          r"\(eval_loss, eval_logps/chosen\)"):
        watch.update(1, {"loss": 1.0, "eval_loss": 1.0, "eval_logps/chosen": -3.0})


# -- the best folder in the step-folder format ------------------------------------------------------

def _commit(out, step, best=None, keep_last_n=1):
    tmp = new_tmp_folder(out, step)
    (tmp / "weights").write_text(str(step))
    return commit_step_folder(tmp, step, keep_last_n=keep_last_n, best=best)


def test_the_best_folder_survives_keep_last_n_and_is_linked_relatively(tmp_path):
    best = {"step": 2, "metric": "val_loss", "value": 0.5, "mode": "min"}
    _commit(tmp_path, 1)
    _commit(tmp_path, 2, best)
    for step in (3, 4):
        _commit(tmp_path, step, best)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "best.json", "step_2", "step_4"]
    assert os.readlink(tmp_path / "best") == "step_2"  # relative: the output_dir can be moved whole
    assert (tmp_path / "best" / "weights").read_text() == "2"
    assert json.loads((tmp_path / "best.json").read_text()) == {**best, "folder": "step_2"}
    assert best_checkpoint(tmp_path) == tmp_path / "step_2"
    # a new best moves the link and frees the old best folder (beyond keep_last_n)
    _commit(tmp_path, 5, {**best, "step": 5, "value": 0.4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "best.json", "step_5"]
    assert os.readlink(tmp_path / "best") == "step_5"
    moved = tmp_path.parent / "moved"
    os.rename(tmp_path, moved)
    assert (moved / "best" / "weights").read_text() == "5"


def test_link_best_replaces_the_link_atomically_and_refuses_a_real_folder(tmp_path, monkeypatch):
    for step in (1, 2):
        (tmp_path / f"step_{step}").mkdir()
    link_best(tmp_path, {"step": 1})
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((os.path.basename(a), os.path.basename(b))),
                                                     real_replace(a, b)))
    link_best(tmp_path, {"step": 2})
    # written beside and renamed over: a reader never sees no link
    assert (f".best.tmp-{os.getpid()}", "best") in replaced and (f".best.json.tmp-{os.getpid()}", "best.json") in replaced
    assert os.readlink(tmp_path / "best") == "step_2" and not list(tmp_path.glob(".best*"))
    link_best(tmp_path, {"step": 7})  # no such folder (resumed elsewhere): the link stays
    assert os.readlink(tmp_path / "best") == "step_2"
    (tmp_path / "best").unlink()
    (tmp_path / "best").mkdir()
    with pytest.raises(CheckpointError, match="best exists and is not a link"):
        link_best(tmp_path, {"step": 1})


# -- end to end ---------------------------------------------------------------------------------------

full_recipe = load_recipe("full_finetune_single_device")


@pytest.fixture(scope="module")
def overfit_data(tiny_run):  # noqa: F811  (the imported fixture)
    """(checkpoint_dir, data_dir) with ``few.jsonl`` (4 training conversations) and ``conflict.jsonl``
    (the same prompts answered with the words in their original order instead of reversed)."""
    ckpt, data = tiny_run
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()[:4]]
    conflict = [{"messages": [m[0], {"role": "assistant", "content": m[0]["content"].split(": ", 1)[1]}]}
                for m in (r["messages"] for r in rows)]
    for name, items in (("few", rows), ("conflict", conflict)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return ckpt, data


def overfit_cfg(overfit_data, out, *extra, config="tiny/full"):
    _, data = overfit_data
    return make_cfg(config, overfit_data, out, f"dataset.source={data}/few.jsonl",
                    f"val_dataset.source={data}/conflict.jsonl", "forget_dataset=null", "optimizer.lr=3e-2",
                    "max_steps=30", "epochs=100", "eval_every_n_steps=1", "save_every_n_steps=100", "keep_last_n=1",
                    "keep_best.metric=val_loss", *extra)


def expected_decisions(rows, patience):
    """The reference rule over the logged val_loss: (best step, stop step or None)."""
    best_step, best, bad = None, None, 0
    for row in rows:
        if best is None or row["val_loss"] < best:
            best_step, best, bad = row["step"], row["val_loss"], 0
        else:
            bad += 1
            if bad >= patience:
                return best_step, row["step"]
    return best_step, None


def step_folders(out):
    return sorted(p.name for p in out.iterdir() if p.name.startswith("step_"))


def test_keep_best_keeps_and_links_the_best_folder_past_keep_last_n_and_warns_of_overfitting(overfit_data, tmp_path,
                                                                                              caplog):
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="tunekit.training.early_stopping"):
        full_recipe.main(overfit_cfg(overfit_data, out, "max_steps=20", "save_every_n_steps=5"))
    rows = read_metrics(out)
    assert len(rows) == 20
    best_step, _ = expected_decisions(rows, patience=10**6)
    assert best_step < 15 and rows[-1]["val_loss"] > rows[best_step - 1]["val_loss"] + 0.2  # it did overfit
    assert rows[-1]["loss"] < rows[best_step - 1]["loss"] - 0.5
    assert step_folders(out) == sorted([f"step_{best_step}", "step_20"])  # keep_last_n=1, plus the best
    assert os.readlink(out / "best") == f"step_{best_step}"
    record = json.loads((out / "best.json").read_text())
    assert record == {"step": best_step, "metric": "val_loss", "value": rows[best_step - 1]["val_loss"], "mode": "min",
                      "folder": f"step_{best_step}"}
    # the warning wherever the last OVERFIT_EVALS evaluations each had a lower training and a higher val loss
    overfit = [s for s in range(OVERFIT_EVALS + 1, len(rows) + 1)
               if all(rows[i]["loss"] < rows[i - 1]["loss"] and rows[i]["val_loss"] > rows[i - 1]["val_loss"]
                      for i in range(s - OVERFIT_EVALS, s))]
    warned = [int(r.getMessage().split()[2].rstrip(":")) for r in caplog.records if r.levelno == logging.WARNING]
    assert overfit and warned == overfit


@pytest.mark.parametrize("interrupt", ["ctrl_c", "resume_from"])
def test_early_stopping_stops_saves_and_decides_the_same_across_a_resume(overfit_data, tmp_path, monkeypatch,
                                                                          interrupt):
    args = ("early_stopping.metric=val_loss", "early_stopping.patience=3")
    whole = tmp_path / "whole"
    full_recipe.main(overfit_cfg(overfit_data, whole, *args))
    rows = read_metrics(whole)
    best_step, stop_step = expected_decisions(rows, patience=3)
    assert stop_step is not None and stop_step < 30 and rows[-1]["step"] == stop_step
    assert step_folders(whole) == [f"step_{best_step}", f"step_{stop_step}"]  # stopped and saved
    assert os.readlink(whole / "best") == f"step_{best_step}"

    # the same run stopped one step after its best (Ctrl-C), or continued from its saved best folder
    # in a fresh output_dir: the patience count, best value and loss history come back
    out = tmp_path / "resumed"
    if interrupt == "ctrl_c":
        monkeypatch.setattr(full_recipe, "training_steps", _SignalAtStep(full_recipe.training_steps, at=best_step + 1))
        full_recipe.main(overfit_cfg(overfit_data, out, *args))
        monkeypatch.undo()
        assert step_folders(out) == [f"step_{best_step}", f"step_{best_step + 1}"]
        full_recipe.main(overfit_cfg(overfit_data, out, *args, "resume=true"))
    else:
        full_recipe.main(overfit_cfg(overfit_data, out, *args, f"resume_from={whole / f'step_{best_step}'}"))
    resumed = read_metrics(out)
    assert [r["val_loss"] for r in resumed[-(stop_step - best_step):]] == [r["val_loss"] for r in rows[best_step:]]
    assert resumed[-1]["step"] == stop_step
    assert step_folders(out) == ([f"step_{best_step}", f"step_{stop_step}"] if interrupt == "ctrl_c"
                                 else [f"step_{stop_step}"])  # the best folder stayed in the first output_dir
    if interrupt == "ctrl_c":
        assert os.readlink(out / "best") == f"step_{best_step}"


lora_recipe = load_recipe("lora_finetune_single_device")


def test_a_watched_metric_without_its_dataset_stops_the_run_before_training(overfit_data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="keep_best.metric: val_loss is not evaluated by this run .*set val_dataset"):
        lora_recipe.main(overfit_cfg(overfit_data, out, "val_dataset=null", config="tiny/lora"))
    assert not (out / "logs").exists()


def test_two_processes_stop_together_at_the_step_their_evaluations_decide(overfit_data, tmp_path):
    """full_finetune_distributed on 2 CPU ranks (global batch 4 as above): every rank takes the
    same keep_best / early_stopping decisions (a disagreement would leave one rank in a save's
    collectives and the launch would hang or fail)."""
    from native_crash import retry_after_native_crash
    from test_recipes_distributed import launch, two_procs, wait

    def run(attempt):
        (ckpt, data), out = overfit_data, tmp_path / f"dist{attempt}"
        args = [f"{k}={v}" for k, v in (  # overfit_cfg's values, with 2 examples per rank
            ("output_dir", out), ("checkpoint_dir", ckpt), ("device", "cpu"), ("dtype", "fp32"),
            ("dataset.source", data / "few.jsonl"), ("val_dataset.source", data / "conflict.jsonl"),
            ("forget_dataset", "null"), ("batch_size", 2), ("max_steps", 30), ("epochs", 100), ("optimizer.lr", 3e-2),
            ("eval_every_n_steps", 1), ("eval_max_batches", 2), ("save_every_n_steps", 100), ("keep_last_n", 1),
            ("keep_best.metric", "val_loss"), ("early_stopping.metric", "val_loss"), ("early_stopping.patience", 2),
            ("log_every_n_steps", 1), ("lr_scheduler.num_warmup_steps", 1), ("metric_logging.tensorboard", "false"),
            ("metric_logging.progress_bar", "false"))]
        log_path = tmp_path / f"dist{attempt}.log"
        wait([(launch(two_procs(), "full_finetune_distributed", "tiny/full", args, log_path), log_path)])
        return out, log_path

    out, log_path = retry_after_native_crash(run)
    rows = read_metrics(out)
    best_step, stop_step = expected_decisions(rows, patience=2)
    assert stop_step is not None and rows[-1]["step"] == stop_step < 30
    assert step_folders(out) == [f"step_{best_step}", f"step_{stop_step}"]
    assert os.readlink(out / "best") == f"step_{best_step}"
    assert log_path.read_text().count(f"early stopping at step {stop_step}") == 1  # rank 0 says it, once


def test_the_preference_recipe_keeps_the_step_of_best_eval_accuracy(tiny_run, tmp_path):  # noqa: F811
    """lora_dpo_single_device with ``keep_best: {metric: eval_rewards/accuracies, mode: max}``: the
    first step reaching the highest held-out accuracy is kept past keep_last_n=1; ``eval_loss``
    without a ``val_dataset`` is a config error at start-up."""
    from test_recipes_preference import dpo_recipe
    from test_recipes_preference import make_cfg as dpo_cfg

    out = tmp_path / "run"
    dpo_recipe.main(dpo_cfg(tiny_run, out, "max_steps=4", "epochs=2", "eval_every_n_steps=1", "keep_last_n=1",
                            "keep_best.metric=eval_rewards/accuracies", "keep_best.mode=max"))
    evaluated = [(r["step"], r["eval_rewards/accuracies"]) for r in read_metrics(out)]
    best_step = max(evaluated, key=lambda sv: (sv[1], -sv[0]))[0]
    assert step_folders(out) == sorted({f"step_{best_step}", "step_4"})
    assert os.readlink(out / "best") == f"step_{best_step}"
    with pytest.raises(ConfigError, match="keep_best.metric: eval_loss is not evaluated by this run .*val_dataset"):
        dpo_recipe.main(dpo_cfg(tiny_run, tmp_path / "b", "val_dataset=null", "keep_best.metric=eval_loss"))
