"""End-to-end runs of the single-device recipes on a tiny random Llama (built here with
transformers) and a small chat dataset, on CPU."""

import importlib.util
import json
import math
import os
import random
import shutil
import signal

import pytest
import torch
import yaml

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


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


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
    model = apply_lora(from_hf(ckpt), ["q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3"], rank=16, alpha=32)
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


full_recipe = load_recipe("full_finetune_single_device")


def test_full_recipe_trains_and_checkpoint_matches_transformers(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from tunekit.models import from_hf

    out = tmp_path / "run"
    full_recipe.main(make_cfg("tiny/full", tiny_run, out, "optimizer.lr=3e-3", "max_steps=6",
                              "activation_checkpointing=true"))
    rows = read_metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    step_dir = out / "step_6"
    tokens = torch.randint(3, 1024, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = from_hf(step_dir)(tokens)
        theirs = AutoModelForCausalLM.from_pretrained(step_dir).eval()(tokens).logits
        base = from_hf(tiny_run[0])(tokens)
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


class _SignalAtStep:
    """Wraps the recipe's ``training_steps``: sends a real SIGINT (as Ctrl-C would; or ``signum``)
    as step ``at`` begins, so the signal arrives while that step runs."""

    def __init__(self, inner, at, signum=signal.SIGINT):
        self.inner, self.at, self.signum = inner, at, signum

    def __call__(self, *args, **kwargs):
        for item in self.inner(*args, **kwargs):
            if item[0] == self.at:
                os.kill(os.getpid(), self.signum)
            yield item


RESUME_ARGS = ("num_workers=2", "max_steps=7", "epochs=3", "gradient_accumulation_steps=2", "lora.dropout=0.1", "optimizer.lr=1e-2",
               "save_every_n_steps=100", "eval_every_n_steps=100")


@pytest.mark.parametrize("config", ["tiny/lora", "tiny/dora", "tiny/qlora"])
def test_ctrl_c_saves_and_resume_reproduces_the_uninterrupted_run(tiny_run, tmp_path, monkeypatch, config):
    # 24 examples / (batch 4 x accumulation 2) = 3 steps per epoch: the run crosses two epoch ends,
    # is interrupted mid-epoch at step 4, and uses dropout (RNG) and shuffling (sampler position).
    dtype = "dtype=bf16" if config == "tiny/qlora" else "dtype=fp32"
    full_run = tmp_path / "full"
    lora_recipe.main(make_cfg(config, tiny_run, full_run, *RESUME_ARGS, dtype))
    expected = [r["loss"] for r in read_metrics(full_run)]
    assert len(expected) == 7

    out = tmp_path / "interrupted"
    monkeypatch.setattr(lora_recipe, "training_steps", _SignalAtStep(lora_recipe.training_steps, at=4))
    lora_recipe.main(make_cfg(config, tiny_run, out, *RESUME_ARGS, dtype))
    assert [p.name for p in out.iterdir() if p.name.startswith("step_")] == ["step_4"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="resume=true"):
        lora_recipe.main(make_cfg(config, tiny_run, out, *RESUME_ARGS, dtype))
    lora_recipe.main(make_cfg(config, tiny_run, out, *RESUME_ARGS, dtype, "resume=true"))
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert [r["loss"] for r in rows] == expected  # exactly, not approximately


def test_sigterm_saves_and_the_run_resumes(tiny_run, tmp_path, monkeypatch):
    """A scheduler's SIGTERM (SLURM time limit / preemption) behaves like Ctrl-C: the step finishes,
    step_<N>/ is written, main returns, and resume=true continues to the end."""
    out = tmp_path / "run"
    monkeypatch.setattr(full_recipe, "training_steps", _SignalAtStep(full_recipe.training_steps, at=3, signum=signal.SIGTERM))
    full_recipe.main(make_cfg("tiny/full", tiny_run, out, "max_steps=5", "save_every_n_steps=100", "eval_every_n_steps=100"))
    assert [p.name for p in out.iterdir() if p.name.startswith("step_")] == ["step_3"]
    monkeypatch.undo()
    full_recipe.main(make_cfg("tiny/full", tiny_run, out, "max_steps=5", "save_every_n_steps=100", "eval_every_n_steps=100",
                              "resume=true"))
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5]
    # the run record: the first start's resolved config stays; the resume changed only resume=true
    assert [p.name for p in out.glob("config*.yaml")] == ["config.yaml"]
    assert f"torch {torch.__version__}" in (out / "config.yaml").read_text()
    assert yaml.safe_load((out / "config.yaml").read_text())["resume"] is False


def test_crash_inside_save_keeps_previous_checkpoint(tiny_run, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    calls = []

    def save_adapter_then_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("simulated crash while writing step_4")
        return real_save(*args, **kwargs)

    from tunekit.training import checkpoint_files

    real_save = checkpoint_files.save_peft_adapter
    monkeypatch.setattr(checkpoint_files, "save_peft_adapter", save_adapter_then_crash)
    with pytest.raises(OSError, match="simulated crash"):
        lora_recipe.main(make_cfg("tiny/lora", tiny_run, out, "max_steps=4", "save_every_n_steps=2"))
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "logs", "step_2"]  # no half step_4, no tmp folder
    AutoModelForCausalLM.from_pretrained(out / "step_2")
    monkeypatch.undo()
    lora_recipe.main(make_cfg("tiny/lora", tiny_run, out, "max_steps=4", "save_every_n_steps=2", "resume=true"))
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    assert (out / "step_4" / "adapter" / "adapter_model.safetensors").is_file()


def test_gradient_accumulation_4x1_equals_batch_4(tiny_run, tmp_path):
    from safetensors.torch import load_file

    args = ("max_steps=3", "epochs=1", "shuffle=false", "optimizer.lr=1e-2", "max_grad_norm=null")
    full_recipe.main(make_cfg("tiny/full", tiny_run, tmp_path / "a", "batch_size=4", "gradient_accumulation_steps=1", *args))
    full_recipe.main(make_cfg("tiny/full", tiny_run, tmp_path / "b", "batch_size=1", "gradient_accumulation_steps=4", *args))
    for ra, rb in zip(read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b"), strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
    wa = load_file(tmp_path / "a" / "step_3" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "step_3" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=2e-5, rtol=0, msg=name)


@pytest.mark.parametrize("config", ["tiny/qlora", "tiny/dora"])
def test_qlora_and_dora_run(tiny_run, tmp_path, config):
    from peft import PeftConfig

    out = tmp_path / "run"
    lora_recipe.main(make_cfg(config, tiny_run, out, "max_steps=3", "optimizer.lr=1e-2",
                              "dtype=" + ("bf16" if config == "tiny/qlora" else "fp32")))
    rows = read_metrics(out)
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    assert PeftConfig.from_pretrained(out / "step_3" / "adapter").use_dora == (config == "tiny/dora")


def test_shipped_tiny_config_runs_as_is(tmp_path):
    """The demo config with its shipped model and data, shortened to two steps."""
    cfg = tunekit.config.load("tiny/lora", [f"output_dir={tmp_path}", "device=cpu", "max_steps=2", "batch_size=2",
                                            "eval_max_batches=1", "eval_every_n_steps=2",
                                            "metric_logging.progress_bar=false"])
    lora_recipe.main(cfg)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and "val_loss" in rows[1] and "forget_loss" in rows[1]
    assert any((tmp_path / "logs" / "tensorboard").iterdir())
    record = yaml.safe_load((tmp_path / "config.yaml").read_text())  # resolved, overrides applied
    assert record["max_steps"] == 2 and record["output_dir"] == str(tmp_path) and "${" not in str(record)


def test_full_finetune_bf16_resume_is_exact(tiny_run, tmp_path, monkeypatch):
    """Pure bf16 full fine-tune: the weights reloaded from step_<N>/ plus the optimizer state
    continue the run exactly."""
    args = ("max_steps=5", "epochs=2", "dtype=bf16", "optimizer.lr=3e-3", "eval_every_n_steps=100")
    full_recipe.main(make_cfg("tiny/full", tiny_run, tmp_path / "a", *args))
    out = tmp_path / "b"
    monkeypatch.setattr(full_recipe, "training_steps", _SignalAtStep(full_recipe.training_steps, at=2))
    full_recipe.main(make_cfg("tiny/full", tiny_run, out, *args))
    monkeypatch.undo()
    full_recipe.main(make_cfg("tiny/full", tiny_run, out, *args, "resume=true"))
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(tmp_path / "a")]


def test_bad_interval_fails_validation_with_the_key_name(tiny_run, tmp_path):
    with pytest.raises(tunekit.config.ConfigError, match="save_every_n_steps: expected a positive integer, got 0"):
        tunekit.config.validate(make_cfg("tiny/lora", tiny_run, tmp_path, "save_every_n_steps=0"),
                                schema=lora_recipe.CONFIG)
    with pytest.raises(tunekit.config.ConfigError, match="max_steps: expected a positive integer or null, got -1"):
        tunekit.config.validate(make_cfg("tiny/full", tiny_run, tmp_path, "max_steps=-1"), schema=full_recipe.CONFIG)
    assert not tmp_path.joinpath("logs").exists()


def test_user_mistakes_end_the_cli_run_with_one_line(tmp_path):
    """Through `tunekit run`, a missing data file and an output_dir that already holds a run give
    `tunekit: error: ...` naming the file / key and exit code 2, not a traceback."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNEKIT_DEBUG": "0"}
    base = [sys.executable, "-m", "tunekit.cli.main", "run", "lora_finetune_single_device", "--config", "tiny/lora",
            "device=cpu", "metric_logging.progress_bar=false", "metric_logging.tensorboard=false"]
    missing = tmp_path / "missing.jsonl"
    r = subprocess.run([*base, f"output_dir={tmp_path / 'a'}", f"dataset.source={missing}"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    assert f"tunekit: error: {missing}: file not found" in r.stderr
    assert "Traceback" not in r.stderr

    out = tmp_path / "b"
    r = subprocess.run([*base, f"output_dir={out}", "max_steps=1"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([*base, f"output_dir={out}", "max_steps=1"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"tunekit: error: output_dir={out} already holds checkpoints (newest: step_1); pass resume=true" in r.stderr
