"""Evaluate a chat model on a held-out set: perplexity of the reference answers and exact-match of
its greedy answers.

    tunekit run evaluate --config tiny/evaluate                                        # base model
    tunekit run evaluate --config tiny/evaluate checkpoint_dir=/tmp/tunekit/tiny_lora  # after LoRA

``checkpoint_dir`` is a Hugging Face model folder or a training ``output_dir`` (its newest
``step_<N>/`` is used); ``adapter_dir`` optionally adds a PEFT adapter on top.

- perplexity = exp(mean token cross-entropy over the labelled tokens), the tokens a fine-tune
  trains on (the assistant replies and their end-of-turn tokens);
- exact-match: for each conversation the model answers its prompt (every message before the last,
  which must be the assistant's) greedily with the KV cache, in batches; the answer counts when
  its text, stripped of surrounding whitespace, equals the reference's.

Prints one summary line; writes ``<output_dir>/eval.json`` (the numbers) and
``<output_dir>/predictions.jsonl`` (one line per example). docs/generation.md explains every key.
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
from tunekit.generation import generate_ids, load_inference_model
from tunekit.training.data_loaders import eval_loader
from tunekit.training.device import get_device, get_dtype
from tunekit.losses.cross_entropy import count_label_tokens
from tunekit.config.schema import Component, Int, Str
from tunekit.models.vocabulary import check_tokenizer_fits
from tunekit.training.device import device_problem
from tunekit.training.recipe_config import DTYPES
from tunekit.training.train_step import evaluate_loss

log = logging.getLogger("tunekit.recipes.evaluate")

# Every key this recipe reads; `tunekit validate` checks a config against it (docs/generation.md).
CONFIG = {
    "output_dir": Str(), "checkpoint_dir": Str(), "adapter_dir": Str(nullable=True),
    "device": Str(check=device_problem), "dtype": Str(choices=DTYPES), "model": Component(),
    "tokenizer": Component(), "dataset": Component(), "batch_size": Int(min=1), "max_new_tokens": Int(min=1),
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


def greedy_answers(model, tokenizer, prompts: list[list[int]], *, batch_size: int, max_new_tokens: int,
                   device: torch.device) -> list[str]:
    """Greedy answer text for every prompt, generated ``batch_size`` prompts at a time."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths batch together: less padding
    answers = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        new_ids = generate_ids(model, [prompts[i] for i in chunk], max_new_tokens=max_new_tokens,
                               stop_tokens=tokenizer.stop_tokens, pad_id=tokenizer.pad_id, device=device)
        for i, ids in zip(chunk, new_ids):
            answers[i] = tokenizer.decode(ids, skip_special_tokens=True)
    return answers


def main(cfg) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = get_device(cfg.device)
    dtype = get_dtype(cfg.dtype, device)

    model = load_inference_model(cfg, device=device, dtype=dtype)  # sets cfg.checkpoint_dir to the model folder
    log.info(f"model: {cfg.checkpoint_dir}" + (f" + adapter {cfg.adapter_dir}" if cfg.adapter_dir is not None else ""))
    tokenizer = instantiate(cfg.tokenizer)
    check_tokenizer_fits(tokenizer, model, model_source=cfg.checkpoint_dir)
    dataset = instantiate(cfg.dataset, tokenizer)
    if len(dataset) == 0:
        raise ConfigError(f"dataset: {cfg.dataset.source} holds no examples")

    start = time.perf_counter()
    loader = eval_loader(dataset, batch_size=cfg.batch_size, num_workers=0)
    loss = evaluate_loss(model, loader, device=device)
    num_label_tokens = sum(count_label_tokens(batch["labels"]) for batch in loader)
    prompts, references = prompts_and_references(dataset, tokenizer)
    answers = greedy_answers(model, tokenizer, prompts, batch_size=cfg.batch_size,
                             max_new_tokens=cfg.max_new_tokens, device=device)
    correct = [a.strip() == r.strip() for a, r in zip(answers, references)]
    seconds = time.perf_counter() - start

    results = {"model": cfg.checkpoint_dir, "adapter": cfg.adapter_dir, "num_examples": len(references),
               "exact_match": sum(correct) / max(len(correct), 1), "num_correct": sum(correct),
               "perplexity": math.exp(loss), "loss": loss, "num_label_tokens": num_label_tokens,
               "max_new_tokens": cfg.max_new_tokens, "seconds": round(seconds, 3)}
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for i, (a, r, ok) in enumerate(zip(answers, references, correct)):
            f.write(json.dumps({"index": i, "prediction": a, "reference": r, "correct": ok}) + "\n")
    print(f"exact_match={100 * results['exact_match']:.1f}% ({sum(correct)}/{len(correct)}) "
          f"perplexity={results['perplexity']:.3f} (loss {loss:.4f} over {num_label_tokens} tokens) "
          f"in {seconds:.1f} s -> {out / 'eval.json'}")


if __name__ == "__main__":
    with tunekit.config.user_errors():
        main(tunekit.config.parse(sys.argv[1:], CONFIG))
