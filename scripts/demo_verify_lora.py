"""Check that the shipped demo assets make a convincing LoRA fine-tune, with plain transformers + peft.

    python scripts/demo_verify_lora.py [--steps 600 --rank 16 --lr 2e-3 --batch-size 16]

Independent of tunekit's recipes on purpose: it measures what the assets allow (the numbers in
tunekit/assets/README.md come from here), so a regression in a recipe cannot hide in them.

Prompt format (the shipped Llama-2 chat template): `<s>[INST] {user} [/INST] {assistant} </s>`; the
loss is taken on the tokens after `[/INST]` only (assistant text, a space piece, `</s>`). Exact-match: greedy decoding of at most
`--max-new-tokens` tokens after the prompt, stopped at `</s>`, compared after strip().
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_assets import lm_loss, packed_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "tunekit" / "assets" / "tiny_llama"
DATA_DIR = REPO / "tunekit" / "assets" / "tiny_llama_data"
IGNORE = -100


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def encode_example(tokenizer, row: dict) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of one `messages` row via the shipped chat template.

    The answer part is what Llama-2's template puts after `[/INST]`: ` {answer} </s>`, the same
    tokens tunekit's llama2 chat format trains on.
    """
    msgs = row["messages"]
    prompt_ids = tokenizer.apply_chat_template(msgs[:1], tokenize=True)["input_ids"]
    full_ids = tokenizer.apply_chat_template(msgs, tokenize=True)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError(f"prompt tokens change when the answer is appended: {row}")
    return prompt_ids, full_ids[len(prompt_ids):]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids / attention_mask / labels LongTensor[b, s] (labels unshifted, HF style)."""
    width = max(len(p) + len(a) for p, a in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (p, a) in enumerate(examples):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        labels[i, len(p):n] = torch.tensor(a)
        attn[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


@torch.no_grad()
def answer_loss(model, examples, pad_id: int, batch_size: int = 64) -> float:
    """Mean cross-entropy per answer token (held-out loss)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum").item()
        count += (targets != IGNORE).sum().item()
    return total / count


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuation of each prompt; prompts of equal length share a batch, so no padding."""
    model.eval()
    out: list[str] = [""] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for idx in by_len.values():
        tokens = torch.tensor([prompts[i] for i in idx])
        start = tokens.shape[1]
        done = torch.zeros(len(idx), dtype=torch.bool)
        for _ in range(max_new_tokens):
            nxt = model(input_ids=tokens).logits[:, -1].argmax(-1)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == tokenizer.eos_token_id
            if done.all():
                break
        for row, i in enumerate(idx):
            gen = tokens[row, start:].tolist()
            if tokenizer.eos_token_id in gen:
                gen = gen[: gen.index(tokenizer.eos_token_id)]
            out[i] = tokenizer.decode(gen, skip_special_tokens=True).strip()
    return out


def exact_match(model, tokenizer, rows, examples, max_new_tokens: int) -> tuple[float, list[str]]:
    preds = greedy_answers(model, tokenizer, [p for p, _ in examples], max_new_tokens)
    refs = [row["messages"][1]["content"].strip() for row in rows]
    return sum(p == r for p, r in zip(preds, refs)) / len(refs), preds


def evaluate(model, tokenizer, val_rows, val_ex, lm_rows, max_new_tokens: int) -> dict:
    t0 = time.perf_counter()
    em, preds = exact_match(model, tokenizer, val_rows, val_ex, max_new_tokens)
    return {"exact_match": round(em, 4), "val_loss": round(answer_loss(model, val_ex, 0), 4),
            "pretrain_val_loss": round(lm_loss(model, lm_rows), 4),
            "eval_seconds": round(time.perf_counter() - t0, 1), "sample": preds[:3]}


def main(argv: list[str] | None = None) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--n-val", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print("load before:", os.getloadavg())

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = LlamaForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    train_rows = read_jsonl(args.data_dir / "train.jsonl")
    val_rows = read_jsonl(args.data_dir / "val.jsonl")[: args.n_val]
    train_ex = [encode_example(tokenizer, r) for r in train_rows]
    val_ex = [encode_example(tokenizer, r) for r in val_rows]
    lm_rows = packed_rows(tokenizer, [r["text"] for r in read_jsonl(DATA_DIR / "pretrain_val.jsonl")], 128)

    before = evaluate(model, tokenizer, val_rows, val_ex, lm_rows, args.max_new_tokens)
    print("before:", json.dumps(before), flush=True)

    model = get_peft_model(model, LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=args.targets.split(","),
        task_type="CAUSAL_LM"))
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup)
                                              * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    g = torch.Generator().manual_seed(args.seed)
    order = torch.cat([torch.randperm(len(train_ex), generator=g) for _ in range(
        args.steps * args.batch_size // len(train_ex) + 1)])
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        batch = collate([train_ex[i] for i in order[step * args.batch_size:(step + 1) * args.batch_size]], 0)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f} {time.perf_counter() - t0:.0f}s", flush=True)
    train_seconds = time.perf_counter() - t0

    after = evaluate(model, tokenizer, val_rows, val_ex, lm_rows, args.max_new_tokens)
    print("after:", json.dumps(after), flush=True)
    print("summary:", json.dumps({
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "rank": args.rank,
        "alpha": args.alpha, "targets": args.targets, "train_seconds": round(train_seconds, 1),
        "trainable_params": sum(q.numel() for q in trainable), "load_after": os.getloadavg(),
        "before": before, "after": after}))


if __name__ == "__main__":
    main()
