"""Overfitting practice for the training recipes, from the numbers of their periodic evaluations:

- ``keep_best: {metric, mode}`` keeps the step folder with the best value of an evaluated metric
  (``val_loss``, ``forget_loss``, the preference recipes' ``eval_loss``,
  ``eval_rewards/accuracies`` with ``mode: max``, ...) even when ``keep_last_n`` would delete it,
  linked as ``<output_dir>/best`` (and named in ``best.json``). A new best is saved at once, so
  ``best`` always holds the best evaluated weights, not merely the best of the periodic saves.
- ``early_stopping: {metric, patience, min_delta, mode}`` ends the run (saving a checkpoint, as
  Ctrl-C does) once the metric has not improved on its best by more than ``min_delta`` for
  ``patience`` consecutive evaluations (Keras' and transformers' ``EarlyStopping`` rule).
- A warning line when the training loss (the mean over the steps since the previous evaluation)
  fell while the validation loss rose at each of the last ``OVERFIT_EVALS`` evaluations.

A recipe holds one :class:`ValidationWatch` and calls :meth:`ValidationWatch.update` after each
optimizer step with the step's metrics; the returned :class:`Decision` says whether to save and
whether to stop. Its state goes into ``recipe_state/`` (``tunekit.training.resume``), so a resumed
run takes the decisions of the uninterrupted one.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tunekit.config.errors import ConfigError, did_you_mean
from tunekit.training.process_group import broadcast_from_rank0, log_rank_zero

log = logging.getLogger("tunekit.training.early_stopping")

MODES = ("min", "max")
OVERFIT_EVALS = 3  # consecutive evaluations of falling training loss and rising validation loss
VALIDATION_LOSSES = ("val_loss", "eval_loss")  # the SFT and the preference recipes' held-out loss
# which dataset key produces a metric (for the error when that dataset is null)
_METRIC_SOURCES = {"val_loss": "val_dataset", "eval_*": "val_dataset", "forget_loss": "forget_dataset"}


def improves(value: float, best: float | None, *, mode: str, min_delta: float = 0.0) -> bool:
    """True when ``value`` beats ``best`` by more than ``min_delta`` (lower for ``mode="min"``,
    higher for ``"max"``); any finite value beats ``best=None``; NaN and inf never improve."""
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


@dataclass(frozen=True)
class Decision:
    """What the recipe does after a step: ``save`` a checkpoint now (a new best, or stopping) and
    ``stop`` the run after that save (early stopping)."""

    save: bool = False
    stop: bool = False


@dataclass
class _Tracked:
    """The best value of one metric so far, at which step, and the evaluations since then that
    did not improve on it."""

    metric: str
    mode: str
    min_delta: float = 0.0
    value: float | None = None
    step: int | None = None
    bad_evals: int = 0

    def update(self, value: float, step: int) -> bool:
        if improves(value, self.value, mode=self.mode, min_delta=self.min_delta):
            self.value, self.step, self.bad_evals = value, step, 0
            return True
        self.bad_evals += 1
        return False

    def state_dict(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "value": self.value, "step": self.step,
                "bad_evals": self.bad_evals}

    def load_state_dict(self, state: Mapping | None) -> None:
        # a resumed run that watches another metric (or mode) starts that watch afresh
        if state and state["metric"] == self.metric and state["mode"] == self.mode:
            self.value, self.step, self.bad_evals = state["value"], state["step"], state["bad_evals"]
        elif state:
            log_rank_zero(log, f"resume: the checkpoint watched {state['metric']} ({state['mode']}), this run "
                               f"{self.metric} ({self.mode}): its best value starts afresh")


class ValidationWatch:
    """``keep_best`` / ``early_stopping`` (the config sections, ``metric: null`` = off) and the
    overfitting warning over a run's evaluations. ``evaluated``: the metric names the run's
    evaluation produces (``fnmatch`` patterns, e.g. ``eval_*``); a watched metric outside them is a
    config error here, at start-up, rather than at the first evaluation."""

    def __init__(self, keep_best: Mapping[str, Any], early_stopping: Mapping[str, Any], *, evaluated: Iterable[str]):
        self.evaluated = list(evaluated)
        self.best = self.early = None
        if keep_best["metric"] is not None:
            self._check_metric("keep_best", keep_best["metric"])
            self.best = _Tracked(keep_best["metric"], keep_best["mode"])
        if early_stopping["metric"] is not None:
            self._check_metric("early_stopping", early_stopping["metric"])
            self.early = _Tracked(early_stopping["metric"], early_stopping["mode"], early_stopping["min_delta"])
            self.patience = early_stopping["patience"]
        self.history: list[tuple[float, float]] = []  # (mean training loss, validation loss) per evaluation
        self.train_sum, self.train_steps = 0.0, 0  # training losses since the previous evaluation

    def _check_metric(self, key: str, metric: str) -> None:
        if any(fnmatch.fnmatchcase(metric, pattern) for pattern in self.evaluated):
            return
        produced = ", ".join(self.evaluated) or "nothing: no held-out dataset is set"
        source = next((k for pattern, k in _METRIC_SOURCES.items() if fnmatch.fnmatchcase(metric, pattern)), None)
        fix = (f"set {source} (it is null), or watch another metric" if source is not None
               else "choose one of them" + did_you_mean(metric, self.evaluated))
        raise ConfigError(f"{key}.metric: {metric} is not evaluated by this run (it evaluates {produced}); {fix}, "
                          f"or set {key}.metric=null")

    @property
    def best_record(self) -> dict | None:
        """``{"step", "metric", "value", "mode"}`` of the best evaluation so far (``keep_best``), or None."""
        if self.best is None or self.best.step is None:
            return None
        return {"step": self.best.step, "metric": self.best.metric, "value": self.best.value, "mode": self.best.mode}

    def _is_evaluation(self, metrics: Mapping[str, float]) -> bool:
        return any(fnmatch.fnmatchcase(k, pattern) for k in metrics for pattern in self.evaluated)

    def update(self, step: int, metrics: Mapping[str, float]) -> Decision:
        """Account for optimizer step ``step`` (its training ``loss``) and, when ``metrics`` holds
        an evaluation, take the decisions. Under a process group every rank calls it; rank 0's
        state is broadcast after each evaluation, so every rank takes the same decision."""
        self.train_sum += float(metrics["loss"])
        self.train_steps += 1
        if not self._is_evaluation(metrics):
            return Decision()
        decision = Decision()
        if self.best is not None and self.best.update(self._value(metrics, self.best.metric, "keep_best"), step):
            decision = Decision(save=True)
        if self.early is not None:
            self.early.update(self._value(metrics, self.early.metric, "early_stopping"), step)
            if self.early.bad_evals >= self.patience:
                log_rank_zero(log, f"early stopping at step {step}: {self.early.metric} has not improved on "
                                   f"{self.early.value:.4g} (step {self.early.step}) by more than "
                                   f"{self.early.min_delta:g} for {self.early.bad_evals} evaluations")
                decision = Decision(save=True, stop=True)
        self._watch_overfitting(step, metrics)
        self.train_sum, self.train_steps = 0.0, 0
        # the eval numbers are equal on every rank already; rank 0's verdict makes it certain
        state, decision = broadcast_from_rank0((self.state_dict(), decision))
        self.load_state_dict(state)
        return decision

    def _value(self, metrics: Mapping[str, float], metric: str, key: str) -> float:
        if metric not in metrics:
            available = ", ".join(k for k in metrics if self._is_evaluation({k: 0.0}))
            raise ConfigError(f"{key}.metric: {metric} is not among this run's evaluation metrics ({available})"
                              + did_you_mean(metric, metrics))
        return float(metrics[metric])

    def _watch_overfitting(self, step: int, metrics: Mapping[str, float]) -> None:
        name = next((k for k in VALIDATION_LOSSES if k in metrics), None)
        if name is None or self.train_steps == 0:
            return
        self.history = [*self.history, (self.train_sum / self.train_steps, float(metrics[name]))][-OVERFIT_EVALS - 1:]
        pairs = list(zip(self.history, self.history[1:]))
        if len(pairs) == OVERFIT_EVALS and all(b[0] < a[0] and b[1] > a[1] for a, b in pairs):
            (train0, val0), (train1, val1) = self.history[0], self.history[-1]
            log_rank_zero(log, f"warning: step {step}: over the last {OVERFIT_EVALS} evaluations the training loss "
                               f"fell ({train0:.4f} -> {train1:.4f}) while {name} rose ({val0:.4f} -> {val1:.4f}): "
                               "the model is overfitting; keep_best / early_stopping keep or stop at the best step "
                               "(docs/recipes.md)", logging.WARNING)

    def state_dict(self) -> dict:
        """Plain values only (``recipe_state/`` is read with ``weights_only=True``)."""
        return {"keep_best": None if self.best is None else self.best.state_dict(),
                "early_stopping": None if self.early is None else self.early.state_dict(),
                "history": [list(h) for h in self.history], "train_sum": self.train_sum,
                "train_steps": self.train_steps}

    def load_state_dict(self, state: Mapping | None) -> None:
        """Restore :meth:`state_dict` (None: a checkpoint written before these keys existed; start afresh)."""
        if state is None:
            return
        if self.best is not None:
            self.best.load_state_dict(state["keep_best"])
        if self.early is not None:
            self.early.load_state_dict(state["early_stopping"])
        self.history = [tuple(h) for h in state["history"]]
        self.train_sum, self.train_steps = state["train_sum"], state["train_steps"]
