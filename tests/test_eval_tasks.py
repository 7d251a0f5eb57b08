"""Benchmark-style evaluation (tunekit.evaluation): multiple-choice acc / acc_norm against float64
log-likelihoods from transformers with lm-eval's tokenization rule applied to transformers'
tokenizer; exact match against a direct greedy loop; the evaluate recipe on the shipped tiny model
and sample tasks; a training recipe logging a task; and, when ``lm_eval`` is installed, lm-eval's
own Hugging Face model on the same task and our adapter inside lm-eval."""

import importlib.util
import json
import os
import random
import re
import shutil
import sys

import pytest
import torch

import tunekit.config
from tunekit.config.errors import MissingPackageError
from tunekit.config.resolvers import asset_path
from tunekit.data.errors import DataError
from tunekit.data.tokenizers import from_hf as tokenizer_from_hf
from tunekit.evaluation import (
    cut_at,
    encode_pair,
    generation_task,
    lm_eval_model,
    multiple_choice_task,
    normalize_answer,
    regex_extract,
)
from tunekit.models import from_hf

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

WORDS = ["apple", "river", "stone", "cloud", "green", "quick", "lamp", "north", "paper", "silver", "train", "window"]
GSM8K_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]  # lm-eval gsm8k's exact_match options
FLEXIBLE = "(-?[$0-9.,]{2,})|(-?[0-9]+)"  # lm-eval gsm8k's flexible-extract


def load_recipe(name):
    from tunekit import _paths

    spec = importlib.util.spec_from_file_location(f"recipe_{name}", _paths.recipes_dir() / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mc_rows(n=14):
    """Choices of different lengths (1-30 characters), so acc and acc_norm can disagree."""
    rng = random.Random(1)
    rows = []
    for _ in range(n):
        choices = [" ".join(rng.sample(WORDS, rng.randint(1, 4)))[:rng.randint(1, 30)] for _ in range(rng.randint(2, 5))]
        rows.append({"question": " ".join(rng.sample(WORDS, rng.randint(1, 6))), "choices": choices,
                     "answer": rng.randrange(len(choices))})
    return rows


def hf_pair(hf_tok, context, continuation):
    """lm-eval's TemplateLM._encode_pair on a transformers tokenizer (causal models)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = hf_tok(context + continuation)["input_ids"]
    ctx = hf_tok(context)["input_ids"]
    return ctx, whole[len(ctx):]


def test_encode_pair_splits_like_lm_eval_on_transformers_tokenizer():
    ours = tokenizer_from_hf(asset_path("tiny_llama"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(asset_path("tiny_llama"))
    cases = [("3 plus 5 is", " 8"), ("3 plus 5 is ", "8"), ("Question: why?\nAnswer:", " because it is"),
             ("seven plus two is", " nine."), ("a  ", " b"), ("x", "yz")]
    for context, continuation in cases:
        ctx, cont = encode_pair(ours, context, continuation)
        assert (ctx, cont) == hf_pair(hf_tok, context, continuation), (context, continuation)
        assert ctx[0] == ours.bos_id and cont
    assert encode_pair(ours, "", " 8") == ([ours.bos_id], ours.encode(" 8", add_bos=False, add_eos=False))


def test_multiple_choice_acc_and_acc_norm_against_float64_reference(checkpoint, tmp_path):
    rows = mc_rows()
    source = write_jsonl(tmp_path / "mc.jsonl", rows)
    tokenizer = tokenizer_from_hf(checkpoint)
    task = multiple_choice_task(tokenizer, str(source), template="Q: {question}\nA:", batch_size=3)
    result = task.evaluate(from_hf(checkpoint))

    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).double().eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(checkpoint)
    acc = acc_norm = 0
    disagree = False
    for row, pred in zip(rows, result.predictions):
        lls = []
        for choice in row["choices"]:
            ctx, cont = hf_pair(hf_tok, f"Q: {row['question']}\nA:", " " + choice)
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                log_probs = torch.log_softmax(hf(ids).logits[0].double(), -1)
            lls.append(sum(log_probs[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont)))
        torch.testing.assert_close(torch.tensor(pred["loglikelihoods"]), torch.tensor(lls), atol=2e-4, rtol=0)
        best = max(range(len(lls)), key=lambda i: lls[i])
        best_norm = max(range(len(lls)), key=lambda i: lls[i] / len(row["choices"][i]))  # characters, as lm-eval
        acc += best == row["answer"]
        acc_norm += best_norm == row["answer"]
        disagree |= best != best_norm
    assert disagree, "the data must make acc and acc_norm pick differently somewhere, or acc_norm is untested"
    assert result.metrics == {"acc": acc / len(rows), "acc_norm": acc_norm / len(rows)}


def direct_greedy(model, ids, max_new, stop):
    """Greedy without cache, padding or batching: the full forward at every step."""
    ids = list(ids)
    new = []
    for _ in range(max_new):
        with torch.no_grad():
            token = model(torch.tensor([ids]))[0, -1].argmax().item()
        new.append(token)
        ids.append(token)
        if token in stop:
            break
    return new


def test_generation_exact_match_against_direct_greedy_loop(checkpoint, tmp_path):
    tokenizer = tokenizer_from_hf(checkpoint)
    model = from_hf(checkpoint)
    rng = random.Random(2)
    questions = [" ".join(rng.sample(WORDS, rng.randint(1, 7))) for _ in range(9)]  # several prompt lengths
    expected = [tokenizer.decode(direct_greedy(model, tokenizer.encode(f"Question: {q}\nAnswer:", add_eos=False),
                                               5, tokenizer.stop_tokens)) for q in questions]
    # references in GSM8K form: reasoning, then "#### " and the answer; every other one is wrong
    rows = [{"question": q, "answer": f"some reasoning\n#### {e.strip() if i % 2 == 0 else 'wrong'}"}
            for i, (q, e) in enumerate(zip(questions, expected))]
    source = write_jsonl(tmp_path / "gen.jsonl", rows)
    task = generation_task(tokenizer, str(source), max_new_tokens=5, regexes_to_ignore=["(?s).*#### "],
                           batch_size=4)
    result = task.evaluate(model)
    assert [p["response"] for p in result.predictions] == expected
    assert [p["correct"] for p in result.predictions] == [i % 2 == 0 and e.strip() == p
                                                           for i, (e, p) in enumerate(
                                                               zip(expected, (p["response"] for p in result.predictions)))]
    assert result.metrics["exact_match"] == sum(p["correct"] for p in result.predictions) / len(rows)


def test_regex_extraction_and_normalisation_follow_lm_eval_gsm8k():
    # strict-match: the first "#### N"; flexible-extract: the last number-like run
    assert regex_extract("so 3 + 4 = 7\n#### 7", "#### (\\-?[0-9\\.\\,]+)") == "7"
    assert regex_extract("no hashes", "#### (\\-?[0-9\\.\\,]+)") == "[invalid]"
    assert regex_extract("Janet has 16 eggs, sells 9 for $2: $18.", FLEXIBLE, group_select=-1) == "$18."
    assert regex_extract("it is 7", FLEXIBLE, group_select=-1) == "7"  # the single-digit alternative
    assert regex_extract(" keep all ", None) == " keep all "
    for prediction, reference in (("$18.", "Janet ... = 18\n#### 18"), ("1,234", "#### 1234")):
        assert normalize_answer(prediction, regexes_to_ignore=GSM8K_IGNORE, ignore_case=True) == \
            normalize_answer(reference, regexes_to_ignore=GSM8K_IGNORE, ignore_case=True)
    assert normalize_answer("Paris!", ignore_case=True, ignore_punctuation=True) == "paris"
    assert cut_at(" 9. 3 plus 4", ["."]) == " 9" and cut_at("abc", ["x", ""]) == "abc"


def test_task_rows_with_mistakes_are_user_errors_naming_the_line(tmp_path):
    tokenizer = tokenizer_from_hf(asset_path("tiny_llama"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "a", "choices": ["x", "y"], "answer": 0},
                                              {"question": "b", "choices": ["x", "y"], "answer": 2}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'answer'"):
        multiple_choice_task(tokenizer, str(bad))
    with pytest.raises(DataError, match=r"bad.jsonl:1: .*template .*'ctx'"):
        multiple_choice_task(tokenizer, str(bad), template="{ctx}")
    with pytest.raises(DataError, match=r"field 'endings'"):
        multiple_choice_task(tokenizer, str(bad), choices_field="endings")


def test_lm_eval_adapter_names_the_package_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    with pytest.raises(MissingPackageError, match="pip install lm-eval"):
        lm_eval_model(torch.nn.Linear(1, 1), None)


def test_evaluate_recipe_runs_the_shipped_tasks_on_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "eval"
    cfg = tunekit.config.load("tiny/evaluate", [f"output_dir={out}", "device=cpu", "dataset=null"])
    load_recipe("evaluate").main(cfg)
    results = json.loads((out / "eval.json").read_text())
    assert set(results["tasks"]) == {"arithmetic_mc", "arithmetic_gsm8k", "arithmetic_gsm8k_chat"}
    assert "arithmetic_mc: acc=" in capsys.readouterr().out
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

    def true_sum(question):  # "five plus 6" -> 11, computed here from the question's words
        a, _, b = question.split()
        return sum(int(x) if x.isdigit() else words.index(x) for x in (a, b))

    with open(os.path.join(asset_path("eval"), "arithmetic_gsm8k.jsonl")) as f:
        questions = [json.loads(line)["question"] for line in f]
    for name in ("arithmetic_gsm8k", "arithmetic_gsm8k_chat"):
        lines = [json.loads(line) for line in (out / "tasks" / f"{name}.jsonl").read_text().splitlines()]
        assert len(lines) == len(questions) == results["tasks"][name]["num_examples"] == 20
        # correct = the last number of the response (before the first ".") is the sum
        mine = [bool(re.findall(r"\d+", p["response"])) and int(re.findall(r"\d+", p["response"])[-1]) == true_sum(q)
                for p, q in zip(lines, questions)]
        assert [p["correct"] for p in lines] == mine
        assert results["tasks"][name]["exact_match"] == sum(mine) / 20
    mc = [json.loads(line) for line in (out / "tasks" / "arithmetic_mc.jsonl").read_text().splitlines()]
    assert results["tasks"]["arithmetic_mc"]["acc"] == sum(
        max(range(len(p["choices"])), key=lambda i: p["loglikelihoods"][i]) == p["answer"] for p in mc) / 20
    assert results["tasks"]["arithmetic_mc"]["acc"] > 0.4  # the base model knows most of these pretraining facts


def test_training_recipe_logs_eval_tasks_equal_to_the_saved_model(checkpoint, tmp_path):
    rng = random.Random(0)
    chat = [{"messages": [{"role": "user", "content": " ".join(rng.sample(WORDS, 3))},
                          {"role": "assistant", "content": rng.choice(WORDS)}]} for _ in range(8)]
    train = write_jsonl(tmp_path / "train.jsonl", chat)
    mc = write_jsonl(tmp_path / "mc.jsonl", mc_rows(6))
    out = tmp_path / "run"
    cfg = tunekit.config.load("tiny/lora", [
        f"output_dir={out}", f"checkpoint_dir={checkpoint}", "device=cpu", "dtype=fp32",
        f"dataset.source={train}", "val_dataset=null", "forget_dataset=null", "batch_size=4", "max_steps=2",
        "eval_every_n_steps=1", "save_every_n_steps=100", "log_every_n_steps=1", "optimizer.lr=5e-2",
        "lr_scheduler.num_warmup_steps=0", "metric_logging.tensorboard=false", "metric_logging.progress_bar=false",
        f"eval_tasks=[{{_component_: tunekit.evaluation.multiple_choice_task, source: {mc}, name: probe}}]",
        "keep_best.metric=eval/probe/acc", "keep_best.mode=max"])  # a task metric can be watched
    load_recipe("lora_finetune_single_device").main(cfg)
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("eval/probe/acc" in r and "eval/probe/acc_norm" in r for r in rows)
    again = multiple_choice_task(tokenizer_from_hf(checkpoint), str(mc), name="probe").evaluate(from_hf(out / "step_2"))
    assert rows[-1]["eval/probe/acc"] == again.metrics["acc"]
    assert rows[-1]["eval/probe/acc_norm"] == again.metrics["acc_norm"]
    assert json.loads((out / "best.json").read_text())["metric"] == "eval/probe/acc"


# -- lm-evaluation-harness itself (optional: pip install lm-eval) ---------------------------------------

LM_EVAL_TASK = """task: tk_arith_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {source}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}} is"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def test_lm_eval_harness_scores_our_task_the_same_and_runs_our_adapter(checkpoint, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    source = write_jsonl(tmp_path / "mc.jsonl", mc_rows())
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tk_arith_mc.yaml").write_text(LM_EVAL_TASK.format(source=source))
    manager = TaskManager(include_path=str(tmp_path / "tasks"))
    tokenizer = tokenizer_from_hf(checkpoint)
    ours = multiple_choice_task(tokenizer, str(source), template="{question} is").evaluate(from_hf(checkpoint))

    reference = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={checkpoint},dtype=float32",
                                        tasks=["tk_arith_mc"], task_manager=manager, device="cpu", batch_size=4,
                                        log_samples=True)
    adapter = lm_eval.simple_evaluate(model=lm_eval_model(from_hf(checkpoint), tokenizer, batch_size=4),
                                      tasks=["tk_arith_mc"], task_manager=manager, log_samples=True)
    for run in (reference, adapter):
        metrics = run["results"]["tk_arith_mc"]
        assert (metrics["acc,none"], metrics["acc_norm,none"]) == (ours.metrics["acc"], ours.metrics["acc_norm"])
        samples = sorted(run["samples"]["tk_arith_mc"], key=lambda s: s["doc_id"])
        lls = [ll for s in samples for (ll, _greedy), in s["resps"]]
        ours_lls = [ll for p in ours.predictions for ll in p["loglikelihoods"]]
        torch.testing.assert_close(torch.tensor(lls), torch.tensor(ours_lls), atol=1e-4, rtol=0)
    greedy = [g for s in sorted(adapter["samples"]["tk_arith_mc"], key=lambda s: s["doc_id"])
              for (_, g), in s["resps"]]
    assert greedy == [g for s in sorted(reference["samples"]["tk_arith_mc"], key=lambda s: s["doc_id"])
                      for (_, g), in s["resps"]]
