"""The distributed recipes launched through the real CLI (`tunekit run --nproc_per_node 2 ...`,
torchrun, gloo, CPU, one thread per rank) on tiny random Llamas, against the single-device recipes
run in this process on the same global batch.

Launches are started together and overlap (each is mostly process start-up); the checks read their
output folders: loss curves, HF / PEFT checkpoints, resume from the sharded state with 2 -> 2,
2 -> 1 and 1 -> 2 processes, and a two-"node" c10d rendezvous (QLoRA)."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import tunekit.config
from free_port import free_port
from native_crash import check_launch, retry_after_native_crash
from test_recipes_single_device import load_recipe, read_metrics, tiny_run  # noqa: F401  (fixture)

LAUNCH_TIMEOUT = 240
COMMON = ("device=cpu", "dtype=fp32", "max_steps=4", "epochs=10", "eval_every_n_steps=2", "eval_max_batches=2",
          "save_every_n_steps=2", "keep_last_n=null", "log_every_n_steps=1", "lr_scheduler.num_warmup_steps=1",
          "metric_logging.tensorboard=false", "metric_logging.progress_bar=false")
# global batch 4 per optimizer step: 2 ranks x 1 example x 2 micro-batches (single device: 2 x 2)
LORA = ("optimizer.lr=1e-2", "gradient_accumulation_steps=2")
FULL = ("optimizer.lr=3e-3", "fsdp.reshard_after_forward=true", "activation_checkpointing=true",
        "activation_offloading=true")
QLORA = ("optimizer.lr=1e-2", "max_steps=3")


def overrides(model_dir, data_dir, out, *extra):
    return [f"output_dir={out}", f"checkpoint_dir={model_dir}", f"dataset.source={data_dir}/train.jsonl",
            f"val_dataset.source={data_dir}/val.jsonl", f"forget_dataset.source={data_dir}/pretrain_val.jsonl",
            *COMMON, *extra]




def launch(torchrun_args, recipe, config, args, log_path, new_session=False, test_modules=False):
    """`tunekit run <torchrun_args> <recipe> --config <config> <args>` in the background, output to
    a file; ``new_session``: in its own process group, as a terminal's foreground job;
    ``test_modules``: this folder's modules (tests/nan_gradient.py) importable in every process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    if test_modules:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "tunekit.cli.main", "run", *torchrun_args, recipe, "--config", config, *args]
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=new_session)


def wait(procs):
    """Wait for every launch of the list; a failure reports the logs of all of them (in a
    two-node launch the crashing node is often not the one whose exit code shows it)."""
    for proc, _ in procs:
        try:
            proc.wait(timeout=LAUNCH_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log_path in procs:
        logs = "\n".join(f"--- {p} ---\n{open(p).read()[-4000:]}" for _, p in procs if p != log_path)
        check_launch(proc.returncode, f"{logs}\n--- {log_path} ---\n{open(log_path).read()}", str(proc.args))


def two_procs():
    return ["--nproc_per_node", "2", "--master_port", str(free_port())]


def copy_checkpoint(src_run, step, dst_run):
    dst_run.mkdir()
    shutil.copytree(src_run / f"step_{step}", dst_run / f"step_{step}")


@pytest.fixture(scope="module")
def qlora_model(tiny_run):
    """A tiny Llama whose NF4 weights split over 2 ranks (dim 256: 4 second-level scale blocks per
    attention weight)."""
    transformers = pytest.importorskip("transformers")
    ckpt, _ = tiny_run
    out = ckpt.parent / "model256"
    config = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(ckpt / name, out / name)
    return out


@pytest.fixture(scope="module")
def runs(tiny_run, qlora_model, tmp_path_factory):
    """Every launch of this file, plus the single-device references, in three overlapping waves
    (started over once after a native crash of torch's gloo, see tests/native_crash.py)."""
    return retry_after_native_crash(_all_runs, tiny_run, qlora_model, tmp_path_factory)


def _all_runs(tiny_run, qlora_model, tmp_path_factory, attempt):
    ckpt, data = tiny_run
    root = tmp_path_factory.mktemp(f"dist_runs{attempt}_")
    r = {name: root / name for name in ("lora2", "full2", "qlora_nodes", "lora_2to2", "lora_2to1", "lora_1to2",
                                        "ref_lora", "ref_full", "ref_qlora", "nan")}
    # wave 1: LoRA and full fine-tuning on 2 processes; QLoRA on two 1-process "nodes" (c10d rendezvous)
    procs = [
        (launch(two_procs(), "lora_finetune_distributed", "tiny/lora",
                overrides(ckpt, data, r["lora2"], *LORA, "batch_size=1"), root / "lora2.log"), root / "lora2.log"),
        (launch(two_procs(), "full_finetune_distributed", "tiny/full",
                overrides(ckpt, data, r["full2"], *FULL, "batch_size=2"), root / "full2.log"), root / "full2.log"),
    ]
    port = free_port()
    for node in (0, 1):
        node_args = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                     "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "tunekit-test-nodes"]
        log_path = root / f"node{node}.log"
        procs.append((launch(node_args, "lora_finetune_distributed", "tiny/qlora",
                             overrides(qlora_model, data, r["qlora_nodes"], *QLORA, "batch_size=2"), log_path), log_path))
    # meanwhile, in this process: the single-device recipes on the same global batches
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lora, full = load_recipe("lora_finetune_single_device"), load_recipe("full_finetune_single_device")
        lora.main(tunekit.config.load("tiny/lora", overrides(ckpt, data, r["ref_lora"], *LORA, "batch_size=2")))
        full.main(tunekit.config.load("tiny/full", overrides(ckpt, data, r["ref_full"], *FULL, "batch_size=4")))
        lora.main(tunekit.config.load("tiny/qlora", overrides(qlora_model, data, r["ref_qlora"], *QLORA,
                                                              "batch_size=4")))
    finally:
        torch.set_num_threads(previous)
    wait(procs)

    # wave 2: resume the LoRA run from its sharded step_2 on 2 processes and on 1; the 1-process run
    # also saves step 3 for wave 3. And the LoRA run again with a gradient made NaN during step 3
    # (a backward hook of the model builder, on rank 0 only: the reduction spreads it)
    copy_checkpoint(r["lora2"], 2, r["lora_2to2"])
    copy_checkpoint(r["lora2"], 2, r["lora_2to1"])
    nan_run = launch(two_procs(), "lora_finetune_distributed", "tiny/lora",
                     overrides(ckpt, data, r["nan"], *LORA, "batch_size=1",
                               "model._component_=nan_gradient.from_hf_with_nan_gradient", "+model.nan_at_backward=5"),
                     root / "nan.log", test_modules=True)
    procs = [
        (launch(two_procs(), "lora_finetune_distributed", "tiny/lora",
                overrides(ckpt, data, r["lora_2to2"], *LORA, "batch_size=1", "resume=true"), root / "r22.log"),
         root / "r22.log"),
        (launch(["--nproc_per_node", "1", "--master_port", str(free_port())], "lora_finetune_distributed", "tiny/lora",
                overrides(ckpt, data, r["lora_2to1"], *LORA, "batch_size=2", "resume=true", "save_every_n_steps=3"),
                root / "r21.log"), root / "r21.log"),
    ]
    wait(procs)
    nan_run.wait(timeout=LAUNCH_TIMEOUT)
    r["nan_returncode"] = nan_run.returncode
    r["nan_steps_before_resume"] = sorted(p.name for p in r["nan"].glob("step_*"))
    # wave 3: resume the step_3 written by 1 process on 2 processes, and the NaN run from its step_2
    # with the plain model; meanwhile a long DoRA run gets
    # a Ctrl-C (SIGINT to its whole process group, as a terminal sends it)
    copy_checkpoint(r["lora_2to1"], 3, r["lora_1to2"])
    resumed = launch(two_procs(), "lora_finetune_distributed", "tiny/lora",
                     overrides(ckpt, data, r["lora_1to2"], *LORA, "batch_size=1", "resume=true"), root / "r12.log")
    nan_resumed = launch(two_procs(), "lora_finetune_distributed", "tiny/lora",
                         overrides(ckpt, data, r["nan"], *LORA, "batch_size=1", "resume=true"), root / "nan_resumed.log")
    r["ctrl_c"] = root / "ctrl_c"
    long_run = launch(two_procs(), "lora_finetune_distributed", "tiny/dora",
                      overrides(ckpt, data, r["ctrl_c"], *LORA, "batch_size=1", "max_steps=1000", "save_every_n_steps=1000",
                                "eval_every_n_steps=1000"), root / "ctrl_c.log", new_session=True)
    # and a long full fine-tune gets a SIGTERM sent to the launched process alone (`kill`, a
    # container runtime stopping its main process)
    r["sigterm"] = root / "sigterm"
    long_full = launch(two_procs(), "full_finetune_distributed", "tiny/full",
                       overrides(ckpt, data, r["sigterm"], *FULL, "batch_size=1", "max_steps=1000",
                                 "save_every_n_steps=1000", "eval_every_n_steps=1000"), root / "sigterm.log")
    for proc, run, send in ((long_run, r["ctrl_c"], lambda pid: os.killpg(pid, signal.SIGINT)),
                            (long_full, r["sigterm"], lambda pid: os.kill(pid, signal.SIGTERM))):
        metrics = run / "logs" / "metrics.jsonl"
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline and len(read_lines(metrics)) < 2:
            time.sleep(0.2)
        send(proc.pid)
    long_run.wait(timeout=LAUNCH_TIMEOUT)
    long_full.wait(timeout=LAUNCH_TIMEOUT)
    wait([(resumed, root / "r12.log"), (nan_resumed, root / "nan_resumed.log")])
    return r


def read_lines(path):
    return path.read_text().splitlines() if path.is_file() else []


def losses(run):
    return [row["loss"] for row in read_metrics(run)]


def assert_curves_match(run, reference, tol=1e-5):
    rows, ref_rows = read_metrics(run), read_metrics(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for row, ref in zip(rows, ref_rows):
        for key in ("loss", "grad_norm", "lr", "val_loss", "forget_loss"):
            if key in ref:
                assert row[key] == pytest.approx(ref[key], abs=tol), (key, row, ref)


def test_lora_loss_curve_equals_single_device(runs):
    assert_curves_match(runs["lora2"], runs["ref_lora"])
    assert losses(runs["lora2"])[-1] < losses(runs["lora2"])[0]
    assert "val_loss" in read_metrics(runs["lora2"])[1]


def test_lora_checkpoint_loads_in_transformers_and_peft(runs, tiny_run):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tunekit.models import from_hf
    from tunekit.modules.peft import apply_lora, load_peft_adapter

    ckpt, _ = tiny_run
    step_dir = runs["lora2"] / "step_4"
    assert {p.name for p in (step_dir / "recipe_state").iterdir()} >= {".metadata", "extra.pt"}
    assert not list(runs["lora2"].glob(".step_*"))  # no tmp folders left behind
    ours_adapter = load_file(step_dir / "adapter" / "adapter_model.safetensors")
    ref_adapter = load_file(runs["ref_lora"] / "step_4" / "adapter" / "adapter_model.safetensors")
    assert ours_adapter.keys() == ref_adapter.keys()
    for key in ref_adapter:
        torch.testing.assert_close(ours_adapter[key], ref_adapter[key], atol=1e-5, rtol=0, msg=key)

    model = apply_lora(from_hf(ckpt), ["q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3"], rank=16, alpha=32)
    load_peft_adapter(model, step_dir / "adapter")
    tokens = torch.randint(3, 1024, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)
        merged = AutoModelForCausalLM.from_pretrained(step_dir).eval()(tokens).logits
        peft_logits = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt),
                                                step_dir / "adapter").eval()(tokens).logits
        base = from_hf(ckpt)(tokens)
    assert (ours - base).abs().max() > 1e-2  # training changed the model
    torch.testing.assert_close(merged, ours, atol=1e-4, rtol=0)
    torch.testing.assert_close(peft_logits, ours, atol=1e-4, rtol=0)


def test_full_loss_curve_and_checkpoint(runs):
    """Full fine-tune with activation checkpointing, activation offloading and
    reshard_after_forward=true: same curve as one device; the HF checkpoint loads in transformers."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tunekit.models import from_hf

    assert_curves_match(runs["full2"], runs["ref_full"])
    step_dir = runs["full2"] / "step_4"
    ours, ref = load_file(step_dir / "model.safetensors"), load_file(runs["ref_full"] / "step_4" / "model.safetensors")
    assert ours.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], atol=1e-5, rtol=0, msg=key)
    tokens = torch.randint(3, 1024, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(step_dir).eval()(tokens).logits
        torch.testing.assert_close(theirs, from_hf(step_dir)(tokens), atol=1e-4, rtol=0)


def test_resume_from_sharded_state_with_same_and_other_process_counts(runs):
    uninterrupted = read_metrics(runs["lora2"])
    same = read_metrics(runs["lora_2to2"])
    assert [r["step"] for r in same] == [3, 4]
    assert [r["loss"] for r in same] == [r["loss"] for r in uninterrupted[2:]]  # exactly
    fewer = read_metrics(runs["lora_2to1"])
    assert [r["step"] for r in fewer] == [3, 4]
    for row, ref in zip(fewer, uninterrupted[2:]):
        assert row["loss"] == pytest.approx(ref["loss"], abs=1e-5)
    more = read_metrics(runs["lora_1to2"])
    assert [r["step"] for r in more] == [4]
    assert more[0]["loss"] == pytest.approx(uninterrupted[3]["loss"], abs=1e-5)
    assert "resumed from" in (runs["lora_1to2"].parent / "r12.log").read_text()


def test_two_node_rendezvous_trains_qlora_together(runs):
    from peft import PeftConfig

    logs = [(runs["qlora_nodes"].parent / f"node{n}.log").read_text() for n in (0, 1)]
    assert sum("2 processes" in log for log in logs) == 1  # global rank 0 is on one of the nodes
    assert_curves_match(runs["qlora_nodes"], runs["ref_qlora"])
    assert PeftConfig.from_pretrained(runs["qlora_nodes"] / "step_3" / "adapter").r == 16


def test_ctrl_c_stops_every_rank_after_a_saved_step(runs):
    """Ctrl-C under torchrun (DoRA): every rank finishes the step, the checkpoint is saved, all exit."""
    from peft import PeftConfig

    log = (runs["ctrl_c"].parent / "ctrl_c.log").read_text()
    assert "stopped at step" in log, log[-3000:]
    saved = [p.name for p in runs["ctrl_c"].iterdir() if p.name.startswith("step_")]
    last = read_metrics(runs["ctrl_c"])[-1]["step"]
    assert saved == [f"step_{last}"] and last < 1000
    assert (runs["ctrl_c"] / f"step_{last}" / "recipe_state" / ".metadata").is_file()
    assert PeftConfig.from_pretrained(runs["ctrl_c"] / f"step_{last}" / "adapter").use_dora


def test_sigterm_to_the_launcher_stops_every_rank_after_a_saved_step(runs):
    """SIGTERM to the `tunekit run` process only: torchrun's agent (which that process became) hands
    it to the ranks, they finish the step and save; no rank is left running."""
    log = (runs["sigterm"].parent / "sigterm.log").read_text()
    assert "SIGTERM: saving a checkpoint" in log and "stopped at step" in log, log[-3000:]
    saved = [p.name for p in runs["sigterm"].iterdir() if p.name.startswith("step_")]
    last = read_metrics(runs["sigterm"])[-1]["step"]
    assert saved == [f"step_{last}"] and last < 1000
    assert (runs["sigterm"] / f"step_{last}" / "model.safetensors").is_file()
    assert (runs["sigterm"] / f"step_{last}" / "recipe_state" / ".metadata").is_file()


def test_a_nan_gradient_stops_every_rank_at_its_step_and_the_last_checkpoint_resumes(runs):
    """A gradient made NaN during step 3 on rank 0 (2 micro-batches per step: the 5th backward):
    every rank stops at step 3 with one error line and exit code 2, before the update; step_2 is
    intact, and resuming from it gives the uninterrupted run's losses exactly."""
    log = (runs["nan"].parent / "nan.log").read_text()
    assert runs["nan_returncode"] == 2, log[-3000:]  # every rank exited 2: a user-facing error
    errors = [line for line in log.splitlines() if "tunekit: error:" in line]
    assert len(errors) == 3, log[-3000:]  # one per rank, then the launcher's summary
    assert all("step 3: loss " in e and "gradient norm nan" in e for e in errors[:2]), errors
    assert "lora_finetune_distributed.py failed on rank 0 (exit code 2), rank 1 (exit code 2)" in errors[2]
    assert "Traceback" not in log
    assert runs["nan_steps_before_resume"] == ["step_2"]
    assert [r["loss"] for r in read_metrics(runs["nan"])] == losses(runs["lora2"])
