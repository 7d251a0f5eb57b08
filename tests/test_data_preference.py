"""Preference data (tunekit.data.preference): TRL's row formats, truncation, bad rows, the batch
contract, and the proof that the packed shared-prompt layout, the unpacked layout and each sequence
run alone give the same per-sequence log-probs (and gradients) on a tunekit model."""

import collections
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fake_tokenizer import ROLE_IDS, ByteTokenizer

from tunekit.config.errors import UserError
from tunekit.data import (
    CROSS_ENTROPY_IGNORE_INDEX,
    ChosenRejectedToMessages,
    DataError,
    UnpairedPreferenceToMessages,
    collate_sequence_pairs,
    kto_collate,
    kto_dataset,
    preference_collate,
    preference_dataset,
)
from tunekit.data.preference import kl_sequence, shared_prefix_len

IGNORE = CROSS_ENTROPY_IGNORE_INDEX
TOK = ByteTokenizer()
ASSETS = Path(__file__).resolve().parents[1] / "tunekit" / "assets"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class HeaderTokenizer(ByteTokenizer):
    """Opens every conversation with a token that depends on the whole conversation (as templates
    with a per-conversation header do), so chosen and rejected share no token prefix when their
    lengths differ in parity."""

    def tokenize_messages(self, messages, add_generation_prompt: bool = False):
        tokens, mask = super().tokenize_messages(messages, add_generation_prompt)
        size = sum(len(m["content"]) for m in messages)
        return [200 + size % 2] + tokens, [True] + mask


# -- formats ---------------------------------------------------------------------------------------

def test_formats_standard_conversational_implicit_and_column_map():
    split = ChosenRejectedToMessages().split
    assert split({"prompt": "2+2?", "chosen": "4", "rejected": "5"}) == (
        [user("2+2?")], [assistant("4")], [assistant("5")])
    conv_prompt = [{"role": "system", "content": "be brief"}, user("hi")]
    assert split({"prompt": conv_prompt, "chosen": [assistant("a")], "rejected": [assistant("b")]}) == (
        conv_prompt, [assistant("a")], [assistant("b")])
    # implicit: the prompt is the longest common prefix of messages; a string prompt next to whole
    # conversations is ignored (TRL: ultrafeedback_binarized has both)
    shared = [user("q1"), assistant("a1"), user("q2")]
    row = {"prompt": "q1", "chosen": shared + [assistant("yes")], "rejected": shared + [assistant("no"), user("?"), assistant("no!")]}
    assert split(row) == (shared, [assistant("yes")], [assistant("no"), user("?"), assistant("no!")])
    cm = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert ChosenRejectedToMessages(cm).split({"question": "q", "good": "g", "bad": "b"}) == (
        [user("q")], [assistant("g")], [assistant("b")])
    # the old call still gives whole conversations (the data check reads them)
    assert ChosenRejectedToMessages()({"prompt": "q", "chosen": "g", "rejected": "b"}) == (
        [user("q"), assistant("g")], [user("q"), assistant("b")])
    kto = UnpairedPreferenceToMessages()
    assert kto({"prompt": "q", "completion": "a", "label": True}) == ([user("q")], [assistant("a")], True)
    assert kto({"prompt": [user("q")], "completion": [assistant("a")], "label": "false"})[2] is False
    assert kto({"prompt": "q", "completion": "a", "label": 1})[2] is True


@pytest.mark.parametrize("row, field, message", [
    ({"chosen": "g", "rejected": "b"}, "prompt", "missing column"),
    ({"prompt": "q", "chosen": "g", "rejected": [assistant("b")]}, "rejected", "both as strings"),
    ({"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("a")]}, "chosen", "same conversation"),
    ({"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("a"), user("more"), assistant("b")]},
     "chosen", "completion would be empty"),
    ({"chosen": [user("q"), assistant("a")], "rejected": [user("other"), assistant("b")]}, "chosen[0].role",
     "first differ at message 0"),
    ({"prompt": "q", "chosen": [user("x"), assistant("a")], "rejected": [assistant("b")]}, "chosen[0].role",
     "must start with an assistant"),
    ({"prompt": [user("q"), assistant("a")], "chosen": [assistant("b")], "rejected": [assistant("c")]},
     "chosen[0].role", "cannot come after"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen", "empty text"),
])
def test_bad_pairs_name_the_field(row, field, message):
    with pytest.raises(DataError, match=message) as e:
        ChosenRejectedToMessages().split(row)
    assert e.value.field == field


def test_bad_rows_have_file_and_line_and_can_be_skipped(tmp_path, caplog):
    rows = [{"prompt": "q", "chosen": "good", "rejected": "bad"}] * 3
    rows[1] = {"prompt": "q", "chosen": "good"}
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'rejected': missing column"):
        preference_dataset(TOK, path)
    with caplog.at_level(logging.WARNING):
        ds = preference_dataset(TOK, path, skip_bad_rows=True)
    assert len(ds) == 2 and ds.num_skipped == 1 and "p.jsonl:2" in ds.skipped[0]
    assert ds.where(1).endswith("p.jsonl:3") and "skipped 1 bad row" in caplog.text
    bad_label = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "q", "completion": "a", "label": "maybe"}])
    with pytest.raises(DataError, match=r"k.jsonl:1: field 'label': expected a boolean"):
        kto_dataset(TOK, bad_label)


def test_labels_cover_only_the_completion(tmp_path):
    # The prompt holds an assistant turn: SFT would train on it, a preference completion does not.
    row = {"prompt": [user("q"), assistant("earlier"), user("and?")], "chosen": [assistant("yes")],
           "rejected": [assistant("no")]}
    ex = preference_dataset(TOK, [row])[0]
    assert [t for t in ex["chosen_labels"] if t != IGNORE] == list(b"yes") + [TOK.eot_id]
    assert [t for t in ex["rejected_labels"] if t != IGNORE] == list(b"no") + [TOK.eot_id]
    n = len(ex["chosen_tokens"]) - 5  # <assistant> y e s <eot>: the last prompt token predicts 'y'
    assert ex["chosen_tokens"][n] == ROLE_IDS["assistant"] and ex["chosen_labels"][n] == ord("y")


def test_prompt_turns_stay_out_of_the_targets_when_the_template_moves():
    # HeaderTokenizer's first token differs between the prompt and the whole conversation, so the
    # common prefix says nothing; the trained runs still place the completion.
    row = {"prompt": [user("q"), assistant("earlier"), user("and?")], "chosen": "yes", "rejected": "no!"}
    ex = preference_dataset(HeaderTokenizer(), [row])[0]
    assert [t for t in ex["chosen_labels"] if t != IGNORE] == list(b"yes") + [TOK.eot_id]
    assert [t for t in ex["rejected_labels"] if t != IGNORE] == list(b"no!") + [TOK.eot_id]


def test_truncation_keeps_the_prompt_end_then_the_completion_start(tmp_path, caplog):
    rows = [{"prompt": "p" * 30, "chosen": "c" * 10, "rejected": "r" * 4},   # prompt cut
            {"prompt": "q", "chosen": "x" * 40, "rejected": "y"},            # prompt to 1 token, then chosen's end
            {"prompt": "s", "chosen": "ok", "rejected": "no"}]               # fits
    with caplog.at_level(logging.INFO, logger="tunekit.data.preference"):
        ds = preference_dataset(TOK, write_jsonl(tmp_path / "t.jsonl", rows), max_seq_len=20)
    assert ds.num_truncated == 2 and "2 cut to max_seq_len=20" in caplog.text
    ex = ds[0]
    # chosen: <bos><user> p*30 <eot><assistant> c*10 <eot> = 45 tokens -> 25 prompt tokens cut from the left
    assert len(ex["chosen_tokens"]) == 20 and ex["chosen_tokens"][-12:] == [ROLE_IDS["assistant"]] + [ord("c")] * 10 + [TOK.eot_id]
    # rejected loses the same prompt tokens: both completions follow the same prompt
    assert ex["rejected_tokens"][:8] == ex["chosen_tokens"][:8] and len(ex["rejected_tokens"]) == 14
    ex = ds[1]
    assert ex["chosen_tokens"][:2] == [ROLE_IDS["assistant"], ord("x")] and len(ex["chosen_tokens"]) == 20
    assert ex["chosen_labels"][-1] == IGNORE and ex["chosen_labels"][-2] == ord("x")
    assert ex["rejected_tokens"] == [ROLE_IDS["assistant"], ord("y"), TOK.eot_id]
    assert ds[2]["chosen_tokens"][0] == TOK.bos_id


def test_a_tokenizer_that_truncates_is_refused():
    tok = ByteTokenizer()
    tok.max_seq_len = 8
    with pytest.raises(UserError, match="max_seq_len=null"):
        preference_dataset(tok, [{"prompt": "long question", "chosen": "a", "rejected": "b"}], skip_bad_rows=True)


def test_kto_unpairs_paired_rows_and_counts_labels():
    rows = [{"prompt": f"q{i}", "chosen": f"good{i}", "rejected": f"bad{i}"} for i in range(3)]
    ds = kto_dataset(TOK, rows)
    assert len(ds) == 6 and ds.num_desirable == 3 and ds.num_undesirable == 3
    assert [ds[i]["desirable"] for i in range(6)] == [True] * 3 + [False] * 3
    assert TOK.decode(ds[4]["tokens"]) == "q1bad1" and ds.where(4) == "<rows> record 2"


def test_kl_sequence_is_prompt_i_with_completion_of_i_minus_1():
    rows = [{"prompt": f"question {i}", "completion": "answer " + "x" * i, "label": i % 2 == 0} for i in range(4)]
    ds = kto_dataset(TOK, rows)
    batch = [ds[i] for i in range(4)]
    for i in range(4):
        tokens, labels = kl_sequence(batch[i], batch[(i - 1) % 4], None)
        assert TOK.decode(tokens) == f"question {i}" + "answer " + "x" * ((i - 1) % 4)
        assert [t for t in labels if t != IGNORE] == list(("answer " + "x" * ((i - 1) % 4)).encode()) + [TOK.eot_id]
    out = kto_collate(batch, TOK.pad_id)
    assert out["desirable"].tolist() == [True, False, True, False] and int(out["num_pairs"]) == 4
    assert TOK.decode(out["tokens"][4 + 2].tolist()) == "question 2answer x"  # row P + i: KL sequence i


def test_builders_declare_hub_kwargs_and_build_from_a_config_node(tmp_path):
    from omegaconf import OmegaConf

    from tunekit.config import instantiate

    for builder in (preference_dataset, kto_dataset):  # what config validation checks **hf_kwargs against
        assert "data_files" in builder.__config_kwargs__
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "g", "rejected": "b"}])
    node = OmegaConf.create({"_component_": "tunekit.data.preference_dataset", "source": str(p),
                             "max_seq_len": 32, "packed": True})
    ds = instantiate(node, TOK)
    assert ds.packed and set(ds.collate([ds[0]])) == {"tokens", "labels", "sequence_ids", "input_pos", "mask", "num_pairs"}
    with pytest.raises(UserError, match="packed=True needs max_seq_len"):
        preference_dataset(TOK, p, packed=True)


# -- the layouts -----------------------------------------------------------------------------------

def standard_rows():
    return [{"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "The answer is 6."},
            {"prompt": "Name a colour.", "chosen": "red", "rejected": "I cannot name colours, sorry."},
            {"prompt": "Say hi " * 6, "chosen": "hi", "rejected": "hello there"},
            {"prompt": "x", "chosen": "a b c d e f g h", "rejected": "z"}]


def conversational_rows():
    return [{"prompt": [{"role": "system", "content": "short"}, user("q1"), assistant("a1"), user("q2?")],
             "chosen": [assistant("fine")], "rejected": [assistant("not fine at all")]},
            {"prompt": [user("tell me")], "chosen": [assistant("ok"), user("more"), assistant("more!")],
             "rejected": [assistant("no")]}]


def implicit_rows():
    shared = [user("first question"), assistant("first answer"), user("second")]
    return [{"chosen": shared + [assistant("good reply")], "rejected": shared + [assistant("bad")]},
            {"chosen": [user("u")] + [assistant("same start, then A")], "rejected": [user("u"), assistant("same start, then B!")]}]


def tiny_model(vocab_size=TOK.vocab_size):
    from tunekit.models import llama

    torch.manual_seed(0)
    model = llama(vocab_size=vocab_size, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32,
                  intermediate_dim=64, max_seq_len=256, rope_base=10_000.0).float()
    for p in model.parameters():  # larger weights than the default init: far-from-uniform logits
        torch.nn.init.normal_(p, std=0.2)
    return model


def sequence_logps(model, batch):
    """Double[2P]: summed log-probs of each completion's targets, gathered with scatter_add over
    sequence_ids as a recipe does; also the target counts Long[2P]. The model runs in fp32; the
    log-softmax and the sums are taken in float64 so that only the layouts' differences show, not
    the summation order (sums of ~-100 have an fp32 spacing of ~1e-5)."""
    kwargs = {k: batch[k] for k in ("mask", "input_pos") if k in batch}
    logits = model(batch["tokens"], **kwargs)
    assert logits.dtype == torch.float32
    labels = batch["labels"]
    logp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    ids = batch["sequence_ids"]
    assert torch.equal(ids >= 0, labels != IGNORE)
    n = 2 * int(batch["num_pairs"])
    sums = torch.zeros(n, dtype=torch.float64).scatter_add(0, ids.clamp(min=0).flatten(), torch.where(ids >= 0, logp, 0.0).flatten())
    counts = torch.zeros(n, dtype=torch.long).scatter_add(0, ids.clamp(min=0).flatten(), (ids >= 0).long().flatten())
    return sums, counts


def alone_logps(model, pairs):
    out = []
    for pair in pairs:
        for tokens, labels in pair:
            tokens, labels = torch.tensor([tokens]), torch.tensor([labels])
            logp = torch.log_softmax(model(tokens).double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            out.append(torch.where(labels != IGNORE, logp, 0.0).sum())
    return torch.stack(out)


def dpo_like_loss(logps):
    return -F.logsigmoid(0.7 * (logps[0::2] - logps[1::2])).sum() - 0.1 * logps[0::2].sum()


def check_layouts(model, pairs, packed_len, pad_id=TOK.pad_id):
    """Packed == unpacked == alone for the per-sequence sums, and the gradients of a loss of them."""
    unpacked = collate_sequence_pairs(pairs, pad_id)
    packed = collate_sequence_pairs(pairs, pad_id, packed_len=packed_len)
    assert unpacked.keys() == {"tokens", "labels", "sequence_ids", "num_pairs"}
    assert packed.keys() == {"tokens", "labels", "sequence_ids", "num_pairs", "mask", "input_pos"}
    # several pairs in some row, fewer rows than the unpacked layout
    per_row = [len(set((ids[ids >= 0] // 2).tolist())) for ids in packed["sequence_ids"]]
    assert max(per_row) >= 2 and packed["tokens"].shape[0] < unpacked["tokens"].shape[0]
    grads = []
    sums = []
    for batch in (unpacked, packed):
        model.zero_grad()
        s, counts = sequence_logps(model, batch)
        dpo_like_loss(s).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        sums.append(s)
        assert counts.tolist() == [sum(t != IGNORE for t in labels) for pair in pairs for _, labels in pair]
    model.zero_grad()
    alone = alone_logps(model, pairs)
    dpo_like_loss(alone).backward()
    grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(sums[1], sums[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(sums[0], alone.detach(), rtol=0, atol=1e-5)
    for g_unpacked, g_packed, g_alone in zip(*grads):
        torch.testing.assert_close(g_packed, g_unpacked, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_alone, g_unpacked, rtol=1e-5, atol=1e-5)
    return packed


@pytest.fixture(scope="module")
def model(one_thread):  # tests/conftest.py: tiny matmuls are faster on one thread
    return tiny_model()


@pytest.mark.parametrize("rows, tokenizer, max_seq_len", [
    (standard_rows(), TOK, 64), (conversational_rows(), TOK, 64), (implicit_rows(), TOK, 64),
    (standard_rows() + conversational_rows() + implicit_rows(), HeaderTokenizer(), 40),
], ids=["standard", "conversational", "implicit", "mixed-no-shared-prefix-truncated"])
def test_packed_equals_unpacked_equals_alone(model, rows, tokenizer, max_seq_len):
    ds = preference_dataset(tokenizer, rows, max_seq_len=max_seq_len)
    assert (ds.num_truncated > 0) == (max_seq_len == 40)
    items = [ds[i] for i in range(len(ds))]
    pairs = [((ex["chosen_tokens"], ex["chosen_labels"]), (ex["rejected_tokens"], ex["rejected_labels"])) for ex in items]
    packed = check_layouts(model, pairs, packed_len=100)
    shared = [shared_prefix_len(c, r, rl) for (c, _), (r, rl) in pairs]
    if isinstance(tokenizer, HeaderTokenizer):  # pairs without a shared token next to pairs with one
        assert 0 in shared and max(shared) > 0
    else:  # every pair shares its prompt, up to the last prompt token's copy
        assert all(s > 0 for s in shared)
    # each pair is laid out as x[:-1] + y[s:-1]: the shared tokens are held once
    n_tokens = sum(len(c) - 1 + len(r) - 1 - s for ((c, _), (r, _)), s in zip(pairs, shared))
    assert int((packed["tokens"] != TOK.pad_id).sum()) == n_tokens


def test_dataset_collate_uses_the_packed_flag(model, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", standard_rows() + implicit_rows())
    ds = preference_dataset(TOK, path, max_seq_len=48, packed=True)
    batch = ds.collate([ds[i] for i in range(len(ds))])
    ref = preference_collate([ds[i] for i in range(len(ds))], TOK.pad_id)
    assert "mask" in batch and "mask" not in ref
    with torch.no_grad():
        torch.testing.assert_close(sequence_logps(model, batch)[0], sequence_logps(model, ref)[0], rtol=0, atol=1e-5)


def test_packed_row_layout_shares_the_prompt():
    # prompt p0 p1 p2, chosen c0 c1, rejected r0 r1 (labels: targets on completion tokens)
    chosen = ([1, 2, 3, 10, 11], [IGNORE, IGNORE, 10, 11, IGNORE])
    rejected = ([1, 2, 3, 20, 21], [IGNORE, IGNORE, 20, 21, IGNORE])
    b = collate_sequence_pairs([(chosen, rejected)], pad_id=0, packed_len=16)
    # [p0 p1 p2 c0 | p2' r0]: p2 predicts c0, its copy p2' (same position) predicts r0
    assert b["tokens"].tolist() == [[1, 2, 3, 10, 3, 20]]
    assert b["labels"].tolist() == [[IGNORE, IGNORE, 10, 11, 20, 21]]
    assert b["input_pos"].tolist() == [[0, 1, 2, 3, 2, 3]]
    assert b["sequence_ids"].tolist() == [[-1, -1, 0, 0, 1, 1]]
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0],
                         [1, 1, 0, 0, 1, 0],    # p2' sees p0 p1 and itself, not p2 or c0
                         [1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(b["mask"][0], want)
    unpacked = collate_sequence_pairs([(chosen, rejected)], pad_id=0)
    assert unpacked["sequence_ids"].tolist() == [[-1, -1, 0, 0, -1], [-1, -1, 1, 1, -1]]


@pytest.mark.parametrize("packed_len", [None, 80])
def test_kto_layouts_equal_alone(model, packed_len):
    rows = [{"prompt": "What is 2 + 3?", "completion": "5", "label": True},
            {"prompt": [user("Name a colour.")], "completion": [assistant("blue, I think")], "label": False},
            {"prompt": "p" * 30, "completion": "long answer " * 3, "label": True},
            {"prompt": "hi", "completion": "hello", "label": False}]
    ds = kto_dataset(TOK, rows, max_seq_len=40)
    batch_items = [ds[i] for i in range(len(ds))]
    pairs = [((ex["tokens"], ex["labels"]), kl_sequence(ex, batch_items[(i - 1) % 4], 40))
             for i, ex in enumerate(batch_items)]
    assert all(len(t) <= 40 for pair in pairs for t, _ in pair)
    batch = kto_collate(batch_items, TOK.pad_id, max_seq_len=40, packed_len=packed_len)
    with torch.no_grad():
        got, _ = sequence_logps(model, batch)
        torch.testing.assert_close(got, alone_logps(model, pairs), rtol=0, atol=1e-5)
    assert batch["desirable"].tolist() == [True, False, True, False]
    if packed_len is not None:
        check_layouts(model, pairs, packed_len)


# -- the shipped demo set --------------------------------------------------------------------------

def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.skipif(not (ASSETS / "tiny_llama_preference").is_dir(), reason="demo preference set not built")
def test_shipped_preference_set(model):  # (the fixture sets one thread)
    folder = ASSETS / "tiny_llama_preference"
    assert sum(p.stat().st_size for p in folder.iterdir()) < 1_000_000
    train, val = read_jsonl(folder / "train.jsonl"), read_jsonl(folder / "val.jsonl")
    assert 300 <= len(train) <= 2500 and 150 <= len(val) <= 300
    # every sum 0..18 asked equally often in train; rejected = off by one
    per_sum = collections.Counter(r["chosen"] for r in train if int(r["rejected"]) == int(r["chosen"]) + 1)
    assert sorted(per_sum, key=int) == [str(s) for s in range(19)] and len(set(per_sum.values())) == 1
    assert all(abs(int(r["chosen"]) - int(r["rejected"])) == 1 for r in train + val)
    sft_train = {r["messages"][0]["content"] for r in read_jsonl(ASSETS / "tiny_llama_data" / "train.jsonl")}
    val_prompts = {r["prompt"] for r in val}
    assert not val_prompts & {r["prompt"] for r in train} and not val_prompts & sft_train
    assert all(r["chosen"] != r["rejected"] for r in train + val)
    kto = read_jsonl(folder / "train_kto.jsonl")
    assert len(kto) == 2 * len(train) and sum(r["label"] for r in kto) == len(train)

    from tunekit.data.tokenizers import from_hf

    tok = from_hf(ASSETS / "tiny_llama")
    ds = preference_dataset(tok, folder / "val.jsonl", max_seq_len=64, packed=True)
    assert len(ds) == len(val) and ds.num_truncated == 0
    ex, row = ds[0], val[0]
    # llama2 format: the prompt is "<s>[INST] q [/INST]", the targets the answer and "</s>"
    assert tok.decode(ex["chosen_tokens"]).strip().endswith(row["chosen"])
    targets = [t for t in ex["chosen_labels"] if t != IGNORE]
    assert tok.decode(targets).strip() == row["chosen"] and targets[-1] == tok.eos_id
    kds = kto_dataset(tok, folder / "val_kto.jsonl", max_seq_len=64)
    assert kds.num_desirable == len(val)
    # the layouts with the real tokenizer and chat format (a random model of its vocabulary)
    items = [ds[i] for i in range(12)]
    pairs = [((ex["chosen_tokens"], ex["chosen_labels"]), (ex["rejected_tokens"], ex["rejected_labels"])) for ex in items]
    for (c, cl), (r, rl) in pairs:  # the whole prompt is shared but for its last token's copy
        assert shared_prefix_len(c, r, rl) == next(k for k, t in enumerate(cl) if t != IGNORE) > 5
    check_layouts(tiny_model(tok.vocab_size), pairs, packed_len=128, pad_id=tok.pad_id)


def test_random_preference_dataset_is_a_preference_dataset(model):
    """The benchmark's synthetic pairs: the prompt shared, the targets exactly the completions, the
    packed layout equal to the unpacked one; bad sizes are user errors."""
    from tunekit.data.synthetic import random_preference_dataset

    ds = random_preference_dataset(vocab_size=TOK.vocab_size, prompt_len=5, completion_len=3, num_pairs=4, seed=1)
    ex = ds[2]
    assert ex == ds[2] and ex != ds[1]
    assert ex["chosen_tokens"][:5] == ex["rejected_tokens"][:5] and len(ex["chosen_tokens"]) == 8
    for name in ("chosen", "rejected"):
        assert [t for t in ex[f"{name}_labels"] if t != -100] == ex[f"{name}_tokens"][5:]
    items = [ds[i] for i in range(len(ds))]
    pairs = [((e["chosen_tokens"], e["chosen_labels"]), (e["rejected_tokens"], e["rejected_labels"])) for e in items]
    check_layouts(model, pairs, packed_len=24)
    packed = random_preference_dataset(vocab_size=TOK.vocab_size, prompt_len=5, completion_len=3, num_pairs=4,
                                       seed=1, packed_len=24)
    assert "mask" in packed.collate(items) and "mask" not in ds.collate(items)
    with pytest.raises(UserError, match="prompt_len"):
        random_preference_dataset(vocab_size=10, prompt_len=0, completion_len=3, num_pairs=4)
