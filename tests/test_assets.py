"""The demo assets shipped in tunekit/assets/: loadable, pretrained, consistent, small."""

import json
import math
from pathlib import Path

import pytest
import torch

import tunekit

ASSETS = Path(tunekit.__file__).resolve().parent / "assets"
MODEL_DIR = ASSETS / "tiny_llama"
DATA_DIR = ASSETS / "tiny_llama_data"
SIZE_LIMIT = 20 * 1024 * 1024

TEXTS = [
    "The big red cat sees a dog. 3 plus 4 is 7.",
    "What is 3 + five? Add 6 and 2.",
    "Anna has seven cups.\nCounting: two three four.",
    "Unicode falls back to bytes: wörld 😀 [INST] x",
]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


def test_total_size_under_limit():
    files = [p for p in ASSETS.rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    total = sum(p.stat().st_size for p in files)
    assert total < SIZE_LIMIT, f"tunekit/assets is {total / 2**20:.1f} MiB"


def test_model_loads_and_is_pretrained(hf_tokenizer):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    assert model.config.vocab_size == len(hf_tokenizer)
    texts = [row["text"] for row in read_jsonl(DATA_DIR / "pretrain_val.jsonl")[:16]]
    ids = [[hf_tokenizer.bos_token_id, *hf_tokenizer(t, add_special_tokens=False)["input_ids"],
            hf_tokenizer.eos_token_id] for t in texts]
    width = min(len(i) for i in ids)
    tokens = torch.tensor([i[:width] for i in ids])
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    assert logits.shape == (*tokens.shape, model.config.vocab_size)
    assert torch.isfinite(logits).all()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    # An untrained model sits at log(vocab) ~ 6.9; the shipped one must know its corpus well.
    assert loss.item() < 0.5 * math.log(model.config.vocab_size)


def test_tokenizer_special_tokens_and_chat_template(hf_tokenizer):
    assert (hf_tokenizer.unk_token_id, hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (0, 1, 2)
    msgs = [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "7"}]
    text = hf_tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == "<s>[INST] What is 3 + 4? [/INST] 7 </s>"
    for t in TEXTS:  # byte fallback: any text round-trips
        assert hf_tokenizer.decode(hf_tokenizer(t)["input_ids"], skip_special_tokens=True) == t


def test_tokenizer_matches_sentencepiece(hf_tokenizer):
    spm = pytest.importorskip("sentencepiece")
    sp = spm.SentencePieceProcessor(model_file=str(MODEL_DIR / "tokenizer.model"))
    for t in TEXTS:
        assert hf_tokenizer(t)["input_ids"] == [sp.bos_id(), *sp.encode(t)]
    # digits are split, as the addition facts of the corpus expect
    assert len(sp.encode("12")) == 3


def test_tunekit_tokenizer_matches_transformers(hf_tokenizer):
    try:
        from tunekit.data.tokenizers import from_hf
    except ImportError:
        pytest.skip("tunekit.data.tokenizers.from_hf not available yet")
    tok = from_hf(MODEL_DIR)
    assert (tok.bos_id, tok.eos_id) == (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id)
    for t in TEXTS:
        ids = hf_tokenizer(t)["input_ids"]
        assert tok.encode(t, add_bos=True, add_eos=False) == ids
        assert tok.decode(ids) == t
    # the demo trains through tunekit's chat format: it must give the template's tokens, with
    # everything up to `[/INST]` masked
    msgs = read_jsonl(DATA_DIR / "val.jsonl")[0]["messages"]
    ids, mask = tok.tokenize_messages(msgs)
    assert ids == hf_tokenizer.apply_chat_template(msgs, tokenize=True)["input_ids"]
    n_prompt = len(hf_tokenizer.apply_chat_template(msgs[:1], tokenize=True)["input_ids"])
    assert mask == [True] * n_prompt + [False] * (len(ids) - n_prompt)


def _operands(prompt):
    words = "zero one two three four five six seven eight nine".split()
    nums = [int(t) if t.isdigit() else words.index(t)
            for t in prompt.replace("?", " ").replace(".", " ").split() if t.isdigit() or t in words]
    assert len(nums) == 2, prompt
    # "add b to a" names the second operand first
    return tuple(reversed(nums)) if " to " in prompt else tuple(nums)


def test_finetune_splits_are_disjoint_and_well_formed():
    train = read_jsonl(DATA_DIR / "train.jsonl")
    val = read_jsonl(DATA_DIR / "val.jsonl")
    assert len(train) >= 500 and len(val) >= 200
    pairs = {}
    for split, rows in (("train", train), ("val", val)):
        for row in rows:
            user, assistant = row["messages"]
            assert (user["role"], assistant["role"]) == ("user", "assistant")
            a, b = _operands(user["content"])
            assert assistant["content"] == str(a + b)
            pairs.setdefault(split, set()).add((a, b))
    # held out by ordered operand pair (a, b), not just by wording
    assert not pairs["train"] & pairs["val"]
    assert len(pairs["val"]) >= 20
