"""Build the demo assets that ship inside tunekit (tunekit/assets/), deterministically from a seed.

    python scripts/make_demo_assets.py                  # everything (~4 min on 2 idle CPU cores)
    python scripts/make_demo_assets.py --stage data     # only rewrite the JSONL files
    python scripts/demo_verify_lora.py                  # measure the LoRA fine-tune (peft loop)

Outputs:
  tunekit/assets/tiny_llama/       a tiny Llama-architecture model pretrained on a synthetic
                                   English-like corpus (scripts/demo_corpus.py): config.json,
                                   model.safetensors (fp32), generation_config.json,
                                   tokenizer.model (sentencepiece BPE, byte_fallback, Llama-2
                                   style: <unk>=0 <s>=1 </s>=2), tokenizer_config.json with a
                                   Llama-2 `[INST]` chat_template.
  tunekit/assets/tiny_llama_data/  train.jsonl / val.jsonl: the addition-question task in
                                   OpenAI `messages` format (one JSON object per line:
                                   {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}),
                                   val held out (no (a, b) pair in both); pretrain_val.jsonl
                                   ({"text": ...}) held-out pretraining text to measure forgetting.

Only this builder needs sentencepiece-training / transformers; tunekit itself reads the files.
The pretraining is a fixed number of steps (not a time budget) so reruns give the same model on
the same machine/library versions.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "tunekit" / "assets"
MODEL_DIR = ASSETS / "tiny_llama"
DATA_DIR = ASSETS / "tiny_llama_data"

SEED = 1234
VOCAB_SIZE = 1024
N_PRETRAIN_VAL = 200

# Llama-2's template: <s>[INST] user [/INST] answer </s>; a system message goes inside the
# first [INST] between <<SYS>> markers.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\\n' + messages[0]['content'] | trim + '\\n<</SYS>>\\n\\n' %}"
    "{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{% if loop.index0 == 0 %}{% set content = system + message['content'] | trim %}"
    "{% else %}{% set content = message['content'] | trim %}{% endif %}"
    "{{ bos_token + '[INST] ' + content + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] | trim + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

MODEL_CONFIG = dict(
    vocab_size=VOCAB_SIZE, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=None, hidden_act="silu",
)


def pretraining_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [demo_corpus.pretraining_document(rng) for _ in range(n)]


def build_tokenizer(out_dir: Path, seed: int) -> None:
    """Train the sentencepiece model on generic text plus the chat/task wording, write HF files."""
    import sentencepiece as spm

    texts = pretraining_texts(seed + 1, 20000)
    texts += demo_corpus.tokenizer_extra_texts(seed + 2)
    texts.append("<<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\n")
    out_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(out_dir / "tokenizer"),
        model_type="bpe", vocab_size=VOCAB_SIZE, byte_fallback=True, character_coverage=1.0,
        split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        allow_whitespace_only_pieces=True, num_threads=1, seed_sentencepiece_size=200000,
        minloglevel=2,
    )
    (out_dir / "tokenizer.vocab").unlink()
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")


def packed_rows(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate `<s> doc </s>` streams and cut into rows: LongTensor[n, seq_len + 1]."""
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    n = len(stream) // (seq_len + 1)
    return torch.tensor(stream[: n * (seq_len + 1)]).view(n, seq_len + 1)


@torch.no_grad()
def lm_loss(model, rows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy over rows: LongTensor[n, s + 1]."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        b = rows[i:i + batch_size]
        logits = model(input_ids=b[:, :-1]).logits
        total += torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), b[:, 1:].flatten(), reduction="sum").item()
        count += b[:, 1:].numel()
    return total / count


def save_model(model, out_dir: Path) -> None:
    from transformers import GenerationConfig

    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2, do_sample=False, max_new_tokens=32).save_pretrained(out_dir)


def pretrain(out_dir: Path, seed: int, steps: int, batch_size: int, seq_len: int, lr: float,
             save_every: int = 0) -> dict:
    """Pretrain the tiny Llama on the generic corpus; save it next to the tokenizer.

    `save_every` > 0 also saves every that many steps, so a run on a busy machine can be cut short.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    n_docs = steps * batch_size * seq_len // 40 + 1000  # ~40 tokens per document
    rows = packed_rows(tokenizer, pretraining_texts(seed + 3, n_docs), seq_len)
    val_rows = packed_rows(tokenizer, pretraining_texts(seed + 4, 400), seq_len)
    print(f"pretraining rows: {len(rows)} x {seq_len + 1}, val rows {len(val_rows)}", flush=True)

    model = LlamaForCausalLM(LlamaConfig(**MODEL_CONFIG))
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    loss0 = lm_loss(model, val_rows)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    model.train()
    for step in range(steps):
        idx = order[(torch.arange(batch_size) + step * batch_size) % len(rows)]
        b = rows[idx]
        logits = model(input_ids=b[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.3f} {time.perf_counter() - t0:.0f}s", flush=True)
        if save_every and (step + 1) % save_every == 0:
            save_model(model, out_dir)
    seconds = time.perf_counter() - t0
    loss1 = lm_loss(model, val_rows)
    save_model(model, out_dir)
    stats = dict(params=n_params, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                 seconds=round(seconds, 1), val_loss_init=round(loss0, 3), val_loss=round(loss1, 3),
                 log_vocab=round(math.log(VOCAB_SIZE), 3))
    print(json.dumps(stats), flush=True)
    return stats


def write_data(data_dir: Path, seed: int) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    train, val = demo_corpus.addition_split(seed + 5)
    for name, rows in (("train", train), ("val", val)):
        with open(data_dir / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    with open(data_dir / "pretrain_val.jsonl", "w") as f:
        for text in pretraining_texts(seed + 6, N_PRETRAIN_VAL):
            f.write(json.dumps({"text": text}) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("all", "tokenizer", "pretrain", "data"), default="all")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.stage in ("all", "tokenizer"):
        build_tokenizer(MODEL_DIR, args.seed)
    if args.stage in ("all", "pretrain"):
        stats = pretrain(MODEL_DIR, args.seed, args.steps, args.batch_size, args.seq_len, args.lr,
                        args.save_every)
        print("pretraining:", json.dumps(stats))
    if args.stage in ("all", "data"):
        write_data(DATA_DIR, args.seed)


if __name__ == "__main__":
    main()
