"""The data-at-scale features through a real recipe run (tiny Llama, CPU): the epoch's short
accumulation step and a streamed dataset, each interrupted and resumed exactly."""

import pytest
from test_recipes_single_device import (  # noqa: F401  (tiny_run is a fixture)
    _SignalAtStep,
    load_recipe,
    make_cfg,
    read_metrics,
    tiny_run,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

lora_recipe = load_recipe("lora_finetune_single_device")


def run_interrupted_and_resumed(tmp_path, tiny_run, args, at):  # noqa: F811
    full = tmp_path / "full"
    lora_recipe.main(make_cfg("tiny/lora", tiny_run, full, *args))
    expected = read_metrics(full)
    out = tmp_path / "interrupted"
    real = lora_recipe.training_steps
    lora_recipe.training_steps = _SignalAtStep(real, at=at)
    try:
        lora_recipe.main(make_cfg("tiny/lora", tiny_run, out, *args))
    finally:
        lora_recipe.training_steps = real
    assert [p.name for p in out.iterdir() if p.name.startswith("step_")] == [f"step_{at}"]
    lora_recipe.main(make_cfg("tiny/lora", tiny_run, out, *args, "resume=true"))
    return expected, read_metrics(out)


def test_short_accumulation_step_is_trained_and_resume_across_it_is_exact(tiny_run, tmp_path):  # noqa: F811
    # 24 examples / batch 4 = 6 micro-batches per epoch; accumulation 4 -> steps of 4 and 2 micro-batches.
    args = ("max_steps=null", "epochs=3", "gradient_accumulation_steps=4", "lora.dropout=0.1", "optimizer.lr=1e-2",
            "save_every_n_steps=100", "eval_every_n_steps=100")
    expected, resumed = run_interrupted_and_resumed(tmp_path, tiny_run, args, at=2)  # step 2: the short one
    assert [r["step"] for r in expected] == list(range(1, 7))  # 2 steps per epoch, not 1
    assert [r["epoch"] for r in expected] == [0, 0, 1, 1, 2, 2]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in expected]  # exactly


def test_streamed_dataset_trains_and_resumes_exactly(tiny_run, tmp_path):  # noqa: F811
    pytest.importorskip("datasets")
    args = ("dataset.streaming=true", "dataset.packed=true", "dataset.max_seq_len=64", "batch_size=2",
            "max_steps=7", "gradient_accumulation_steps=2", "lora.dropout=0.1", "optimizer.lr=1e-2",
            "save_every_n_steps=100", "eval_every_n_steps=100", "num_workers=2")
    expected, resumed = run_interrupted_and_resumed(tmp_path, tiny_run, args, at=4)
    assert [r["step"] for r in expected] == list(range(1, 8))
    assert len({r["epoch"] for r in expected}) >= 2  # the stream was read again for a second epoch
    assert [r["loss"] for r in resumed] == [r["loss"] for r in expected]
