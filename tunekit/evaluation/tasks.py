"""Benchmark-style evaluation tasks on local JSONL (or any source ``tunekit.data`` reads), scored the
way lm-evaluation-harness scores them. docs/evaluation.md shows the configs.

- :func:`multiple_choice_task` (MMLU / HellaSwag / ARC style; rows like
  ``{"question": ..., "choices": [...], "answer": 2}``): each choice's continuation
  ``target_delimiter + choice`` is scored by its summed token log-likelihood after the prompt
  ``template.format(**row)``. ``acc``: the most likely choice is the answer; ``acc_norm``: the
  same after dividing each log-likelihood by the choice's length in characters (lm-eval's
  ``acc_norm``; ties go to the first choice, as ``np.argmax``).
- :func:`generation_task` (GSM8K style; rows like ``{"question": ..., "answer": "... #### 72"}``):
  greedy answers with the KV cache, cut at the first ``until`` string, the answer taken by
  ``answer_regex`` (lm-eval's regex filter), then lm-eval's ``exact_match`` normalisation
  (``regexes_to_ignore`` on both sides, ``ignore_case``, ``ignore_punctuation``).

A task is built with the tokenizer (``instantiate(node, tokenizer)``, like a dataset) and run with
``task.evaluate(model, device=...)`` -> :class:`TaskResult`. Sharded models: every rank runs every
example (FSDP needs every rank in each forward) and gets the same numbers.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunekit.data.errors import DataError
from tunekit.data.sources import load_rows
from tunekit.evaluation.loglikelihood import continuation_log_likelihoods, encode_pair
from tunekit.generation import generate_ids


@dataclass
class TaskResult:
    """``metrics``: name -> value (``acc``, ``acc_norm`` or ``exact_match``, in [0, 1]);
    ``predictions``: one dict per example (what was scored and how)."""

    metrics: dict[str, float]
    predictions: list[dict[str, Any]]


class EvalTask:
    """A task built with its tokenizer: ``name`` (metric prefix) and ``evaluate(model, device=)``."""

    name: str

    def evaluate(self, model: nn.Module, *, device: torch.device | str | None = None) -> TaskResult:
        raise NotImplementedError


def _render(template: str, row: dict, where: str) -> str:
    try:
        return template.format(**row)
    except (KeyError, IndexError) as e:
        raise DataError(f"the task's template {template!r} needs {e} which the row does not have "
                        f"(fields: {', '.join(row)})", where=where) from None


def _field(row: dict, key: str, where: str) -> Any:
    if key not in row:
        raise DataError(f"missing (fields: {', '.join(row)}); set the task's *_field to the right name",
                        where=where, field=key)
    return row[key]


def _read_rows(source: str, limit: int | None):
    rows = load_rows(source)
    n = len(rows) if limit is None else min(limit, len(rows))
    if n == 0:
        raise DataError("holds no rows", where=str(source))
    return [(rows[i], rows.where(i)) for i in range(n)]


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first of equals, as np.argmax


class MultipleChoiceTask(EvalTask):
    """Rows as ``(context, choices, gold index)``; see :func:`multiple_choice_task`."""

    def __init__(self, tokenizer, docs: list[tuple[str, list[str], int]], *, name: str,
                 target_delimiter: str = " ", batch_size: int = 32):
        self.tokenizer, self.docs, self.name = tokenizer, docs, name
        self.target_delimiter, self.batch_size = target_delimiter, batch_size

    def requests(self) -> list[tuple[list[int], list[int]]]:
        """One ``(context_ids, continuation_ids)`` per (example, choice), example by example."""
        return [encode_pair(self.tokenizer, context, self.target_delimiter + choice)
                for context, choices, _ in self.docs for choice in choices]

    def evaluate(self, model: nn.Module, *, device: torch.device | str | None = None) -> TaskResult:
        lls = [ll for ll, _ in continuation_log_likelihoods(model, self.requests(), batch_size=self.batch_size,
                                                             device=device, pad_id=self.tokenizer.pad_id)]
        predictions, k = [], 0
        for context, choices, gold in self.docs:
            scores = lls[k:k + len(choices)]
            k += len(choices)
            pred = _argmax(scores)
            pred_norm = _argmax([s / len(c) if c else -math.inf for s, c in zip(scores, choices)])
            predictions.append({"context": context, "choices": choices, "answer": gold, "loglikelihoods": scores,
                                "prediction": pred, "prediction_norm": pred_norm,
                                "correct": pred == gold, "correct_norm": pred_norm == gold})
        n = len(predictions)
        return TaskResult({"acc": sum(p["correct"] for p in predictions) / n,
                           "acc_norm": sum(p["correct_norm"] for p in predictions) / n}, predictions)


def multiple_choice_task(tokenizer, source: str, *, name: str | None = None, template: str = "{question}",
                         target_delimiter: str = " ", choices_field: str = "choices", answer_field: str = "answer",
                         limit: int | None = None, batch_size: int = 32) -> MultipleChoiceTask:
    """A multiple-choice log-likelihood task from ``source`` (a JSONL file, or any source
    ``tunekit.data`` reads).

    Args:
        template: the prompt, ``str.format``-ed with the row (``"Question: {question}\\nAnswer:"``
            is lm-eval's ARC prompt; ``{choices[0]}`` indexes a list field).
        target_delimiter: put before each choice (lm-eval's default ``" "``).
        choices_field: the row's list of choice strings; answer_field: the gold choice, its
            0-based index or its text.
        limit: the first ``limit`` rows only (null: all); name: the metric prefix (default: the
            file's stem); batch_size: sequences per forward.
    """
    docs = []
    for row, where in _read_rows(source, limit):
        context = _render(template, row, where)
        choices = _field(row, choices_field, where)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError("expected a list of at least 2 strings", where=where, field=choices_field)
        answer = _field(row, answer_field, where)
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(f"expected the index (0..{len(choices) - 1}) or the text of a choice, got {answer!r}",
                            where=where, field=answer_field)
        docs.append((context, choices, answer))
    return MultipleChoiceTask(tokenizer, docs, name=name or Path(str(source)).stem,
                              target_delimiter=target_delimiter, batch_size=batch_size)


def regex_extract(text: str, pattern: str | None, group_select: int = 0, fallback: str = "[invalid]") -> str:
    """lm-eval's ``regex`` filter: the ``group_select``-th match of ``pattern`` in ``text`` (for a
    pattern with groups, the first non-empty group of that match), stripped; ``fallback`` when
    nothing matches. ``pattern`` None: the whole text."""
    if pattern is None:
        return text
    matches = re.findall(pattern, text)
    if not matches:
        return fallback
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), fallback)
    return match.strip()


def normalize_answer(text: str, *, regexes_to_ignore: Sequence[str] = (), ignore_case: bool = False,
                     ignore_punctuation: bool = False) -> str:
    """lm-eval's ``exact_match`` normalisation, applied to prediction and reference alike."""
    for pattern in regexes_to_ignore:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text


class GenerationTask(EvalTask):
    """Prompts and references; see :func:`generation_task`."""

    def __init__(self, tokenizer, prompts: list[list[int]], references: list[str], *, name: str,
                 max_new_tokens: int, until: Sequence[str] = (), answer_regex: str | None = None,
                 group_select: int = 0, fallback: str = "[invalid]", regexes_to_ignore: Sequence[str] = (),
                 ignore_case: bool = False, ignore_punctuation: bool = False, batch_size: int = 32):
        self.tokenizer, self.prompts, self.references, self.name = tokenizer, prompts, references, name
        self.max_new_tokens, self.until, self.batch_size = max_new_tokens, list(until), batch_size
        self.answer_regex, self.group_select, self.fallback = answer_regex, group_select, fallback
        self.normalize = {"regexes_to_ignore": list(regexes_to_ignore), "ignore_case": ignore_case,
                          "ignore_punctuation": ignore_punctuation}

    def responses(self, model: nn.Module, *, device: torch.device | str | None = None) -> list[str]:
        """Greedy response text per prompt (KV cache, ``batch_size`` prompts of similar lengths per
        call), cut before the first ``until`` string."""
        return [cut_at(text, self.until) for text in greedy_texts(
            model, self.tokenizer, self.prompts, batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens, device=device)]

    def evaluate(self, model: nn.Module, *, device: torch.device | str | None = None) -> TaskResult:
        predictions = []
        for response, reference in zip(self.responses(model, device=device), self.references):
            extracted = regex_extract(response, self.answer_regex, self.group_select, self.fallback)
            pred, ref = normalize_answer(extracted, **self.normalize), normalize_answer(reference, **self.normalize)
            predictions.append({"response": response, "extracted": extracted, "reference": reference,
                                "normalized": [pred, ref], "correct": pred == ref})
        return TaskResult({"exact_match": sum(p["correct"] for p in predictions) / len(predictions)}, predictions)


def cut_at(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any ``until`` string (lm-eval's ``generate_until``)."""
    cut = min((i for i in (text.find(s) for s in until if s) if i >= 0), default=len(text))
    return text[:cut]


def greedy_texts(model: nn.Module, tokenizer, prompts: list[list[int]], *, batch_size: int, max_new_tokens: int,
                 device: torch.device | str | None = None) -> list[str]:
    """Greedy answer text for every prompt (KV cache), ``batch_size`` prompts per generate call,
    prompts of similar lengths together (less padding); stops at the tokenizer's stop tokens."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        new_ids = generate_ids(model, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens,
                               stop_tokens=tokenizer.stop_tokens, pad_id=tokenizer.pad_id, device=device)
        for i, ids in zip(chunk, new_ids):
            answers[i] = tokenizer.decode(ids, skip_special_tokens=True)
    return answers


def generation_task(tokenizer, source: str, *, name: str | None = None,
                    template: str = "Question: {question}\nAnswer:", answer_field: str = "answer",
                    chat: bool = False, max_new_tokens: int = 32, until: list[str] | None = None,
                    answer_regex: str | None = None, group_select: int = 0, fallback: str = "[invalid]",
                    regexes_to_ignore: list[str] | None = None, ignore_case: bool = False,
                    ignore_punctuation: bool = False, limit: int | None = None,
                    batch_size: int = 32) -> GenerationTask:
    """An exact-match generation task from ``source`` (GSM8K style; the lm-eval ``gsm8k`` task's
    settings are in docs/evaluation.md).

    Args:
        template: the prompt, ``str.format``-ed with the row; chat: send it as one user message
            through the tokenizer's chat format (with the assistant generation prompt) instead of
            as plain text after BOS.
        answer_field: the reference answer (a number is read as its text).
        max_new_tokens: greedy tokens per answer (generation also stops at the tokenizer's stop
            tokens); until: the response is cut before the first of these strings.
        answer_regex, group_select, fallback: lm-eval's regex filter (null: the whole response).
        regexes_to_ignore, ignore_case, ignore_punctuation: lm-eval's exact_match options.
        limit, name, batch_size: as in :func:`multiple_choice_task` (batch_size: prompts per
            generate call).
    """
    prompts, references = [], []
    for row, where in _read_rows(source, limit):
        text = _render(template, row, where)
        if chat:
            prompts.append(tokenizer.tokenize_messages([{"role": "user", "content": text}],
                                                       add_generation_prompt=True)[0])
        else:
            prompts.append(tokenizer.encode(text, add_bos=True, add_eos=False))
        answer = _field(row, answer_field, where)
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise DataError(f"expected a string or a number, got {answer!r}", where=where, field=answer_field)
        references.append(str(answer))
    if answer_regex is not None:
        try:
            re.compile(answer_regex)
        except re.error as e:
            raise DataError(f"answer_regex {answer_regex!r} is not a valid regular expression: {e}",
                            where=str(source)) from None
    return GenerationTask(tokenizer, prompts, references, name=name or Path(str(source)).stem,
                          max_new_tokens=max_new_tokens, until=until or (), answer_regex=answer_regex,
                          group_select=group_select, fallback=fallback, regexes_to_ignore=regexes_to_ignore or (),
                          ignore_case=ignore_case, ignore_punctuation=ignore_punctuation, batch_size=batch_size)
