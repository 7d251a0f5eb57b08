"""End-to-end runs of the single-device recipes on a tiny random Llama (built here with
transformers) and a small chat dataset, on CPU."""

import importlib.util
import json
import os
import random
import shutil
import signal

import pytest
import torch

import tunekit.config
from tunekit.config.resolvers import asset_path

def load_recipe(name):
    """The recipe script as a module (recipes/ is not an importable package in a source checkout)."""
    from tunekit import _paths

    spec = importlib.util.spec_from_file_location(f"recipe_{name}", _paths.recipes_dir() / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lora_recipe = load_recipe("lora_finetune_single_device")

WORDS = "apple river stone cloud green quick lamp north paper silver train window".split()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(checkpoint_dir, data_dir): a tiny random HF Llama with the shipped tokenizer, and
    train/val/pretrain_val JSONL files."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tiny")
    ckpt = root / "model"
    config = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(ckpt)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(asset_path("tiny_llama"), name), ckpt / name)
    data = root / "data"
    data.mkdir()
    rng = random.Random(0)

    def chat_rows(n):
        rows = []
        for _ in range(n):
            words = rng.sample(WORDS, rng.randint(2, 5))
            rows.append({"messages": [{"role": "user", "content": "reverse: " + " ".join(words)},
                                      {"role": "assistant", "content": " ".join(reversed(words))}]})
        return rows

    for name, rows in (("train", chat_rows(24)), ("val", chat_rows(8)),
                       ("pretrain_val", [{"text": " ".join(rng.choices(WORDS, k=12))} for _ in range(8)])):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ckpt, data


def make_cfg(name, tiny_run, out, *overrides):
    ckpt, data = tiny_run
    return tunekit.config.load(name, [
        f"output_dir={out}", f"checkpoint_dir={ckpt}", "device=cpu", "dtype=fp32",
        f"dataset.source={data}/train.jsonl", f"val_dataset.source={data}/val.jsonl",
        f"forget_dataset.source={data}/pretrain_val.jsonl",
        "batch_size=4", "max_steps=6", "epochs=10", "eval_every_n_steps=3", "eval_max_batches=2",
        "save_every_n_steps=100", "keep_last_n=null", "log_every_n_steps=1", "lr_scheduler.num_warmup_steps=1",
        "metric_logging.tensorboard=false", "metric_logging.progress_bar=false", *overrides])


def read_metrics(out):
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_lora_recipe_trains_and_checkpoint_loads_in_transformers_and_peft(tiny_run, tmp_path):
    out = tmp_path / "run"
    lora_recipe.main(make_cfg("tiny/lora", tiny_run, out, "optimizer.lr=2e-2", "max_steps=8"))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3
    assert rows[-1]["val_loss"] < rows[2]["val_loss"]
    assert "val_loss" in rows[2] and "forget_loss" in rows[2] and "val_loss" not in rows[0]
    assert all(r["tokens_per_second"] > 0 and r["peak_memory_gib"] > 0 for r in rows)
    step_dir = out / "step_8"
    assert {"config.json", "model.safetensors", "tokenizer.model", "recipe_state", "adapter"} == {
        p.name for p in step_dir.iterdir()} - {"generation_config.json", "special_tokens_map.json", "tokenizer_config.json"}
    assert {p.name for p in (step_dir / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}

    # tunekit: base + adapter from the checkpoint; transformers: the merged model and base + PEFT adapter
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunekit.models import from_hf
    from tunekit.modules.peft import apply_lora, load_peft_adapter

    ckpt, _ = tiny_run
    model = apply_lora(from_hf(ckpt), ["q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3"], rank=8, alpha=16)
    load_peft_adapter(model, step_dir / "adapter")
    tokens = torch.randint(3, 1024, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)
        merged = AutoModelForCausalLM.from_pretrained(step_dir).eval()(tokens).logits
        base = AutoModelForCausalLM.from_pretrained(ckpt)
        peft_logits = PeftModel.from_pretrained(base, step_dir / "adapter").eval()(tokens).logits
        base_logits = from_hf(ckpt)(tokens)
    assert (ours - base_logits).abs().max() > 1e-2  # the adapter changed the model
    torch.testing.assert_close(merged, ours, atol=1e-4, rtol=0)
    torch.testing.assert_close(peft_logits, ours, atol=1e-4, rtol=0)
