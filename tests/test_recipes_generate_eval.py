"""The generate and evaluate recipes, run in-process on a tiny random Llama (built here with
transformers, with the shipped sentencepiece tokenizer): answers and perplexity against
transformers (and peft for adapters) computed independently in the test."""

import importlib.util
import json
import os
import random
import shutil

import pytest
import torch

import tunekit.config
from tunekit.config.resolvers import asset_path
from tunekit.data.tokenizers import from_hf as tokenizer_from_hf

transformers = pytest.importorskip("transformers")

MAX_NEW = 5
WORDS = "apple river stone cloud green quick lamp north paper silver train window".split()


def load_recipe(name):
    from tunekit import _paths

    spec = importlib.util.spec_from_file_location(f"recipe_{name}", _paths.recipes_dir() / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


evaluate_recipe = load_recipe("evaluate")
generate_recipe = load_recipe("generate")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random HF Llama folder with the shipped tokenizer files."""
    path = tmp_path_factory.mktemp("model")
    config = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(asset_path("tiny_llama"), name), path / name)
    return path


def questions(n=7):
    rng = random.Random(0)  # prompts of different lengths: batches are left-padded
    return [" ".join(rng.sample(WORDS, rng.randint(1, 6))) for _ in range(n)]


def hf_answers(hf, tokenizer, prompts):
    """Greedy answers of transformers' generate, one prompt at a time (no padding)."""
    answers = []
    for q in prompts:
        ids, _ = tokenizer.tokenize_messages([{"role": "user", "content": q}], add_generation_prompt=True)
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tokenizer.stop_tokens,
                          pad_token_id=0)
        answers.append(tokenizer.decode(out[0, len(ids):].tolist()))
    return answers


def hf_perplexity(hf, tokenizer, rows):
    """exp(mean cross-entropy over the assistant tokens), in float64 from transformers' logits."""
    total, count = 0.0, 0
    for row in rows:
        ids, mask = tokenizer.tokenize_messages(row["messages"])
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0].double()
        for k in range(len(ids) - 1):
            if not mask[k + 1]:  # token k+1 is trained on: predicted from position k
                total -= torch.log_softmax(logits[k], -1)[ids[k + 1]].item()
                count += 1
    return torch.tensor(total / count).exp().item(), count


def write_rows(path, prompts, references):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in zip(prompts, references)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def run_evaluate(tmp_path, checkpoint_dir, data, *overrides):
    out = tmp_path / "eval"
    cfg = tunekit.config.load("tiny/evaluate", [
        f"output_dir={out}", f"checkpoint_dir={checkpoint_dir}", "device=cpu", "dtype=fp32",
        f"dataset.source={data}", "batch_size=3", f"max_new_tokens={MAX_NEW}", *overrides])
    evaluate_recipe.main(cfg)
    return json.loads((out / "eval.json").read_text()), [json.loads(line) for line in
                                                         (out / "predictions.jsonl").read_text().splitlines()]


def test_evaluate_exact_match_and_perplexity_against_transformers(checkpoint, tmp_path, capsys):
    tokenizer = tokenizer_from_hf(checkpoint)
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    prompts = questions()
    answers = hf_answers(hf, tokenizer, prompts)
    assert all(a.strip() for a in answers) and len(set(answers)) > 1

    # references = transformers' greedy answers: every example matches
    rows = write_rows(tmp_path / "same.jsonl", prompts, answers)
    results, predictions = run_evaluate(tmp_path, checkpoint, tmp_path / "same.jsonl")
    assert [p["prediction"] for p in predictions] == answers
    assert results["exact_match"] == 1.0 and results["num_correct"] == len(prompts) == results["num_examples"]
    ppl, count = hf_perplexity(hf, tokenizer, rows)
    assert results["num_label_tokens"] == count
    assert results["perplexity"] == pytest.approx(ppl, rel=1e-4)
    assert "exact_match=100.0% (7/7)" in capsys.readouterr().out

    # references perturbed (surrounding whitespace does not count; other text does)
    perturbed = [f"  {a.strip()}\n" if i % 2 else a.strip() + "x" for i, a in enumerate(answers)]
    write_rows(tmp_path / "perturbed.jsonl", prompts, perturbed)
    results, predictions = run_evaluate(tmp_path, checkpoint, tmp_path / "perturbed.jsonl")
    assert [p["correct"] for p in predictions] == [bool(i % 2) for i in range(len(prompts))]
    assert results["num_correct"] == len(prompts) // 2

    wrong = [a.strip() + " extra" for a in answers]
    rows = write_rows(tmp_path / "wrong.jsonl", prompts, wrong)
    results, _ = run_evaluate(tmp_path, checkpoint, tmp_path / "wrong.jsonl")
    assert results["exact_match"] == 0.0
    assert results["perplexity"] == pytest.approx(hf_perplexity(hf, tokenizer, rows)[0], rel=1e-4)


def test_evaluate_uses_newest_step_folder_and_peft_adapter(checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    tokenizer = tokenizer_from_hf(checkpoint)
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    torch.manual_seed(1)
    lora = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                           init_lora_weights=False)
    hf = peft.get_peft_model(base, lora).eval()
    with torch.no_grad():  # a clearly visible adapter
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    adapter = tmp_path / "adapter"
    hf.save_pretrained(adapter)
    prompts = questions(5)
    answers = hf_answers(hf, tokenizer, prompts)
    assert answers != hf_answers(transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval(), tokenizer, prompts)
    rows = write_rows(tmp_path / "data.jsonl", prompts, answers)

    # a training output_dir: step_2 is the newest complete checkpoint; tmp folders are ignored
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run / "step_2")
    (run / "step_1").mkdir(parents=True)
    (run / ".step_3.tmp-123").mkdir()
    results, _ = run_evaluate(tmp_path, run, tmp_path / "data.jsonl", f"adapter_dir={adapter}")
    assert results["model"] == str(run / "step_2")
    assert results["exact_match"] == 1.0
    assert results["perplexity"] == pytest.approx(hf_perplexity(hf, tokenizer, rows)[0], rel=1e-4)

    with pytest.raises(FileNotFoundError, match="no config.json and no step_<N>/"):
        run_evaluate(tmp_path, tmp_path / "adapter", tmp_path / "data.jsonl")
    with pytest.raises(ValueError, match="already include this adapter"):
        run_evaluate(tmp_path, run / "step_2", tmp_path / "data.jsonl", f"adapter_dir={run / 'step_2'}")


def run_generate(checkpoint, capsys, *overrides):
    cfg = tunekit.config.load("tiny/generate", [f"checkpoint_dir={checkpoint}", "device=cpu", "dtype=fp32",
                                                f"max_new_tokens={MAX_NEW}", *overrides])
    generate_recipe.main(cfg)
    return capsys.readouterr().out


def test_generate_prints_transformers_greedy_answer(checkpoint, capsys):
    tokenizer = tokenizer_from_hf(checkpoint)
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    prompt = "green quick lamp"
    assert run_generate(checkpoint, capsys, f"prompt={prompt}") == hf_answers(hf, tokenizer, [prompt])[0] + "\n"

    # plain text: BOS + the text, continued
    ids = tokenizer.encode(prompt, add_bos=True, add_eos=False)
    ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tokenizer.stop_tokens, pad_token_id=0)
    expected = tokenizer.decode(ref[0, len(ids):].tolist())
    assert run_generate(checkpoint, capsys, f"prompt={prompt}", "chat=false") == expected + "\n"


def test_generate_sampling_is_seeded(checkpoint, capsys):
    args = ["prompt=apple river", "temperature=1.0", "top_k=50", "max_new_tokens=12"]
    a = run_generate(checkpoint, capsys, *args, "seed=3")
    assert run_generate(checkpoint, capsys, *args, "seed=3") == a
    assert run_generate(checkpoint, capsys, *args, "seed=4") != a
