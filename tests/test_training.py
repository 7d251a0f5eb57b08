"""tunekit.training helpers: losses vs float64 references, lr schedules, the resumable sampler,
RNG state, atomic step folders, activation checkpointing, Ctrl-C flag, metric logging."""

import json
import math
import os
import random
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tunekit.config import UserError
from tunekit.training.activation_checkpointing import apply_activation_checkpointing
from tunekit.training.device import get_device, get_dtype
from tunekit.training.interrupt import stop_on_interrupt
from tunekit.losses.cross_entropy import chunked_cross_entropy, count_label_tokens, linear_cross_entropy
from tunekit.training.lr_schedules import constant_with_warmup, cosine_with_warmup
from tunekit.training.metric_logging import MetricLogger, peak_memory_gib
from tunekit.training.metric_sinks import JsonlSink, ProgressBarSink, StdoutSink, TensorBoardSink
from tunekit.training.rng import get_rng_state, set_rng_state, set_seed
from tunekit.training.sampler import ResumableSampler
from tunekit.checkpoint.step_folders import find_latest_checkpoint, list_checkpoints, load_recipe_state, save_recipe_state
from tunekit.training.step_checkpoints import save_step_checkpoint


def _labels(b, s, vocab, g):
    labels = torch.randint(0, vocab, (b, s), generator=g)
    labels[torch.rand(b, s, generator=g) < 0.3] = -100
    return labels


@pytest.mark.parametrize("num_chunks", [1, 3, 8])
def test_chunked_cross_entropy_matches_float64_sum(num_chunks):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 13, 50, generator=g)
    labels = _labels(2, 13, 50, g)
    logits.requires_grad_(True)
    loss = chunked_cross_entropy(logits, labels, num_chunks=num_chunks)
    ref_logits = logits.detach().double().requires_grad_(True)
    ref = F.cross_entropy(ref_logits.view(-1, 50), labels.view(-1), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-5)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-6)
    assert count_label_tokens(labels) == int((labels != -100).sum())
    from tunekit.data import CROSS_ENTROPY_IGNORE_INDEX
    from tunekit.losses.cross_entropy import IGNORE_INDEX

    assert IGNORE_INDEX == CROSS_ENTROPY_IGNORE_INDEX


def test_chunked_cross_entropy_bf16_logits_computed_in_fp32():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(1, 16, 300, generator=g) * 4).bfloat16()
    labels = _labels(1, 16, 300, g)
    loss = chunked_cross_entropy(logits, labels, num_chunks=4)
    ref = F.cross_entropy(logits.double().view(-1, 300), labels.view(-1), reduction="sum")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-4)


def test_chunked_cross_entropy_all_masked_is_zero_and_shape_error():
    logits = torch.randn(1, 4, 10, requires_grad=True)
    loss = chunked_cross_entropy(logits, torch.full((1, 4), -100))
    assert loss.item() == 0.0
    with pytest.raises(ValueError, match="do not match"):
        chunked_cross_entropy(logits, torch.zeros(1, 5, dtype=torch.long))


def test_linear_cross_entropy_matches_full_projection():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g, requires_grad=True)
    labels = _labels(2, 9, 40, g)
    loss = linear_cross_entropy(hidden, weight, labels, num_chunks=3)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = F.cross_entropy((h64 @ w64.t()).view(-1, 40), labels.view(-1), reduction="sum")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-4)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-5)


def _lrs(scheduler, n):
    out = []
    for _ in range(n):
        out.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def test_cosine_with_warmup_formula_and_resume():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    lrs = _lrs(cosine_with_warmup(opt, num_warmup_steps=4, num_training_steps=14, min_lr_ratio=0.1), 15)
    assert lrs[:4] == pytest.approx([2.0 * (i + 1) / 5 for i in range(4)])
    for step in range(4, 15):
        progress = min(1.0, (step - 4) / 10)
        assert lrs[step] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))))
    assert lrs[14] == pytest.approx(0.2)
    # state_dict round trip continues the same curve
    opt2 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    first = cosine_with_warmup(opt2, num_warmup_steps=4, num_training_steps=14, min_lr_ratio=0.1)
    _lrs(first, 6)
    opt3 = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    opt3.load_state_dict(opt2.state_dict())
    resumed = cosine_with_warmup(opt3, num_warmup_steps=4, num_training_steps=14, min_lr_ratio=0.1)
    resumed.load_state_dict(first.state_dict())
    assert _lrs(resumed, 9) == pytest.approx(lrs[6:15])


def test_constant_with_warmup_and_errors():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    assert _lrs(constant_with_warmup(opt, num_warmup_steps=3), 6) == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])
    with pytest.raises(ValueError, match="num_training_steps"):
        cosine_with_warmup(opt, num_warmup_steps=0, num_training_steps=0)


def test_sampler_covers_dataset_across_ranks_and_epochs_differ():
    samplers = [ResumableSampler(10, rank=r, world_size=3, seed=5) for r in range(3)]
    seen = [list(s) for s in samplers]
    assert all(len(x) == 4 == len(s) for x, s in zip(seen, samplers))
    assert set(sum(seen, [])) == set(range(10))
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != seen[0]
    assert list(ResumableSampler(6, shuffle=False)) == list(range(6))
    assert len(ResumableSampler(10, world_size=3, drop_last=True)) == 3


def test_sampler_resume_continues_with_the_next_index():
    full = ResumableSampler(20, rank=1, world_size=2, seed=3)
    full.set_epoch(2)
    expected = list(full)
    sampler = ResumableSampler(20, rank=1, world_size=2, seed=3)
    sampler.set_epoch(2)
    it = iter(sampler)
    head = [next(it) for _ in range(4)]
    state = sampler.state_dict()
    assert state["position"] == 4 and state["epoch"] == 2
    resumed = ResumableSampler(20, rank=1, world_size=2, seed=3)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the recipe calls set_epoch for the restored epoch: position is kept
    assert head + list(resumed) == expected
    assert sampler.state_dict(consumed=2)["position"] == 2
    with pytest.raises(ValueError, match="same data and seed"):
        ResumableSampler(21, seed=3).load_state_dict(state)


def test_rng_state_roundtrip_through_weights_only_file(tmp_path):
    set_seed(7)
    state = get_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    set_seed(123)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1]
    assert torch.equal(got[2], expected[2])


def _write_files(folder):
    (folder / "a.txt").write_text("x")
    save_recipe_state(folder, {"step": 3, "t": torch.arange(3)})


def test_step_checkpoint_atomic_and_latest(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    save_step_checkpoint(tmp_path, 2, _write_files)
    save_step_checkpoint(tmp_path, 10, _write_files)

    def crash(folder):
        (folder / "half.txt").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_step_checkpoint(tmp_path, 12, crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_2"]
    latest = find_latest_checkpoint(tmp_path)
    assert latest.name == "step_10"  # numeric, not lexicographic, order
    state = load_recipe_state(latest)
    assert state["step"] == 3 and torch.equal(state["t"], torch.arange(3))
    # a tmp folder of a dead process (crash without cleanup) is ignored, then removed by the next save
    (tmp_path / ".step_20.tmp-999999999").mkdir()
    assert find_latest_checkpoint(tmp_path).name == "step_10"
    save_step_checkpoint(tmp_path, 11, _write_files, keep_last_n=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 11]
    assert not (tmp_path / ".step_20.tmp-999999999").exists()
    # re-saving an existing step replaces it only once complete
    save_step_checkpoint(tmp_path, 11, lambda d: (d / "b.txt").write_text("y"))
    assert sorted(p.name for p in (tmp_path / "step_11").iterdir()) == ["b.txt"]
    with pytest.raises(FileNotFoundError, match="no recipe state"):
        load_recipe_state(tmp_path / "step_11")


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x, *, mask=None):
        self.calls += 1
        return x + torch.tanh(self.lin(x))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.output = nn.Linear(8, 2)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x, mask=None)
        return self.output(x)


def test_activation_checkpointing_keeps_names_and_gradients():
    torch.manual_seed(0)
    ref, net = _Net(), _Net()
    net.load_state_dict(ref.state_dict())
    keys = list(net.state_dict())
    apply_activation_checkpointing(net)
    assert list(net.state_dict()) == keys
    assert [n for n, _ in net.named_parameters()] == [n for n, _ in ref.named_parameters()]
    x = torch.randn(3, 8)
    ref(x).square().sum().backward()
    net(x).square().sum().backward()
    for (name, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    assert net.layers[0].calls == 2  # forward ran again in backward: activations were recomputed
    with pytest.raises(ValueError, match="model.layers"):
        apply_activation_checkpointing(nn.Linear(2, 2))


@pytest.mark.parametrize("first,second,abort", [(signal.SIGINT, signal.SIGINT, KeyboardInterrupt),
                                                (signal.SIGTERM, signal.SIGTERM, SystemExit),
                                                (signal.SIGTERM, signal.SIGINT, KeyboardInterrupt)])
def test_stop_on_interrupt_sets_flag_then_second_aborts(first, second, abort):
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_interrupt() as flag:
        assert not flag.is_set
        os.kill(os.getpid(), first)
        assert flag.is_set
        with pytest.raises(abort):
            os.kill(os.getpid(), second)
    assert {s: signal.getsignal(s) for s in previous} == previous


def test_metric_logger_writes_jsonl_tensorboard_and_stdout(tmp_path, capsys):
    sinks = [StdoutSink(), JsonlSink(), TensorBoardSink(), ProgressBarSink()]
    with MetricLogger(tmp_path, sinks, total_steps=3, log_every=2) as logger:
        for step in (1, 2, 3):
            logger.log(step, {"loss": 1.0 / step, "lr": torch.tensor(0.5), "tokens_per_second": 100.0,
                              "peak_memory_gib": peak_memory_gib(torch.device("cpu"))})
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["loss"] == 0.5 and rows[0]["lr"] == 0.5
    assert rows[0]["peak_memory_gib"] > 0.01  # this process surely uses more than 10 MiB
    assert any((tmp_path / "logs" / "tensorboard").iterdir())
    out = capsys.readouterr().out
    assert "step=2" in out and "step=1 " not in out
    # a run resumed from step 2 replaces what the interrupted run logged after it
    with MetricLogger(tmp_path, [JsonlSink()], total_steps=4, initial_step=2) as logger:
        logger.log(3, {"loss": 9.0})
    rows = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5), (3, 9.0)]


def test_device_and_dtype_names():
    assert get_device("cpu") == torch.device("cpu")
    assert get_device("auto").type in ("cpu", "cuda", "xpu", "mps")
    assert get_dtype("bf16") == torch.bfloat16 and get_dtype("fp32") == torch.float32
    with pytest.raises(ValueError, match="fp32"):
        get_dtype("fp8")
    if not torch.accelerator.is_available():
        with pytest.raises(UserError, match="device=cuda: no cuda device is available on this machine"):
            get_device("cuda")
    with pytest.raises(UserError, match="device=cuda:x: not a device name"):
        get_device("cuda:x")


class _ToyLM(nn.Module):
    """tokens [b, s] -> logits [b, s, vocab], following the model forward contract."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens, *, mask=None, input_pos=None):
        return self.out(torch.tanh(self.emb(tokens)).cumsum(1))


def _toy_batches(g, sizes):
    out = []
    for b, s in sizes:
        tokens = torch.randint(0, 11, (b, s), generator=g)
        out.append({"tokens": tokens, "labels": _labels(b, s, 11, g)})
    return out


def test_clip_gradients_and_evaluate_loss_match_torch():
    from tunekit.models import decoder_lm
    from tunekit.training.train_step import clip_gradients, evaluate_loss

    torch.manual_seed(0)
    model = decoder_lm(vocab_size=11, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=8, intermediate_dim=16,
                       max_seq_len=16)
    batches = _toy_batches(torch.Generator().manual_seed(3), [(2, 5), (1, 7), (3, 4)])
    n = sum(int((b["labels"] != -100).sum()) for b in batches)
    ref_sum = sum(F.cross_entropy(model(b["tokens"]).flatten(0, 1), b["labels"].flatten(), reduction="sum")
                  for b in batches)
    (ref_sum / n).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    ref_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
    norm = clip_gradients(model.parameters(), 0.01)
    assert norm == pytest.approx(ref_norm.item(), rel=1e-6)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g * 0.01 / (ref_norm + 1e-6))
    assert clip_gradients(model.parameters(), None) == pytest.approx(0.01, rel=1e-4)  # measure only
    model.train()
    mean = evaluate_loss(model, batches, device=torch.device("cpu"))
    assert mean == pytest.approx((ref_sum / n).item(), rel=1e-6) and model.training


def test_non_finite_loss_or_norm_stops_before_the_update(tmp_path):
    from tunekit.checkpoint import NonFiniteError
    from tunekit.training.train_step import check_finite_step, clip_gradients

    model = _ToyLM()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.out.bias.grad[3] = float("nan")
    check_finite_step(1, loss=2.0, grad_norm=3.0, model=model, output_dir=tmp_path)  # finite: nothing happens
    norm = clip_gradients(model.parameters(), 1.0)
    assert math.isnan(norm)
    assert torch.equal(model.emb.weight.grad, torch.ones_like(model.emb.weight))  # a NaN norm clips nothing
    (tmp_path / "step_2").mkdir()
    with pytest.raises(NonFiniteError, match=r"step 3: loss 2.0 and gradient norm nan; first parameter with a "
                                             r"non-finite gradient: out\.bias; .*step_2 is intact"):
        check_finite_step(3, loss=2.0, grad_norm=norm, model=model, output_dir=tmp_path)
    with pytest.raises(NonFiniteError, match="step 4: loss inf"):
        check_finite_step(4, loss=float("inf"), grad_norm=1.0, model=model, output_dir=tmp_path / "none")


def test_accumulation_groups_keep_the_incomplete_group_and_step_counts():
    from tunekit.training.data_loaders import count_training_steps
    from tunekit.training.train_step import accumulation_groups

    assert [len(g) for g in accumulation_groups(range(7), 3)] == [3, 3, 1]
    assert [len(g) for g in accumulation_groups(range(6), 3)] == [3, 3]
    assert count_training_steps(7, gradient_accumulation_steps=3, epochs=2, max_steps=None) == (3, 6)
    assert count_training_steps(7, gradient_accumulation_steps=3, epochs=2, max_steps=4) == (3, 4)
    assert count_training_steps(2, gradient_accumulation_steps=3, epochs=2, max_steps=None) == (1, 2)
    with pytest.raises(ValueError, match="no batches"):
        count_training_steps(0, gradient_accumulation_steps=3, epochs=1, max_steps=None)
