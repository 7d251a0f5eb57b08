"""Text generation with the KV cache: greedy / temperature / top-k / top-p sampling for batches of
left-padded prompts, stop tokens, and a no-cache path for checking. See docs/generation.md."""

from tunekit.generation.checkpoints import apply_adapter, find_model_dir, load_inference_model
from tunekit.generation.generate import (generate, generate_ids, kv_caches, left_pad, max_positions,
                                        trim_at_stop)
from tunekit.generation.sampling import check_sampling_args, next_token_probs, sample_next_token

__all__ = ["apply_adapter", "check_sampling_args", "find_model_dir", "generate", "generate_ids", "kv_caches",
           "left_pad", "load_inference_model", "max_positions", "next_token_probs", "sample_next_token", "trim_at_stop"]
