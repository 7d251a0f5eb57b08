"""Benchmark-style evaluation: multiple-choice log-likelihood and exact-match generation tasks
scored as lm-evaluation-harness scores them, and an adapter that runs lm-eval's own tasks on a
tunekit model (``lm_eval`` installed). Used by ``recipes/evaluate.py`` and, as the ``eval_tasks``
of the training recipes, for periodic "forgetting" evaluation. See docs/evaluation.md."""

from tunekit.evaluation.lm_eval_adapter import lm_eval_model
from tunekit.evaluation.loglikelihood import continuation_log_likelihoods, encode_pair
from tunekit.evaluation.tasks import (
    EvalTask,
    GenerationTask,
    MultipleChoiceTask,
    TaskResult,
    cut_at,
    generation_task,
    greedy_texts,
    multiple_choice_task,
    normalize_answer,
    regex_extract,
)

__all__ = ["EvalTask", "GenerationTask", "MultipleChoiceTask", "TaskResult", "continuation_log_likelihoods", "cut_at",
           "encode_pair", "generation_task", "greedy_texts", "lm_eval_model", "multiple_choice_task", "normalize_answer",
           "regex_extract"]
