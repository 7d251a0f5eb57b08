"""Run lm-evaluation-harness tasks on a tunekit model: an ``lm_eval.api.model.LM`` over a tunekit
model and tokenizer (``pip install lm-eval``; an optional package, imported only here).

    from lm_eval import simple_evaluate
    lm = lm_eval_model(model, tokenizer, batch_size=16)
    results = simple_evaluate(model=lm, tasks=["arc_easy", "hellaswag"])

- ``loglikelihood``: lm-eval's context/continuation split (:func:`encode_pair`), summed token
  log-probs and ``is_greedy`` from one right-padded forward per batch;
- ``loglikelihood_rolling``: the text after the BOS token (EOS without one), in lm-eval's disjoint
  rolling windows of the model's positions;
- ``generate_until``: greedy (or ``do_sample`` with ``temperature``) with the KV cache, prompts
  left-truncated to leave room for ``max_gen_toks``, the text cut at the first ``until`` string.
Single process: with a sharded model every rank must make the same calls.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunekit.config.errors import MissingPackageError
from tunekit.evaluation.loglikelihood import continuation_log_likelihoods, encode_pair
from tunekit.evaluation.tasks import cut_at
from tunekit.generation import generate_ids, max_positions

LM_EVAL_HINT = "pip install lm-eval"


def _lm_base() -> type:
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise MissingPackageError(f"running lm-eval tasks needs the optional 'lm-eval' package (lm_eval): "
                                  f"{LM_EVAL_HINT}") from None
    return LM


def lm_eval_model(model: nn.Module, tokenizer, *, batch_size: int = 16, device: torch.device | str | None = None,
                  max_gen_toks: int = 256):
    """An ``lm_eval.api.model.LM`` that scores and generates with ``model`` and ``tokenizer``
    (a tunekit tokenizer). ``max_gen_toks``: the default for requests that do not set it."""
    base = _lm_base()

    class TunekitLM(base):
        def __init__(self):
            super().__init__()
            self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
            self._device = device if device is not None else next(model.parameters()).device
            self.max_length = max_positions(model) or 2048
            self.max_gen_toks = max_gen_toks

        @property
        def prefix_token_id(self) -> int:
            return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id

        def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            return continuation_log_likelihoods(self.model, pairs, batch_size=self.batch_size, device=self._device,
                                                pad_id=tokenizer.pad_id, need_greedy=True)

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return self._score([encode_pair(tokenizer, context, continuation)
                                for context, continuation in (r.args for r in requests)])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
            out = []
            for (text, *_) in (r.args for r in requests):
                ids = tokenizer.encode(text, add_bos=False, add_eos=False)
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)]
                out.append(sum(ll for ll, _ in self._score(windows)))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = [""] * len(requests)
            groups: dict[tuple, list[int]] = {}  # one generate call per batch of equal settings
            for i, r in enumerate(requests):
                groups.setdefault(_generation_key(r.args[1], self.max_gen_toks), []).append(i)
            for (until, max_new, temperature), members in groups.items():
                room = self.max_length - max_new
                prompts = {i: tokenizer.encode(requests[i].args[0], add_bos=True, add_eos=False)[-room:]
                           for i in members}
                members = sorted(members, key=lambda i: len(prompts[i]))
                for start in range(0, len(members), self.batch_size):
                    chunk = members[start:start + self.batch_size]
                    new_ids = generate_ids(self.model, [prompts[i] for i in chunk], max_new_tokens=max_new,
                                           stop_tokens=tokenizer.stop_tokens, pad_id=tokenizer.pad_id,
                                           device=self._device, temperature=temperature)
                    for i, ids in zip(chunk, new_ids):
                        out[i] = cut_at(tokenizer.decode(ids, skip_special_tokens=True), until)
            return out

    return TunekitLM()


def _generation_key(gen_kwargs: dict[str, Any], default_max: int) -> tuple[tuple[str, ...], int, float]:
    """``(until, max_gen_toks, temperature)`` of an lm-eval ``generate_until`` request (greedy
    unless ``do_sample``)."""
    until = gen_kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0) if gen_kwargs.get("do_sample") else 0.0
    return until, int(gen_kwargs.get("max_gen_toks", default_max)), temperature
