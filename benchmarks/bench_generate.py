"""Generation speed: KV-cache decoding vs recomputing the full forward every step, and the
evaluate recipe's workload (328 addition questions on the shipped tiny Llama).

    python benchmarks/bench_generate.py                       # both workloads, 2 threads
    python benchmarks/bench_generate.py --threads 1 --repeats 5

Workload "bench-llama-small": a random-init (seed 0) Llama 3 architecture, vocab 32000, 8 layers,
8 heads / 4 kv heads, dim 512, MLP 1536, fp32; a batch of 8 random prompts of 64..128 tokens
(left-padded), 64 new tokens, greedy, no stop tokens. Reported: new tokens per second (batch x
new tokens / wall time, prefill included) with the cache (median over ``--repeats``) and without
it (one run: it is slow).

Workload "tiny-eval": ``tunekit/assets/tiny_llama`` answering the 328 prompts of
``tiny_llama_data/val.jsonl`` greedily (max 4 new tokens, stop at </s>) in batches of 64, as
``recipes/evaluate.py`` does. Ends with one JSON line. Other processes on a shared machine slow
everything down; the script prints the 1-minute load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_small(repeats: int, new: int) -> dict:
    from tunekit.generation import generate, left_pad
    from tunekit.models.llama import llama

    torch.manual_seed(0)
    model = llama(vocab_size=32000, num_layers=8, num_heads=8, num_kv_heads=4, embed_dim=512, intermediate_dim=1536,
                  max_seq_len=512).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (int(n),), generator=gen).tolist()
               for n in torch.randint(64, 129, (8,), generator=gen)]
    tokens, is_token = left_pad(prompts, 0)
    results = {}
    for use_cache in (True, False):
        seconds = timed(lambda: generate(model, tokens, is_token=is_token, max_new_tokens=new, use_cache=use_cache),
                        repeats if use_cache else 1)
        results["cache" if use_cache else "no_cache"] = {"seconds": round(seconds, 3),
                                                         "new_tokens_per_second": round(len(prompts) * new / seconds, 1)}
    results["speedup"] = round(results["no_cache"]["seconds"] / results["cache"]["seconds"], 2)
    return results


def bench_tiny_eval(repeats: int) -> dict:
    from tunekit.config.resolvers import asset_path
    from tunekit.data import chat_dataset
    from tunekit.data.tokenizers import from_hf as tokenizer_from_hf
    from tunekit.generation import generate_ids
    from tunekit.models import from_hf

    model = from_hf(asset_path("tiny_llama")).eval()
    tokenizer = tokenizer_from_hf(asset_path("tiny_llama"))
    data = chat_dataset(tokenizer, os.path.join(asset_path("tiny_llama_data"), "val.jsonl"))
    prompts = [tokenizer.tokenize_messages(data.transformed(i)[:-1], add_generation_prompt=True)[0]
               for i in range(len(data))]
    prompts.sort(key=len)

    def run():
        for start in range(0, len(prompts), 64):
            generate_ids(model, prompts[start:start + 64], max_new_tokens=4, stop_tokens=tokenizer.stop_tokens,
                         pad_id=tokenizer.pad_id)

    seconds = timed(run, repeats)
    return {"examples": len(prompts), "seconds": round(seconds, 3), "examples_per_second": round(len(prompts) / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64, help="bench-llama-small: tokens generated per prompt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    result = {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
              "new_tokens": args.new_tokens,
              "bench_llama_small": bench_small(args.repeats, args.new_tokens), "tiny_eval": bench_tiny_eval(args.repeats),
              "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
