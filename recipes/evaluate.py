"""Evaluate a chat model on a held-out set (perplexity of the reference answers and exact-match of
its greedy answers) and on benchmark-style tasks (multiple choice, GSM8K-style exact match).

    tunekit run evaluate --config tiny/evaluate                                        # base model
    tunekit run evaluate --config tiny/evaluate checkpoint_dir=/tmp/tunekit/tiny_lora  # after LoRA

``checkpoint_dir`` is a Hugging Face model folder or a training ``output_dir`` (its newest
``step_<N>/`` is used); ``adapter_dir`` optionally adds a PEFT adapter on top.

- perplexity = exp(mean token cross-entropy over the labelled tokens), the tokens a fine-tune
  trains on (the assistant replies and their end-of-turn tokens);
- exact-match: for each conversation the model answers its prompt (every message before the last,
  which must be the assistant's) greedily with the KV cache, in batches; the answer counts when
  its text, stripped of surrounding whitespace, equals the reference's.

- ``tasks``: a list of task components (tunekit.evaluation: ``multiple_choice_task``: ``acc`` and
  ``acc_norm`` as lm-evaluation-harness computes them; ``generation_task``: ``exact_match`` after
  regex extraction); ``dataset: null`` runs the tasks only.

Prints one summary line; writes ``<output_dir>/eval.json`` (the numbers),
``<output_dir>/predictions.jsonl`` (one line per example) and ``<output_dir>/tasks/<name>.jsonl``
(one line per task example). docs/generation.md and docs/evaluation.md explain every key.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

import tunekit.config
from tunekit.config import ConfigError, instantiate
from tunekit.generation import load_inference_model
from tunekit.training.data_loaders import eval_loader
from tunekit.training.device import get_device, get_dtype
from tunekit.losses.cross_entropy import count_label_tokens
from tunekit.config.schema import Component, Int, List, Str
from tunekit.evaluation import greedy_texts
from tunekit.models.vocabulary import check_tokenizer_fits
from tunekit.training.device import device_problem
from tunekit.training.recipe_config import DTYPES
from tunekit.training.train_step import evaluate_loss

log = logging.getLogger("tunekit.recipes.evaluate")

# Every key this recipe reads; `tunekit validate` checks a config against it (docs/generation.md).
CONFIG = {
    "output_dir": Str(), "checkpoint_dir": Str(), "adapter_dir": Str(nullable=True),
    "device": Str(check=device_problem), "dtype": Str(choices=DTYPES), "model": Component(),
    "tokenizer": Component(), "dataset": Component(nullable=True), "batch_size": Int(min=1),
    "max_new_tokens": Int(min=1), "tasks": List(Component(), min_len=0, nullable=True),
}


def prompts_and_references(dataset, tokenizer) -> tuple[list[list[int]], list[str]]:
    """Each conversation's prompt ids (every message but the last, plus the assistant generation
    prompt) and its reference answer (the last message, which must be the assistant's)."""
    if not hasattr(dataset, "transformed"):
        raise ConfigError("dataset: exact-match needs the conversations; use an unpacked dataset (dataset.packed=false)")
    prompts, references = [], []
    for i in range(len(dataset)):
        messages = dataset.transformed(i)
        if isinstance(messages, str) or messages[-1]["role"] != "assistant":
            raise ConfigError(f"{dataset.where(i)}: the last message must be the assistant's reference answer")
        tokens, _ = tokenizer.tokenize_messages(messages[:-1], add_generation_prompt=True)
        prompts.append(tokens)
        references.append(messages[-1]["content"])
    return prompts, references


def main(cfg) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = get_device(cfg.device)
    dtype = get_dtype(cfg.dtype, device)

    model = load_inference_model(cfg, device=device, dtype=dtype)  # sets cfg.checkpoint_dir to the model folder
    log.info(f"model: {cfg.checkpoint_dir}" + (f" + adapter {cfg.adapter_dir}" if cfg.adapter_dir is not None else ""))
    tokenizer = instantiate(cfg.tokenizer)
    check_tokenizer_fits(tokenizer, model, model_source=cfg.checkpoint_dir)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, summary = {"model": cfg.checkpoint_dir, "adapter": cfg.adapter_dir}, []
    if cfg.dataset is not None:
        results.update(evaluate_chat(cfg, model, tokenizer, device, out))
        summary.append(f"exact_match={100 * results['exact_match']:.1f}% ({results['num_correct']}/"
                       f"{results['num_examples']}) perplexity={results['perplexity']:.3f} (loss {results['loss']:.4f} "
                       f"over {results['num_label_tokens']} tokens) in {results['seconds']:.1f} s")
    if cfg.tasks:
        results["tasks"] = evaluate_tasks(cfg.tasks, model, tokenizer, device, out)
        summary += [f"{name}: " + " ".join(f"{k}={100 * v:.1f}%" for k, v in metrics.items()
                                          if k not in ("num_examples", "seconds"))
                    + f" ({metrics['num_examples']} examples) in {metrics['seconds']:.1f} s"
                    for name, metrics in results["tasks"].items()]
    if not summary:
        raise ConfigError("nothing to evaluate: set dataset (a chat dataset) or tasks (a list of task components)")
    (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    print("; ".join(summary) + f" -> {out / 'eval.json'}")


def evaluate_chat(cfg, model, tokenizer, device: torch.device, out: Path) -> dict:
    """Perplexity of ``cfg.dataset``'s reference answers and exact-match of the greedy answers;
    writes ``predictions.jsonl``."""
    dataset = instantiate(cfg.dataset, tokenizer)
    if len(dataset) == 0:
        raise ConfigError(f"dataset: {cfg.dataset.source} holds no examples")
    start = time.perf_counter()
    loader = eval_loader(dataset, batch_size=cfg.batch_size, num_workers=0)
    loss = evaluate_loss(model, loader, device=device)
    num_label_tokens = sum(count_label_tokens(batch["labels"]) for batch in loader)
    prompts, references = prompts_and_references(dataset, tokenizer)
    answers = greedy_texts(model, tokenizer, prompts, batch_size=cfg.batch_size,
                           max_new_tokens=cfg.max_new_tokens, device=device)
    correct = [a.strip() == r.strip() for a, r in zip(answers, references)]
    seconds = time.perf_counter() - start
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"index": i, "prediction": a, "reference": r, "correct": ok}) + "\n"
                     for i, (a, r, ok) in enumerate(zip(answers, references, correct)))
    return {"num_examples": len(references), "exact_match": sum(correct) / max(len(correct), 1),
            "num_correct": sum(correct), "perplexity": math.exp(loss), "loss": loss,
            "num_label_tokens": num_label_tokens, "max_new_tokens": cfg.max_new_tokens, "seconds": round(seconds, 3)}


def evaluate_tasks(nodes, model, tokenizer, device: torch.device, out: Path) -> dict[str, dict[str, float]]:
    """Each task's metrics (and ``num_examples``, ``seconds``); writes ``tasks/<name>.jsonl``."""
    tasks = [instantiate(node, tokenizer) for node in nodes]
    names = [task.name for task in tasks]
    if len(set(names)) < len(names):
        raise ConfigError(f"tasks: two tasks share a name ({', '.join(names)}); set name= on one of them")
    (out / "tasks").mkdir(exist_ok=True)
    results = {}
    for task in tasks:
        start = time.perf_counter()
        result = task.evaluate(model, device=device)
        results[task.name] = {**result.metrics, "num_examples": len(result.predictions),
                              "seconds": round(time.perf_counter() - start, 3)}
        with open(out / "tasks" / f"{task.name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"index": i, **p}) + "\n" for i, p in enumerate(result.predictions))
    return results

if __name__ == "__main__":
    with tunekit.config.user_errors():
        main(tunekit.config.parse(sys.argv[1:], CONFIG))
