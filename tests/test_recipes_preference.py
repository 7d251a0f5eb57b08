"""End-to-end runs of the preference recipe (lora_dpo_single_device) on a tiny random Llama with the
shipped tokenizer and the shipped preference pairs, on CPU: DPO starts at ln 2 with zero rewards,
the packed layout and precomputed references give the live unpacked run's losses, resume is
exact, KTO / ORPO / SimPO run through the same recipe, and checkpoints load in transformers / peft."""

import json
import math
import os

import pytest
import torch

import tunekit.config
from test_recipes_single_device import _SignalAtStep, load_recipe, read_metrics, tiny_run  # noqa: F401  (fixture)
from tunekit.config.resolvers import asset_path

dpo_recipe = load_recipe("lora_dpo_single_device")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def make_cfg(tiny_run, out, *overrides, config="tiny/dpo"):
    ckpt, data = tiny_run
    pairs = asset_path("tiny_llama_preference")
    cfg = tunekit.config.load(config, [
        f"output_dir={out}", f"checkpoint_dir={ckpt}", "device=cpu", "dtype=fp32",
        f"dataset.source={pairs}/train.jsonl", f"val_dataset.source={pairs}/val.jsonl",
        f"forget_dataset.source={data}/pretrain_val.jsonl", "batch_size=4", "max_steps=4", "epochs=1",
        "eval_every_n_steps=2", "eval_max_batches=2", "save_every_n_steps=100", "keep_last_n=null",
        "log_every_n_steps=1", "lr_scheduler.num_warmup_steps=0", "optimizer.lr=1e-2", "shuffle=false",
        "metric_logging.tensorboard=false", "metric_logging.progress_bar=false", *overrides])
    if config == "tiny/dpo":
        tunekit.config.validate(cfg, schema=dpo_recipe.CONFIG)
    return cfg


def test_dpo_starts_at_ln2_with_zero_rewards_and_learns(tiny_run, tmp_path):
    # 8 pairs, one batch of 8 per step: every step sees the same pairs, so the loss must fall
    few = tmp_path / "few.jsonl"
    with open(os.path.join(asset_path("tiny_llama_preference"), "train.jsonl")) as f:
        few.write_text("".join(f.readlines()[:8]))
    out = tmp_path / "run"
    dpo_recipe.main(make_cfg(tiny_run, out, "max_steps=6", "epochs=10", "batch_size=8", f"dataset.source={few}",
                             "loss.loss_type=sigmoid"))  # (tiny/dpo itself runs RPO: DPO + NLL)
    rows = read_metrics(out)
    first = rows[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference (LoRA B = 0)
    # Zero up to rounding: the policy's forward (with autograd) runs the CPU block-causal attention
    # kernel, the reference's (no_grad) SDPA, which round differently (|logp difference| ~ 1e-6).
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6) and first["rewards/rejected"] == pytest.approx(0, abs=1e-6)
    for key in ("rewards/margins", "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"):
        assert key in first and math.isfinite(first[key])
    assert rows[-1]["loss"] < first["loss"] and rows[-1]["rewards/margins"] > 0
    evaluated = rows[1]
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen", "forget_loss"):
        assert key in evaluated, key


def test_packed_pairs_and_precomputed_references_equal_the_live_unpacked_run(tiny_run, tmp_path):
    dpo_recipe.main(make_cfg(tiny_run, tmp_path / "plain"))
    dpo_recipe.main(make_cfg(tiny_run, tmp_path / "packed", "dataset.packed=true", "val_dataset.packed=true"))
    dpo_recipe.main(make_cfg(tiny_run, tmp_path / "pre", "precompute_reference=true"))
    plain, packed, pre = (read_metrics(tmp_path / n) for n in ("plain", "packed", "pre"))
    for a, b, c in zip(plain, packed, pre, strict=True):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=2e-5), (key, a["step"])
                assert c[key] == pytest.approx(a[key], abs=2e-5), (key, a["step"])
    cache = list((tmp_path / "pre" / "reference_logps").glob("*.pt"))
    assert len(cache) == 2  # train and validation pairs
    table = torch.load(sorted(cache, key=os.path.getsize)[-1], weights_only=True)
    with open(os.path.join(asset_path("tiny_llama_preference"), "train.jsonl")) as f:
        num_pairs = sum(1 for line in f if line.strip())
    assert table.shape == (num_pairs, 2) and bool(torch.isfinite(table).all())
    # a later run on the same data and model reuses the cache (no second pass over the data)
    dpo_recipe.main(make_cfg(tiny_run, tmp_path / "pre2", "precompute_reference=true", "max_steps=1",
                             f"reference_cache_dir={tmp_path / 'pre' / 'reference_logps'}"))
    assert read_metrics(tmp_path / "pre2")[0]["loss"] == pytest.approx(pre[0]["loss"], abs=1e-7)


def test_ctrl_c_and_resume_reproduce_the_run_and_checkpoints_load_in_peft(tiny_run, tmp_path, monkeypatch):
    args = ("max_steps=5", "gradient_accumulation_steps=2", "lora.dropout=0.1", "shuffle=true")
    dpo_recipe.main(make_cfg(tiny_run, tmp_path / "full", *args))
    expected = [r["loss"] for r in read_metrics(tmp_path / "full")]
    out = tmp_path / "interrupted"
    monkeypatch.setattr(dpo_recipe, "training_steps", _SignalAtStep(dpo_recipe.training_steps, at=3))
    dpo_recipe.main(make_cfg(tiny_run, out, *args))
    monkeypatch.undo()
    assert sorted(p.name for p in out.glob("step_*")) == ["step_3"]
    dpo_recipe.main(make_cfg(tiny_run, out, *args, "resume=true"))
    assert [r["loss"] for r in read_metrics(out)] == expected  # exactly

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunekit.models import from_hf
    from tunekit.modules.peft import load_peft_adapter

    ckpt, _ = tiny_run
    step_dir = out / "step_5"
    model = load_peft_adapter(from_hf(ckpt), step_dir / "adapter").eval()  # no adapter dropout
    tokens = torch.randint(3, 1024, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)
        merged = AutoModelForCausalLM.from_pretrained(step_dir).eval()(tokens).logits
        peft_logits = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt),
                                                step_dir / "adapter").eval()(tokens).logits
    torch.testing.assert_close(merged, ours, atol=1e-4, rtol=0)
    torch.testing.assert_close(peft_logits, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("loss", ["orpo", "simpo", "kto", "[sigmoid,sft]", "ipo"])
def test_other_losses_run_through_the_same_recipe(tiny_run, tmp_path, loss):
    overrides = [f"loss.loss_type={loss}", "max_steps=3"]
    if loss == "kto":
        pairs = asset_path("tiny_llama_preference")
        overrides += ["dataset._component_=tunekit.data.kto_dataset", f"dataset.source={pairs}/train_kto.jsonl",
                      "val_dataset._component_=tunekit.data.kto_dataset", f"val_dataset.source={pairs}/val_kto.jsonl",
                      "dataset.max_seq_len=64", "val_dataset.max_seq_len=64"]
    if loss in ("orpo", "simpo"):
        overrides.append("loss.beta=1.0")
    out = tmp_path / "run"
    dpo_recipe.main(make_cfg(tiny_run, out, *overrides))
    rows = read_metrics(out)
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
    if loss == "kto":
        assert "kl" in rows[0] and "rewards/accuracies" not in rows[0]
    if loss in ("orpo", "simpo"):  # reference-free: nothing but the policy
        assert rows[0]["loss"] != pytest.approx(math.log(2), abs=1e-3)
    assert (out / "step_3" / "adapter" / "adapter_model.safetensors").is_file()


def test_config_mistakes_are_caught_by_validation(tiny_run, tmp_path):
    with pytest.raises(tunekit.config.ConfigError, match=r"loss.loss_type: expected one of .*got 'sigmod'; did you mean sigmoid"):
        make_cfg(tiny_run, tmp_path, "loss.loss_type=sigmod")
    with pytest.raises(tunekit.config.ConfigError, match=r"loss_weights \[1.0\] has 1 value\(s\) but loss_type"):
        make_cfg(tiny_run, tmp_path, "loss.loss_type=[sigmoid,sft]", "loss.loss_weights=[1.0]")
    with pytest.raises(tunekit.config.UserError, match="precompute_reference=true: KTO"):
        pairs = asset_path("tiny_llama_preference")
        dpo_recipe.main(make_cfg(tiny_run, tmp_path / "kto", "loss.loss_type=kto", "precompute_reference=true",
                                 "dataset._component_=tunekit.data.kto_dataset",
                                 f"dataset.source={pairs}/train_kto.jsonl",
                                 "val_dataset._component_=tunekit.data.kto_dataset",
                                 f"val_dataset.source={pairs}/val_kto.jsonl"))
    # a loss and a dataset of different kinds: one user error naming the dataset node, no KeyError
    with pytest.raises(tunekit.config.UserError, match=r"dataset: loss.loss_type kto trains on unpaired .*kto_dataset"):
        dpo_recipe.main(make_cfg(tiny_run, tmp_path / "kto_on_pairs", "loss.loss_type=kto"))
    with pytest.raises(tunekit.config.UserError, match=r"dataset: loss.loss_type sigmoid trains on chosen/rejected"):
        dpo_recipe.main(make_cfg(tiny_run, tmp_path / "dpo_on_kto", "loss.loss_type=sigmoid",
                                 "dataset._component_=tunekit.data.kto_dataset",
                                 f"dataset.source={pairs}/train_kto.jsonl"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(tunekit.config.UserError, match=r"reference_cache_dir: cannot create .*a_file/cache"):
        dpo_recipe.main(make_cfg(tiny_run, tmp_path / "bad_cache", "precompute_reference=true",
                                 f"reference_cache_dir={blocker / 'cache'}"))
    assert not list(tmp_path.glob("*/step_*"))


def test_a_nan_gradient_stops_the_run_before_the_update_and_keeps_the_last_checkpoint(tiny_run, tmp_path):
    """The non-finite guard in the preference step: a gradient made NaN in step 3's backward (the
    reference forward has none) stops the run at step 3, before the update; step_2 stays."""
    from tunekit.config import UserError

    out = tmp_path / "run"
    poisoned = ["model._component_=nan_gradient.from_hf_with_nan_gradient", "+model.nan_at_backward=3"]
    with pytest.raises(UserError, match=r"step 3: loss .*gradient norm nan") as info:
        dpo_recipe.main(make_cfg(tiny_run, out, "save_every_n_steps=2", *poisoned))
    assert f"the last checkpoint {out / 'step_2'} is intact" in str(info.value)
    assert [p.name for p in out.glob("step_*")] == ["step_2"]
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_metrics_file_uses_trl_names(tiny_run, tmp_path):
    out = tmp_path / "run"
    dpo_recipe.main(make_cfg(tiny_run, out, "max_steps=2"))
    row = json.loads((out / "logs" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected", "eval_rewards/accuracies"} <= row.keys()


# -- 2 processes (torchrun, gloo, CPU) against one device -----------------------------------------

@pytest.fixture(scope="module")
def distributed_runs(tiny_run, tmp_path_factory):
    """lora_dpo_distributed and full_dpo_distributed on 2 processes, full_dpo_distributed on 1, the
    single-device LoRA reference in this process, then a 2-process resume of the LoRA run."""
    from native_crash import retry_after_native_crash

    return retry_after_native_crash(_distributed_runs, tiny_run, tmp_path_factory)


def _distributed_runs(tiny_run, tmp_path_factory, attempt):
    import shutil

    from omegaconf import OmegaConf
    from test_recipes_distributed import launch, two_procs, wait

    from free_port import free_port

    root = tmp_path_factory.mktemp(f"dpo_dist{attempt}_")
    common = ["max_steps=4", "gradient_accumulation_steps=2", "eval_every_n_steps=2", "save_every_n_steps=2",
              "dataset.packed=true", "val_dataset.packed=true"]

    def config_file(name, config, *extra):
        """The run's whole config, resolved, as a file for `tunekit run --config`."""
        path = root / f"{name}.yaml"
        OmegaConf.save(make_cfg(tiny_run, root / name, *common, *extra, config=config), path, resolve=True)
        return str(path)

    def start(torchrun_args, recipe, name, config, *extra):
        log = root / f"{name}.log"
        return launch(torchrun_args, recipe, config_file(name, config, *extra), [], log), log

    r = {n: root / n for n in ("lora2", "full2", "full1", "ref_lora", "lora_resumed", "full_resumed")}
    full = ("optimizer.lr=1e-3",)
    procs = [start(two_procs(), "lora_dpo_distributed", "lora2", "tiny/dpo", "batch_size=2"),
             start(two_procs(), "full_dpo_distributed", "full2", "tiny/full_dpo", "batch_size=2", *full),
             start(["--nproc_per_node", "1", "--master_port", str(free_port())], "full_dpo_distributed", "full1",
                   "tiny/full_dpo", "batch_size=4", *full)]
    dpo_recipe.main(make_cfg(tiny_run, r["ref_lora"], *common, "batch_size=4"))
    wait(procs)
    for run, resumed in (("lora2", "lora_resumed"), ("full2", "full_resumed")):
        r[resumed].mkdir()
        shutil.copytree(r[run] / "step_2", r[resumed] / "step_2")
    wait([start(two_procs(), "lora_dpo_distributed", "lora_resumed", "tiny/dpo", "batch_size=2", "resume=true"),
          start(two_procs(), "full_dpo_distributed", "full_resumed", "tiny/full_dpo", "batch_size=2", *full,
                "resume=true")])
    return r


def _assert_curves_match(run, reference, tol=1e-5):
    rows, ref_rows = read_metrics(run), read_metrics(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for row, ref in zip(rows, ref_rows):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "eval_loss", "eval_rewards/accuracies"):
            if key in ref:
                assert row[key] == pytest.approx(ref[key], abs=tol), (key, row["step"])


def test_lora_dpo_on_2_processes_equals_one_device_and_resumes_exactly(distributed_runs):
    _assert_curves_match(distributed_runs["lora2"], distributed_runs["ref_lora"])
    resumed = read_metrics(distributed_runs["lora_resumed"])
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in read_metrics(distributed_runs["lora2"])[2:]]
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(distributed_runs["lora2"] / "step_4" / "adapter").r == 16


def test_full_dpo_on_2_processes_equals_1_and_loads_in_transformers(distributed_runs, tiny_run):
    from transformers import AutoModelForCausalLM

    from tunekit.models import from_hf

    _assert_curves_match(distributed_runs["full2"], distributed_runs["full1"])
    resumed = read_metrics(distributed_runs["full_resumed"])  # the frozen reference is rebuilt from checkpoint_dir
    assert [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in read_metrics(distributed_runs["full2"])[2:]]
    assert read_metrics(distributed_runs["full1"])[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    step_dir = distributed_runs["full2"] / "step_4"
    tokens = torch.randint(3, 1024, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = from_hf(step_dir)(tokens)
        theirs = AutoModelForCausalLM.from_pretrained(step_dir).eval()(tokens).logits
        base = from_hf(tiny_run[0])(tokens)
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
