"""Packing: every token kept once, labels/masks/positions exact, and the same loss as unpacked rows."""

import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fake_tokenizer import ByteTokenizer
from torch import nn

from tunekit.data import CROSS_ENTROPY_IGNORE_INDEX, chat_dataset, greedy_pack, text_completion_dataset
from tunekit.data.packing import split_lengths

IGNORE = CROSS_ENTROPY_IGNORE_INDEX
TOK = ByteTokenizer()
S = 160  # packed row length; a few examples are longer and get truncated


def random_chats(n, seed=0):
    rng = random.Random(seed)
    word = lambda: "".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 4)))  # noqa: E731
    text = lambda k: " ".join(word() for _ in range(k))  # noqa: E731
    rows = []
    for _ in range(n):
        msgs = [{"role": "system", "content": text(2)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 2)):
            msgs += [{"role": "user", "content": text(rng.randint(1, 6))},
                     {"role": "assistant", "content": text(rng.randint(1, 12 if rng.random() < 0.9 else 40))}]
        rows.append({"messages": msgs})
    return rows


@pytest.fixture
def chat_file(tmp_path):
    p = tmp_path / "chat.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in random_chats(60)))
    return p


@pytest.fixture
def small_chat_file(tmp_path):  # for the model forward passes: a few packed rows are enough
    p = tmp_path / "small.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in random_chats(16, seed=1)))
    return p


def test_greedy_pack_matches_definition():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 33, 500)
    rows = greedy_pack(lengths, 32)
    fill = np.bincount(rows, weights=lengths)
    assert fill.max() <= 32 and np.all(np.diff(rows) >= 0) and np.all(np.diff(rows) <= 1)
    # A new row starts only when the next document did not fit into the current one.
    starts = np.flatnonzero(np.diff(rows)) + 1
    assert np.all(fill[rows[starts - 1]] + lengths[starts] > 32)


def test_no_token_lost_or_duplicated_and_labels_match_unpacked(chat_file):
    unpacked = chat_dataset(TOK, chat_file, max_seq_len=S)
    packed = chat_dataset(TOK, chat_file, max_seq_len=S, packed=True)
    assert packed.num_documents == len(unpacked) == 60
    want_tokens = [t for i in range(len(unpacked)) for t in unpacked[i]["tokens"]]
    want_labels = [t for i in range(len(unpacked)) for t in unpacked[i]["labels"]]
    rows = [packed[i] for i in range(len(packed))]
    assert torch.cat([r["tokens"] for r in rows]).tolist() == want_tokens
    assert torch.cat([r["labels"] for r in rows]).tolist() == want_labels
    lens = torch.cat([r["seq_lens"] for r in rows]).tolist()
    assert lens == [len(unpacked[i]["tokens"]) for i in range(len(unpacked))]
    assert all(len(r["tokens"]) == int(r["seq_lens"].sum()) <= S for r in rows)
    assert packed.efficiency == pytest.approx(len(want_tokens) / (len(packed) * S))
    assert len(packed) <= 40 and max(len(r["seq_lens"]) for r in rows) >= 3  # rows really hold several documents
    assert max(lens) == S  # and some examples were truncated


def reference_mask_and_pos(seq_lens, s):
    mask, pos = torch.zeros(s, s, dtype=torch.bool), torch.zeros(s, dtype=torch.long)
    spans, start = [], 0
    for n in list(seq_lens) + [s - sum(seq_lens)]:
        spans.append((start, start + n))
        start += n
    for a, b in spans:
        for i in range(a, b):
            pos[i] = i - a
            for j in range(a, i + 1):
                mask[i, j] = True
    return mask, pos


def test_collate_mask_positions_padding_exact(chat_file):
    packed = chat_dataset(TOK, chat_file, max_seq_len=S, packed=True)
    items = [packed[i] for i in range(4)]
    batch = packed.collate(items)
    assert batch["mask"].dtype == torch.bool and batch["mask"].shape == (4, S, S)
    for b, item in enumerate(items):
        lens = item["seq_lens"].tolist()
        mask, pos = reference_mask_and_pos(lens, S)
        assert torch.equal(batch["mask"][b], mask)
        assert torch.equal(batch["input_pos"][b], pos)
        n = len(item["tokens"])
        assert (batch["tokens"][b, n:] == TOK.pad_id).all() and (batch["labels"][b, n:] == IGNORE).all()
        # The last token of every document is never trained on (no cross-document target).
        ends = np.cumsum(lens) - 1
        assert (batch["labels"][b, ends] == IGNORE).all()


def test_split_long_documents_keeps_every_target(tmp_path):
    p = tmp_path / "t.jsonl"
    docs = ["x" * 25, "y" * 3, "z" * 61]
    p.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    packed = text_completion_dataset(TOK, p, max_seq_len=16, packed=True, long_examples="split")
    assert split_lengths(np.array([27, 5, 63]), 16).tolist() == [16, 11, 5, 16, 16, 16, 15]
    assert packed.doc_lengths.tolist() == [16, 11, 5, 16, 16, 16, 15]
    flat_tokens = torch.cat([packed[i]["tokens"] for i in range(len(packed))])
    want = [t for d in docs for t in TOK.encode(d)]
    assert flat_tokens.tolist() == want
    flat_labels = torch.cat([packed[i]["labels"] for i in range(len(packed))]).tolist()
    # Labels are the next token of the original document; -100 only after each document's EOS.
    want_labels = [t for d in docs for t in TOK.encode(d)[1:] + [IGNORE]]
    assert flat_labels == want_labels
    truncated = text_completion_dataset(TOK, p, max_seq_len=16, packed=True)
    assert truncated.doc_lengths.tolist() == [16, 5, 16]


class TinyCausalLM(nn.Module):
    """One attention block with rotary positions, honouring ``mask`` and ``input_pos`` as the
    Model contract says (used when tunekit.models is not available)."""

    def __init__(self, vocab, dim=32, heads=2):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.emb, self.qkv = nn.Embedding(vocab, dim), nn.Linear(dim, 3 * dim)
        self.proj, self.mlp, self.out = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, vocab)

    def rope(self, x, pos):
        half = self.head_dim // 2
        freqs = pos[:, None, :, None].to(x.dtype) * (10000.0 ** (-torch.arange(half, dtype=x.dtype) / half))
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * freqs.cos() - x2 * freqs.sin(), x1 * freqs.sin() + x2 * freqs.cos()], -1)

    def forward(self, tokens, *, mask=None, input_pos=None):
        b, s = tokens.shape
        pos = input_pos if input_pos is not None else torch.arange(s).expand(b, s)
        if mask is None:
            mask = torch.ones(s, s, dtype=torch.bool).tril().expand(b, s, s)
        h = self.emb(tokens)
        q, k, v = self.qkv(h).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(self.rope(q, pos), self.rope(k, pos), v, attn_mask=mask[:, None])
        h = h + self.proj(a.transpose(1, 2).reshape(b, s, -1))
        return self.out(h + torch.tanh(self.mlp(h)))


def mean_loss(model, batch):
    kwargs = {k: batch[k] for k in ("mask", "input_pos") if k in batch}
    logits = model(batch["tokens"], **kwargs)
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE,
                           reduction="sum") / (batch["labels"] != IGNORE).sum()


def test_packed_loss_equals_unpacked_loss(small_chat_file):
    chat_file = small_chat_file
    torch.manual_seed(0)
    model = TinyCausalLM(TOK.vocab_size).double()
    unpacked = chat_dataset(TOK, chat_file, max_seq_len=S)
    packed = chat_dataset(TOK, chat_file, max_seq_len=S, packed=True)
    loss_unpacked = mean_loss(model, unpacked.collate([unpacked[i] for i in range(len(unpacked))]))
    loss_packed = mean_loss(model, packed.collate([packed[i] for i in range(len(packed))]))
    assert math.isfinite(loss_packed.item())
    torch.testing.assert_close(loss_packed, loss_unpacked, rtol=1e-12, atol=1e-12)
    # Without the block mask the documents would see each other: the loss must differ.
    leaky = packed.collate([packed[i] for i in range(len(packed))])
    leaky.pop("mask")
    assert abs(mean_loss(model, leaky).item() - loss_unpacked.item()) > 1e-6


def test_packed_loss_equals_unpacked_with_tunekit_model(small_chat_file, tmp_path):
    chat_file = small_chat_file
    models = pytest.importorskip("tunekit.models")
    if not hasattr(models, "from_hf"):
        pytest.skip("tunekit.models.from_hf not available yet")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=TOK.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "ckpt")
    model = models.from_hf(tmp_path / "ckpt", dtype=torch.float64)
    unpacked = chat_dataset(TOK, chat_file, max_seq_len=S)
    packed = chat_dataset(TOK, chat_file, max_seq_len=S, packed=True)
    with torch.no_grad():
        loss_unpacked = mean_loss(model, unpacked.collate([unpacked[i] for i in range(len(unpacked))]))
        loss_packed = mean_loss(model, packed.collate([packed[i] for i in range(len(packed))]))
    torch.testing.assert_close(loss_packed, loss_unpacked, rtol=1e-10, atol=1e-10)


def test_worker_processes_give_identical_packing_and_located_errors(chat_file, tmp_path):
    one = chat_dataset(TOK, chat_file, max_seq_len=S, packed=True)
    two = chat_dataset(TOK, chat_file, max_seq_len=S, packed=True, num_workers=2)
    assert torch.equal(one.tokens, two.tokens) and torch.equal(one.labels, two.labels)
    assert torch.equal(one.doc_lengths, two.doc_lengths) and len(one) == len(two)
    lines = chat_file.read_text().splitlines()
    lines[50] = '{"messages": [{"role": "user", "content": "only a question"}]}'  # in the worker's half
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(Exception, match=rf"bad.jsonl:51: field 'messages': conversation has no assistant"):
        chat_dataset(TOK, bad, max_seq_len=S, packed=True, num_workers=2)
    skipped = chat_dataset(TOK, bad, max_seq_len=S, packed=True, num_workers=2, skip_bad_rows=True)
    assert skipped.num_skipped == 1 and skipped.num_documents == 59
