"""Datasets and packing with a real tokenizer from tunekit.data.tokenizers (tiktoken BPE, Llama 3 chat format)."""

import json

import pytest
import torch

from tunekit.data import CROSS_ENTROPY_IGNORE_INDEX, chat_dataset, instruct_dataset

tiktoken_tokenizer = pytest.importorskip("tunekit.data.tokenizers.tiktoken_tokenizer")
chat_formats = pytest.importorskip("tunekit.data.tokenizers.chat_formats")


@pytest.fixture(scope="module")
def llama3_style_tokenizer():
    ranks = {bytes([b]): b for b in range(256)}
    for merge in (b"th", b"he", b"the", b"an", b"in", b" t", b" the", b"er", b"on", b"ll"):
        ranks[merge] = len(ranks)
    specials = tiktoken_tokenizer.llama3_special_tokens(len(ranks))
    return tiktoken_tokenizer.TiktokenTokenizer(
        ranks, tiktoken_tokenizer.LLAMA3_PATTERN, added_tokens=specials, special_ids=set(specials.values()),
        bos_id=specials["<|begin_of_text|>"], eos_id=specials["<|end_of_text|>"],
        pad_id=specials["<|finetune_right_pad_id|>"], chat_format=chat_formats.get_chat_format("llama3"))


def test_trained_tokens_are_exactly_the_assistant_turns(llama3_style_tokenizer, tmp_path):
    tok = llama3_style_tokenizer
    conv = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello, then."}, {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Hello again"}]
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"messages": conv}) + "\n")
    ex = chat_dataset(tok, p)[0]
    targets = [t for t in ex["labels"] if t != CROSS_ENTROPY_IGNORE_INDEX]
    assert tok.decode(targets, skip_special_tokens=False) == "Hello, then.<|eot_id|>Hello again<|eot_id|>"
    assert tok.decode(ex["tokens"]) == tok.decode(tok.tokenize_messages(conv)[0])


def test_packed_rows_hold_the_unpacked_examples(llama3_style_tokenizer, tmp_path):
    tok = llama3_style_tokenizer
    rows = [{"instruction": f"Tell me {i} things", "input": "", "output": "the " * (i % 7 + 1)} for i in range(40)]
    p = tmp_path / "a.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    unpacked = instruct_dataset(tok, p, max_seq_len=256)
    packed = instruct_dataset(tok, p, max_seq_len=256, packed=True)
    flat = torch.cat([packed[i]["labels"] for i in range(len(packed))]).tolist()
    assert flat == [t for i in range(len(unpacked)) for t in unpacked[i]["labels"]]
    batch = packed.collate([packed[0], packed[1]])
    n = len(packed[0]["tokens"])
    assert n < 256 and (batch["tokens"][0, n:] == tok.pad_id).all()
    assert (batch["labels"][0, n:] == CROSS_ENTROPY_IGNORE_INDEX).all()
