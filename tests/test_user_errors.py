"""Ordinary mistakes end a run with exactly one ``tunekit: error:`` line naming the culprit, exit
code 2 and no traceback, before any work: the step folder of the earlier run stays byte for byte
as it was and no new one appears. Each case runs ``tunekit run lora_finetune_single_device`` in
this process (the CLI's validation, then the recipe under ``user_errors``) on the continuation of
a finished 1-step run (``resume=true``)."""

import hashlib
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_recipes_single_device import tiny_run  # noqa: F401  (fixture)
from tunekit.cli.main import main


def run_tunekit(capsys, *argv) -> tuple[int, str]:
    """``tunekit run argv`` in this process: (exit code, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["run", *map(str, argv)])
    return info.value.code, capsys.readouterr().err


def base_args(ckpt, data, out, *extra):
    return ["lora_finetune_single_device", "--config", "tiny/lora", f"output_dir={out}", f"checkpoint_dir={ckpt}",
            "device=cpu", "dtype=fp32", f"dataset.source={data}/train.jsonl", f"val_dataset.source={data}/val.jsonl",
            f"forget_dataset.source={data}/pretrain_val.jsonl", "batch_size=4", "epochs=1", "save_every_n_steps=1",
            "eval_every_n_steps=1", "eval_max_batches=1", "metric_logging.tensorboard=false",
            "metric_logging.progress_bar=false", *extra]


def tree_digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tiny_run, tmp_path_factory):
    """An output_dir holding step_1 of a finished 1-step LoRA run."""
    ckpt, data = tiny_run
    out = tmp_path_factory.mktemp("finished") / "run"
    with pytest.raises(SystemExit) as info:
        main(["run", *base_args(ckpt, data, out, "max_steps=1")])
    assert info.value.code == 0
    assert [p.name for p in out.glob("step_*")] == ["step_1"]
    return out


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("TUNEKIT_DEBUG", raising=False)


def copy_model(src, dst, change):
    shutil.copytree(src, dst)
    change(dst)
    return dst


def rewrite_config(**fields):
    def change(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(fields)
        (folder / "config.json").write_text(json.dumps(config))
    return change


def rewrite_weights(edit):
    def change(folder):
        tensors = load_file(folder / "model.safetensors")
        edit(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return change


def truncate(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def bad_json(folder):
    (folder / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 64,,\n}')


class _Pickled:  # a class the weights_only unpickler refuses
    pass


def pickled_bin(folder):
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**tensors, "extra": _Pickled()}, folder / "pytorch_model.bin", pickle_protocol=pickle.HIGHEST_PROTOCOL)


def nan_weight(tensors):
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")


def smaller_vocabulary(folder):
    """The same model with a 512-row embedding (tied: no lm_head), next to the 1024-id tokenizer."""
    rewrite_config(vocab_size=512)(folder)
    rewrite_weights(lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:512].clone()}))(folder)


def missing_tensor(tensors):
    del tensors["model.layers.1.mlp.down_proj.weight"]


def misshaped_tensor(tensors):
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"][:32]


# (case id, extra overrides, change to a copy of the base model or None, fragments the error line must hold)
CASES = [
    ("batch_size=abc", ["batch_size=abc"], None, ["batch_size: expected a positive integer, got 'abc'"]),
    ("batch_size=0", ["batch_size=0"], None, ["batch_size: expected a positive integer, got 0"]),
    ("accumulation=-1", ["gradient_accumulation_steps=-1"], None,
     ["gradient_accumulation_steps: expected a positive integer, got -1"]),
    ("dtype=fp7", ["dtype=fp7"], None, ["dtype: expected one of fp32 | bf16, got 'fp7'"]),
    ("lora.rank=0", ["lora.rank=0"], None, ["lora.rank: expected a positive integer, got 0"]),
    ("lora.rnak", ["lora.rnak=16"], None, ["no key 'lora.rnak' in the config; did you mean lora.rank?"]),
    ("+lora.rnak", ["+lora.rnak=16"], None, ["lora.rnak: not a key this recipe reads", "did you mean lora.rank?"]),
    ("+lora.use_rslora", ["+lora.use_rslora=true"], None, ["lora.use_rslora: not a key this recipe reads"]),
    ("dataset typo", ["+dataset.trian_on_input=true"], None,
     ["dataset.trian_on_input: no such argument of tunekit.data.chat_dataset; did you mean train_on_input?"]),
    ("lora target", ["lora.targets=[q_proj,qproj]"], None,
     ["LoRA target(s) ['qproj'] match no nn.Linear in the model", "available Linear names"]),
    ("chat_format", ["tokenizer.chat_format=chatml2"], None,
     ["tokenizer.chat_format: unknown chat format 'chatml2'; did you mean chatml?"]),
    ("invalid config.json", [], bad_json, ["config.json: not valid JSON (line 2, column"]),
    ("truncated safetensors", [], truncate, ["model.safetensors: not a readable safetensors file"]),
    ("missing tensor", [], rewrite_weights(missing_tensor), ["missing tensors ['layers.1.mlp.w2.weight']"]),
    ("mis-shaped tensor", [], rewrite_weights(misshaped_tensor),
     ["layers.0.attn.q_proj.weight: checkpoint shape (32, 64) != model shape (64, 64)"]),
    ("model_type", [], rewrite_config(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"]),
     ["config.json: model_type 'gpt_neox'", "is not supported"]),
    ("vocabulary", [], smaller_vocabulary, ["the tokenizer has 1024 token ids but the model of", "embeds only 512"]),
    ("pickled .bin", [], pickled_bin, ["pytorch_model.bin: refused: it pickles Python objects besides tensors"]),
    ("NaN weight", [], rewrite_weights(nan_weight),
     ["tensor 'model.layers.1.mlp.up_proj.weight' [128, 64] holds 1 NaN/infinite value(s) (loading)"]),
]


@pytest.mark.parametrize("case, overrides, change, fragments", CASES, ids=[c[0] for c in CASES])
def test_mistake_is_one_line_exit_2_and_leaves_checkpoints_alone(tiny_run, finished_run, tmp_path, capsys,
                                                                 case, overrides, change, fragments):
    ckpt, data = tiny_run
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = tree_digest(out / "step_1")
    model_dir = copy_model(ckpt, tmp_path / "model", change) if change is not None else ckpt
    code, err = run_tunekit(capsys, *base_args(model_dir, data, out, "resume=true", "max_steps=2", *overrides))
    errors = [line for line in err.splitlines() if line.startswith("tunekit: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert tree_digest(out / "step_1") == before
    assert [p.name for p in out.glob("step_*")] == ["step_1"] and not list(out.glob(".step_*"))


def test_empty_dataset_file_is_named(tiny_run, finished_run, tmp_path, capsys):
    ckpt, data = tiny_run
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    code, err = run_tunekit(capsys, *base_args(ckpt, data, out, "resume=true", "max_steps=2",
                                               f"dataset.source={empty}"))
    assert code == 2 and "Traceback" not in err, err
    assert f"tunekit: error: {empty}: holds no examples" in err


def test_device_without_an_accelerator(tiny_run, finished_run, tmp_path, capsys):
    if torch.accelerator.is_available():
        pytest.skip("this machine has an accelerator")
    ckpt, data = tiny_run
    code, err = run_tunekit(capsys, *base_args(ckpt, data, tmp_path / "run", "device=cuda"))
    assert code == 2 and "Traceback" not in err
    assert "tunekit: error: device=cuda: no cuda device is available on this machine; use device=cpu" in err


def test_corrupt_recipe_state_names_the_file_and_the_previous_step(tiny_run, finished_run, tmp_path, capsys):
    ckpt, data = tiny_run
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    shutil.copytree(out / "step_1", out / "step_2")  # a second step whose state is damaged
    state = out / "step_2" / "recipe_state" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    before = {name: tree_digest(out / name) for name in ("step_1", "step_2")}
    code, err = run_tunekit(capsys, *base_args(ckpt, data, out, "resume=true", "max_steps=3"))
    assert code == 2 and "Traceback" not in err, err
    assert f"tunekit: error: {state}: the recipe state of step_2 is unreadable" in err
    assert f"resume from the previous step with resume_from={out / 'step_1'}" in err
    assert {name: tree_digest(out / name) for name in ("step_1", "step_2")} == before

    # the way out the message names: resume_from the previous step (which re-saves step_2 whole)
    code, err = run_tunekit(capsys, *base_args(ckpt, data, out, f"resume_from={out / 'step_1'}", "max_steps=2"))
    assert code == 0, err
    assert torch.load(state, weights_only=True)["step"] == 2


def test_resume_with_nothing_to_resume_says_so_and_starts(tiny_run, tmp_path, capsys, caplog):
    ckpt, data = tiny_run
    out = tmp_path / "fresh"
    with caplog.at_level("INFO"):
        code, err = run_tunekit(capsys, *base_args(ckpt, data, out, "resume=true", "max_steps=1"))
    assert code == 0, err
    assert f"resume=true: {out} holds no step_<N>/ checkpoint yet; starting from step 0" in caplog.text
    assert [p.name for p in out.glob("step_*")] == ["step_1"]
    code, err = run_tunekit(capsys, *base_args(ckpt, data, out, f"resume_from={tmp_path / 'nowhere'}"))
    assert code == 2 and f"resume_from={tmp_path / 'nowhere'} does not exist" in err


def test_debug_shows_the_traceback(tiny_run, tmp_path, monkeypatch, capsys):
    ckpt, data = tiny_run
    monkeypatch.setenv("TUNEKIT_DEBUG", "1")
    from tunekit.config import UserError

    with pytest.raises(UserError, match="LoRA target"):
        main(["run", *base_args(ckpt, data, tmp_path / "run", "lora.targets=[qproj]")])


def test_nan_gradient_mid_run_stops_at_that_step_and_the_last_checkpoint_resumes(tiny_run, tmp_path, capsys,
                                                                                 monkeypatch):
    """A gradient made NaN during step 3 (a backward hook of the model builder): the run stops at
    step 3 before updating, step_2 stays intact, and resuming from it finishes the run."""
    ckpt, data = tiny_run
    out = tmp_path / "run"
    poisoned = ["model._component_=nan_gradient.from_hf_with_nan_gradient", "+model.nan_at_backward=3"]
    code, err = run_tunekit(capsys, *base_args(ckpt, data, out, "max_steps=4", "save_every_n_steps=2",
                                               "eval_every_n_steps=100", *poisoned))
    errors = [line for line in err.splitlines() if line.startswith("tunekit: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("tunekit: error: step 3: loss ") and "gradient norm nan" in errors[0]
    assert "first parameter with a non-finite gradient: layers." in errors[0]
    assert f"the last checkpoint {out / 'step_2'} is intact" in errors[0]
    assert [p.name for p in out.glob("step_*")] == ["step_2"]
    before = tree_digest(out / "step_2")
    code, err = run_tunekit(capsys, *base_args(ckpt, data, out, "max_steps=4", "save_every_n_steps=2",
                                               "eval_every_n_steps=100", "resume=true"))
    assert code == 0, err
    assert sorted(p.name for p in out.glob("step_*")) == ["step_2", "step_4"]
    assert tree_digest(out / "step_2") == before
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_a_nan_weight_is_never_saved(tiny_run, tmp_path, capsys):
    """An infinite lr makes the update itself non-finite (the gradients are finite, so the step's
    guard passes): the save of that step refuses, nothing is written, the error names the tensor."""
    ckpt, data = tiny_run
    out = tmp_path / "run"
    code, err = run_tunekit(capsys, *base_args(ckpt, data, out, "max_steps=1", "optimizer.lr=.inf",
                                               "max_grad_norm=null", "lr_scheduler.num_warmup_steps=0"))
    assert code == 2 and "Traceback" not in err, err
    assert "holds" in err and "NaN/infinite value(s) (saving)" in err
    assert not list(out.glob("step_*")) and not list(out.glob(".step_*"))
    assert os.path.isdir(out / "logs")


def test_validate_reports_typos_ignored_keys_and_swallowed_arguments(capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["validate", "tiny/lora", "+lora.rnak=16", "+lora.use_rslora=true", "+dataset.trian_on_input=true"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert err.startswith("tunekit: error: tiny/lora: 3 problems\n")
    assert "  lora.rnak: not a key this recipe reads (it would be ignored); did you mean lora.rank?" in err
    assert "  lora.use_rslora: not a key this recipe reads (it would be ignored)" in err
    assert "  dataset.trian_on_input: no such argument of tunekit.data.chat_dataset; did you mean train_on_input?" in err
