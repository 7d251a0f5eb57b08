"""Generate a completion for one prompt (a chat message or plain text) and print it.

    tunekit run generate --config tiny/generate prompt="What is 3 + 4?"
    tunekit run generate --config tiny/generate checkpoint_dir=/tmp/tunekit/tiny_lora prompt="Add 2 and five."
    tunekit run generate --config tiny/generate adapter_dir=/tmp/tunekit/tiny_lora/step_294/adapter

``checkpoint_dir`` is a Hugging Face model folder or a training ``output_dir`` (its newest
``step_<N>/`` is used); ``adapter_dir`` optionally adds a PEFT adapter on top. With ``chat: true``
the prompt is a user message rendered with the tokenizer's chat format. docs/generation.md
explains every config key.
"""

from __future__ import annotations

import logging
import sys
import time

import torch

import tunekit.config
from tunekit.config import instantiate
from tunekit.generation import check_sampling_args, generate_ids, load_inference_model
from tunekit.training.device import get_device, get_dtype
from tunekit.config.schema import Bool, Component, Float, Int, Str
from tunekit.models.vocabulary import check_tokenizer_fits
from tunekit.training.device import device_problem
from tunekit.training.recipe_config import DTYPES

log = logging.getLogger("tunekit.recipes.generate")

# Every key this recipe reads; `tunekit validate` checks a config against it (docs/generation.md).
CONFIG = {
    "checkpoint_dir": Str(), "adapter_dir": Str(nullable=True), "device": Str(check=device_problem),
    "dtype": Str(choices=DTYPES), "seed": Int(min=0), "model": Component(), "tokenizer": Component(),
    "prompt": Str(check=lambda v: None if v else "must not be empty"), "chat": Bool(),
    "system_prompt": Str(nullable=True), "max_new_tokens": Int(min=1), "temperature": Float(min=0),
    "top_k": Int(min=1, nullable=True), "top_p": Float(min=0, min_exclusive=True, max=1, nullable=True),
}


def prompt_tokens(cfg, tokenizer) -> list[int]:
    """The prompt's ids: a chat turn ending in the assistant's generation prompt, or plain text
    with BOS (no EOS)."""
    if not cfg.chat:
        return tokenizer.encode(cfg.prompt, add_bos=True, add_eos=False)
    messages = [{"role": "user", "content": cfg.prompt}]
    if cfg.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": cfg.system_prompt})
    tokens, _ = tokenizer.tokenize_messages(messages, add_generation_prompt=True)
    return tokens


def main(cfg) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    check_sampling_args(cfg.temperature, cfg.top_k, cfg.top_p)
    device = get_device(cfg.device)
    dtype = get_dtype(cfg.dtype, device)

    model = load_inference_model(cfg, device=device, dtype=dtype)  # sets cfg.checkpoint_dir to the model folder
    log.info(f"model: {cfg.checkpoint_dir}" + (f" + adapter {cfg.adapter_dir}" if cfg.adapter_dir is not None else ""))
    tokenizer = instantiate(cfg.tokenizer)
    check_tokenizer_fits(tokenizer, model, model_source=cfg.checkpoint_dir)

    tokens = prompt_tokens(cfg, tokenizer)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    start = time.perf_counter()
    [new_ids] = generate_ids(model, [tokens], max_new_tokens=cfg.max_new_tokens, stop_tokens=tokenizer.stop_tokens,
                             pad_id=tokenizer.pad_id, device=device, temperature=cfg.temperature, top_k=cfg.top_k,
                             top_p=cfg.top_p, generator=generator)
    seconds = time.perf_counter() - start
    print(tokenizer.decode(new_ids, skip_special_tokens=True))
    log.info(f"{len(new_ids)} new tokens in {seconds:.2f} s ({len(new_ids) / seconds:.1f} tokens/s), "
             f"prompt {len(tokens)} tokens")


if __name__ == "__main__":
    with tunekit.config.user_errors():
        main(tunekit.config.parse(sys.argv[1:], CONFIG))
