"""Tokenizer parity against HF tokenizers/transformers, with every tokenizer trained in the test."""

from __future__ import annotations

import bisect
import itertools
import json
import logging
import random
import re
import shutil
import sys
import unicodedata
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import TikTokenConverter

from tunekit.data.tokenizers import (
    LLAMA3_PATTERN,
    HFTokenizersBPE,
    MergeRankBPE,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    from_hf,
    llama3_special_tokens,
    llama3_tokenizer,
    load_tokenizer_json,
)
from tunekit.data.tokenizers.base import _trie_pattern, count_tokens_before
from tunekit.data.tokenizers.hf_json import byte_decoder

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEMPLATES = Path(__file__).parent / "assets" / "chat_templates"
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_BASE = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Numbers 1234567 and 3.14159, dates 2024-01-31; ids x86_64.",
    "日本語のテキストです。你好，世界！한국어 문장도 있어요.",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷 done",
    "Combining marks: cafe\u0301 nai\u0308ve A\u030a and precomposed café naïve Å",
    "Whitespace   runs\t\ttabs    and\n\nnew\r\nlines\n\n\n   indented",
    "def f(x):\n    return x ** 2  # comment\n\nclass A:\n\tpass",
    "It's we'll they'd I'M YOU'RE shouldn't",
    "Ünïcödé ßtraße Ελληνικά русский עברית العربية हिन्दी",
]
CORPUS = _BASE + [
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>",
    "text<|endoftext|>more text  <|im_start|>",
    "   leading and trailing spaces   ",
    "\n\nstarts with newlines",
    "x" * 50 + " " + "1" * 17,
]


def training_texts() -> list[str]:
    rng = random.Random(0)
    words = " ".join(_BASE).replace("\n", " \n ").split(" ")
    return _BASE * 20 + [" ".join(rng.choice(words) for _ in range(40)) for _ in range(400)]


def train_bytelevel_bpe(pattern: str, specials: list[str], vocab_size: int = 700,
                        nfc: bool = False) -> Tokenizer:
    """A byte-level BPE trained by HF ``tokenizers`` with ``pattern`` as pre-tokenizer."""
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_texts(), trainer)
    return tok


def write_ranks(tok: Tokenizer, path: Path) -> None:
    """Write a tiktoken ranks file (base64 token, rank = id) from a byte-level BPE's vocab."""
    import base64

    decode = byte_decoder()
    specials = {t.content for t in tok.get_added_tokens_decoder().values()}
    vocab = sorted((i, s) for s, i in tok.get_vocab(with_added_tokens=False).items()
                   if s not in specials)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(bytes(decode[c] for c in s)).decode()} {rank}\n"
                     for rank, (_, s) in enumerate(vocab))


def hf_from_ranks(path: Path, pattern: str, specials: list[str]) -> Tokenizer:
    """HF's own tiktoken -> tokenizer.json conversion (the reference for the tiktoken path)."""
    return TikTokenConverter(vocab_file=str(path), pattern=pattern,
                             extra_special_tokens=specials).converted()


def hf_ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def llama3_files(tmp_path_factory):
    """original/tokenizer.model from a trained BPE, and HF's conversion of it."""
    root = tmp_path_factory.mktemp("llama3")
    write_ranks(train_bytelevel_bpe(LLAMA3_PATTERN, []), root / "original" / "tokenizer.model")
    n = len((root / "original" / "tokenizer.model").read_text().splitlines())
    hf = hf_from_ranks(root / "original" / "tokenizer.model", LLAMA3_PATTERN,
                       list(llama3_special_tokens(n)))
    return root, hf


@pytest.fixture(scope="module")
def qwen_json(tmp_path_factory):
    """A Qwen2-style tokenizer.json that is tiktoken-derived (rank-consistent), NFC normalizer."""
    root = tmp_path_factory.mktemp("qwen")
    write_ranks(train_bytelevel_bpe(QWEN2_PATTERN, [], nfc=True), root / "ranks.tiktoken")
    hf = hf_from_ranks(root / "ranks.tiktoken", QWEN2_PATTERN, QWEN_SPECIALS)
    hf.normalizer = normalizers.NFC()
    hf.add_tokens(["<tool_call>", "</tool_call>", "<think>", "</think>"])  # non-special, as Qwen
    hf.save(str(root / "tokenizer.json"))
    return root / "tokenizer.json", hf


def check_parity(ours, ref_ids, texts, normalize=lambda s: s):
    for text in texts:
        ids = ours.encode(text, add_bos=False, add_eos=False)
        assert ids == ref_ids(text), text
        assert ours.decode(ids, skip_special_tokens=False) == normalize(text), text


def test_llama3_tiktoken_matches_hf_conversion(llama3_files):
    root, hf = llama3_files
    tok = llama3_tokenizer(root / "original" / "tokenizer.model")
    specials = llama3_special_tokens(tok.vocab_size - 256)
    texts = CORPUS + ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
                      "a<|reserved_special_token_100|>b<|python_tag|>"]
    check_parity(tok, lambda s: hf_ids(hf, s), texts)
    assert tok.bos_id == specials["<|begin_of_text|>"] == hf.token_to_id("<|begin_of_text|>")
    assert tok.eos_id == hf.token_to_id("<|end_of_text|>")
    assert hf.get_vocab_size() == tok.vocab_size
    ids = tok.encode("hi", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.decode(ids) == "hi"


def random_parts(rng: random.Random) -> list[tuple[str, bool]]:
    """Chat-like parts (text, trained) cut at random characters, added tokens included."""
    texts = CORPUS + ["\u2581x \u2581", "<s>", "</s>"]
    return [(t[rng.randrange(len(t)):][:rng.randint(0, 30)], rng.random() < 0.5)
            for t in rng.choices(texts, k=rng.randint(1, 8))]


def test_count_tokens_before_equals_bisect_on_token_starts():
    rng = random.Random(0)
    for _ in range(2000):
        lengths = [rng.randint(1, 4) for _ in range(rng.randint(1, 40))]
        starts = list(itertools.accumulate(lengths, initial=0))[:-1]
        cuts = sorted(rng.sample(range(1, sum(lengths) + 3), k=3))
        assert (count_tokens_before(itertools.accumulate(lengths[:-1]), cuts)
                == [bisect.bisect_left(starts, c) for c in cuts])


def test_chat_mask_from_tiktoken_offsets(llama3_files):
    # The mask of tokenize_messages comes from per-chunk cuts; the reference is tiktoken's own
    # per-token decode_with_offsets on the whole text (no added tokens: they are split apart).
    root, _ = llama3_files
    tok = llama3_tokenizer(root / "original" / "tokenizer.model")
    rng = random.Random(0)
    for _ in range(300):
        parts = [(t.replace("<|", "<"), trained) for t, trained in random_parts(rng)]
        text = "".join(t for t, _ in parts)
        ids, mask = tok._encode_parts(parts)
        assert ids == tok.encode(text, add_bos=False, add_eos=False)
        trained = [f for t, f in parts for _ in t]
        assert mask == [not trained[s] for s in tok._enc.decode_with_offsets(ids)[1]], parts


def test_chat_mask_sentencepiece_fast_offsets_equal_proto_offsets(llama_sp):
    # Piece byte lengths (identity normalizer) must give the masks of sentencepiece's own offsets.
    rng = random.Random(1)
    for legacy in (False, True):
        fast = SentencePieceTokenizer(llama_sp / "tokenizer.model", legacy=legacy)
        proto = SentencePieceTokenizer(llama_sp / "tokenizer.model", legacy=legacy)
        proto._piece_len = None
        assert fast._piece_len is not None
        for _ in range(300):
            parts = random_parts(rng)
            assert fast._encode_parts(parts) == proto._encode_parts(parts), parts


def test_tokenizer_json_uses_tiktoken_when_rank_consistent(qwen_json):
    path, hf = qwen_json
    tok = load_tokenizer_json(path, bos_token=None, eos_token="<|im_end|>")
    assert isinstance(tok, TiktokenTokenizer)
    assert tok.bos_id is None and tok.encode("a", add_eos=True)[-1] == tok.eos_id
    check_parity(tok, lambda s: hf_ids(hf, s), CORPUS + ["x<tool_call>\n{}"],
                 normalize=lambda s: unicodedata.normalize("NFC", s))
    # non-special added tokens survive skip_special_tokens, special ones do not
    ids = tok.encode("<tool_call><|im_end|>", add_bos=False, add_eos=False)
    assert tok.decode(ids) == "<tool_call>"


def test_trained_tokenizer_json_runs_on_tiktoken(tmp_path, caplog):
    # A BPE trained by `tokenizers` lists one merge per token; HF's rule rebuilds every token from
    # its bytes, which proves tiktoken's rule equal (tests/test_tokenizer_json_bpe.py has more).
    hf = train_bytelevel_bpe(QWEN2_PATTERN, QWEN_SPECIALS, nfc=True)
    hf.save(str(tmp_path / "tokenizer.json"))
    with caplog.at_level(logging.WARNING):
        tok = load_tokenizer_json(tmp_path / "tokenizer.json", bos_token=None,
                                  eos_token="<|endoftext|>")
    assert isinstance(tok, TiktokenTokenizer) and not caplog.text
    check_parity(tok, lambda s: hf_ids(hf, s), CORPUS,
                 normalize=lambda s: unicodedata.normalize("NFC", s))


def test_fallback_without_tokenizers_library_is_exact_pure_python(tmp_path, qwen_json, monkeypatch,
                                                                   caplog):
    spec = json.loads(qwen_json[0].read_text())
    merges = spec["model"]["merges"]
    merges[10], merges[200] = merges[200], merges[10]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    ref = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with caplog.at_level(logging.WARNING):
        tok = load_tokenizer_json(tmp_path / "tokenizer.json", bos_token=None,
                                  eos_token="<|endoftext|>")
    assert type(tok) is MergeRankBPE
    assert str(tmp_path / "tokenizer.json") in caplog.text and "pip install tokenizers" in caplog.text
    check_parity(tok, lambda s: hf_ids(ref, s), CORPUS,
                 normalize=lambda s: unicodedata.normalize("NFC", s))


@pytest.mark.parametrize("text", ["<a><ab>", "x<a>b<abc>y<ab", "<<ab><a>>", "<abcd>", ""])
def test_added_tokens_match_longest_first(text):
    # HF splits added tokens out leftmost-longest; the trie regex must agree with a plain
    # longest-first alternation, also when one token is a prefix of another.
    words = ["<a>", "<ab>", "<a>b", "<abc>", "b<a"]
    reference = re.compile("|".join(map(re.escape, sorted(words, key=len, reverse=True))))
    ours = re.compile(_trie_pattern(words))
    assert [m.group() for m in ours.finditer(text)] == reference.findall(text)


def test_merge_order_violation_is_detected(tmp_path, qwen_json, caplog):
    spec = json.loads(qwen_json[0].read_text())
    merges = spec["model"]["merges"]
    merges[10], merges[200] = merges[200], merges[10]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with caplog.at_level(logging.WARNING):
        tok = load_tokenizer_json(tmp_path / "tokenizer.json", bos_token=None,
                                  eos_token="<|endoftext|>")
    assert isinstance(tok, HFTokenizersBPE) and "merge order is not id order" in caplog.text
    ref = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    check_parity(tok, lambda s: hf_ids(ref, s), CORPUS[:6],
                 normalize=lambda s: unicodedata.normalize("NFC", s))


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(normalizer={"type": "Lowercase"}), "normalizer type 'Lowercase'"),
    (lambda s: s.update(pre_tokenizer={"type": "Whitespace"}), "pre_tokenizer ['Whitespace']"),
    (lambda s: s["added_tokens"][0].update(lstrip=True), "lstrip=true"),
    (lambda s: s["model"].update(type="Unigram"), "model type 'Unigram'"),
])
def test_tokenizer_json_unsupported_features_raise(tmp_path, qwen_json, change, message):
    spec = json.loads(qwen_json[0].read_text())
    change(spec)
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="tokenizer.json: .*" + message.replace("[", r"\[")
                       .replace("]", r"\]")):
        load_tokenizer_json(tmp_path / "tokenizer.json", bos_token=None, eos_token="<|im_end|>")


def train_sentencepiece(folder: Path, *, dummy_prefix: bool, user_defined=(), control=(),
                        bos="<s>", eos="</s>") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_texts()), model_prefix=str(folder / "tokenizer"),
        vocab_size=600, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=dummy_prefix, split_digits=True, user_defined_symbols=list(user_defined),
        control_symbols=list(control),
        unk_id=0, bos_id=1, eos_id=2, bos_piece=bos, eos_piece=eos, minloglevel=2)
    (folder / "tokenizer.vocab").unlink()
    return folder / "tokenizer.model"


def write_config(folder: Path, **config) -> None:
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def llama_sp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama2")
    train_sentencepiece(folder, dummy_prefix=True)
    write_config(folder, tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>",
                 unk_token="<unk>", pad_token=None, add_bos_token=True, add_eos_token=False,
                 legacy=False)
    return folder


@pytest.fixture(scope="module")
def gemma_sp(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma")
    train_sentencepiece(folder, dummy_prefix=False, bos="<bos>", eos="<eos>",
                        user_defined=["<start_of_turn>", "<end_of_turn>"])
    write_config(folder, tokenizer_class="GemmaTokenizer", bos_token="<bos>", eos_token="<eos>",
                 unk_token="<unk>", pad_token="<unk>", add_bos_token=True, add_eos_token=False)
    return folder


SP_TEXTS = [t for t in CORPUS if not t.startswith(" ")] + [
    "<s>[INST] hi [/INST] answer</s><s>[INST] again [/INST]", "a</s>  b<s>\nc"]


def test_sentencepiece_llama_matches_transformers(llama_sp):
    hf = AutoTokenizer.from_pretrained(llama_sp)
    tok = SentencePieceTokenizer(llama_sp / "tokenizer.model", bos_token="<s>", eos_token="</s>")
    check_parity(tok, lambda s: hf(s, add_special_tokens=False).input_ids, SP_TEXTS)
    assert tok.encode("hi") == hf("hi").input_ids  # defaults add what HF adds: BOS, no EOS
    assert tok.encode("hi", add_eos=True) == hf("hi").input_ids + [tok.eos_id]
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (hf.bos_token_id, hf.eos_token_id, len(hf))
    # as in HF, a leading space replaces the dummy prefix instead of adding to it
    assert tok.encode(" lead", False, False) == hf(" lead", add_special_tokens=False).input_ids


def test_sentencepiece_legacy_matches_transformers(llama_sp, tmp_path):
    # legacy=true in tokenizer_config.json: HF prefixes every chunk after a special token too.
    shutil.copy(llama_sp / "tokenizer.model", tmp_path / "tokenizer.model")
    config = json.loads((llama_sp / "tokenizer_config.json").read_text())
    write_config(tmp_path, **{**config, "legacy": True})
    hf = AutoTokenizer.from_pretrained(tmp_path)
    tok = from_hf(tmp_path)
    assert hf.legacy is True
    for text in SP_TEXTS + [" lead<s> y", "a</s>\nb"]:
        ids = tok.encode(text, add_bos=False, add_eos=False)
        assert ids == hf(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids), text
    assert tok.encode("<s>x", False, False) != from_hf(llama_sp).encode("<s>x", False, False)


def test_sentencepiece_gemma_matches_transformers(gemma_sp):
    hf = AutoTokenizer.from_pretrained(gemma_sp)
    tok = SentencePieceTokenizer(gemma_sp / "tokenizer.model", bos_token="<bos>",
                                 eos_token="<eos>")
    texts = SP_TEXTS + ["<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"]
    check_parity(tok, lambda s: hf(s, add_special_tokens=False).input_ids, texts)
    assert tok.encode(" lead", False, False) == hf(" lead", add_special_tokens=False).input_ids


def test_from_hf_picks_the_tokenizer(llama_sp, llama3_files, qwen_json, tmp_path):
    sp = from_hf(llama_sp)
    assert isinstance(sp, SentencePieceTokenizer) and sp.chat_format is None
    assert sp.pad_id == sp.eos_id  # no pad token: falls back to EOS

    llama3_dir = llama3_files[0]
    write_config(llama3_dir, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                 chat_template="{{ '<|start_header_id|>' }}")
    # a stub template: auto would pick it over the Python format (their ids differ), so name it
    l3 = from_hf(llama3_dir, max_seq_len=8, chat_format="llama3")
    assert isinstance(l3, TiktokenTokenizer) and l3.chat_format.name == "llama3"
    assert l3.eos_id == l3.added_tokens["<|eot_id|>"]
    assert set(l3.stop_tokens) == {l3.added_tokens[t] for t in
                                   ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")}
    tokens, mask = l3.tokenize_messages([{"role": "user", "content": "hello " * 20},
                                         {"role": "assistant", "content": "ok"}])
    assert len(tokens) == len(mask) == 8

    qdir = tmp_path / "qwen"
    qdir.mkdir()
    shutil.copy(qwen_json[0], qdir / "tokenizer.json")
    write_config(qdir, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                 chat_template=(TEMPLATES / "qwen2_5.jinja").read_text())
    q = from_hf(qdir)
    assert isinstance(q, TiktokenTokenizer) and q.chat_format.name == "qwen2.5"
    assert (q.bos_id, q.eos_id, q.pad_id) == (None, q.added_tokens["<|im_end|>"],
                                              q.added_tokens["<|endoftext|>"])
    assert from_hf(qdir, chat_format="chatml").chat_format.name == "chatml"


def test_from_hf_errors_name_the_file(tmp_path, llama_sp):
    with pytest.raises(ValueError, match="no tokenizer.model, tokenizer.json"):
        from_hf(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        from_hf(tmp_path / "nope")
    bad = tmp_path / "bad"
    shutil.copytree(llama_sp, bad)
    (bad / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config.json: not valid JSON \(line 1"):
        from_hf(bad)
    write_config(bad, eos_token="<nope>")
    with pytest.raises(ValueError, match=r"tokenizer.model: eos_token '<nope>'"):
        from_hf(bad)
    write_config(bad)
    with pytest.raises(ValueError, match="unknown chat format 'vicuna'"):
        from_hf(bad, chat_format="vicuna")
    (bad / "tokenizer.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="tokenizer.model: not a sentencepiece model"):
        from_hf(bad)
    (bad / "tokenizer.model").write_text("QQ== 0\nnot-base64!! x\n")
    with pytest.raises(ValueError, match=r"tokenizer.model:2: not a tiktoken BPE line"):
        from_hf(bad)
