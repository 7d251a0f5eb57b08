"""tokenizer.json byte-level BPE on a plain install (no `tokenizers`): files in HF's
one-merge-per-token layout (GPT-2, Qwen2/2.5/3) run on tiktoken, files tiktoken cannot reproduce
run on the exact pure-Python rule; ids equal HF `tokenizers`' on a hard corpus either way."""

from __future__ import annotations

import json
import logging
import random
import re
import sys
import unicodedata

import pytest
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

from tunekit.data.tokenizers import MergeRankBPE, TiktokenTokenizer, load_tokenizer_json
from tunekit.data.tokenizers.hf_json import _bpe_model, byte_decoder, hf_bpe

QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BYTE_CHARS = {b: c for c, b in byte_decoder().items()}  # byte -> GPT-2 printable character

HARD = [
    "",
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Emoji 😀🎉 thumbs 👍🏽👍🏿 family 👨‍👩‍👧‍👦 couple 👩‍❤️‍👨 flags 🇫🇷🇯🇵 keycap 1️⃣ done",
    "日本語のテキストです。你好，世界！한국어 문장도 있어요. 漢字かな交じり文",
    "Combining: cafe\u0301 nai\u0308ve A\u030a e\u0301\u0301 vs café naïve Å; \u0301 leading mark",
    "Whitespace   runs\t\ttabs \t \n\n\nnew\r\nlines\r\n\r\n   indented\u00a0nbsp\u3000ideographic",
    "Numbers 1234567 and 3.14159, 2024-01-31, 1,000,000, ١٢٣ arabic digits, ½ ⅔ ²",
    "It's we'll they'd I'M YOU'RE shouldn't 'tis ''quoted'' rock'n'roll",
    "def f(x):\n    return x ** 2  # comment\n\nclass A:\n\tpass\n",
    "Ünïcödé ßtraße Ελληνικά русский עברית العربية हिन्दी ภาษาไทย",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>",
    "text<|endoftext|>more  <|im_start|><|im_start|>x<tool_call>{\"a\": 1}</tool_call>",
    "   leading and trailing spaces   ",
    "\n\nstarts with newlines",
    "x" * 300 + " " + "1" * 40 + " " + "ab" * 200,
    "zero\u200bwidth\u200djoiner \u2028line sep \x00\x7f controls ™©® ∑∫√ ≠≤",
]


def training_texts() -> list[str]:
    rng = random.Random(0)
    words = " ".join(HARD).replace("\n", " \n ").split(" ")
    return HARD * 20 + [" ".join(rng.choice(words) for _ in range(40)) for _ in range(400)]


def mixed_texts(n: int, seed: int = 0) -> list[str]:
    """Random slices of the hard corpus glued together (cuts inside emoji, marks, runs)."""
    rng = random.Random(seed)
    texts = [t for t in HARD if t]
    return ["".join(rng.choice(texts)[rng.randrange(20):][:rng.randint(0, 60)] for _ in range(4))
            for _ in range(n)]


def train(pre_tokenizer, *, nfc: bool, specials: list[str], vocab_size: int = 1200) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_texts(), trainer)
    return tok


def qwen_style() -> Tokenizer:
    """Qwen2/2.5/3 layout: Split(regex, isolated) + ByteLevel, NFC, specials and non-special
    added tokens."""
    tok = train(pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
        nfc=True, specials=QWEN_SPECIALS)
    tok.add_tokens(["<tool_call>", "</tool_call>"])
    return tok


def gpt2_style() -> Tokenizer:
    """GPT-2 layout: ByteLevel with its built-in regex, no normalizer, <|endoftext|> added."""
    tok = train(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), nfc=False,
                specials=[])
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def hf_ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def load_without_tokenizers(monkeypatch, path, **kw):
    """Load as on a plain install: `import tokenizers` fails while loading."""
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "tokenizers", None)
        return load_tokenizer_json(path, bos_token=None, **kw)


def assert_same_as_hf(ours, ref: Tokenizer, texts, normalize=lambda s: s):
    for text in texts:
        ids = ours.encode(text, add_bos=False, add_eos=False)
        assert ids == hf_ids(ref, text), text
        assert ours.decode(ids, skip_special_tokens=False) == normalize(text), text


def merged_ids(path) -> list[int]:
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    return [vocab[a + b] for a, b in (m.split(" ") if isinstance(m, str) else m
                                      for m in spec["model"]["merges"])]


@pytest.mark.parametrize("make, nfc, eos", [(qwen_style, True, "<|im_end|>"),
                                            (gpt2_style, False, "<|endoftext|>")])
def test_trained_one_merge_per_token_files_run_on_tiktoken_without_tokenizers(
        tmp_path, monkeypatch, caplog, make, nfc, eos):
    ref = make()
    path = tmp_path / "tokenizer.json"
    ref.save(str(path))
    built = merged_ids(path)  # HF's layout: one merge per token, in id order
    assert len(set(built)) == len(built) == len(ref.get_vocab(with_added_tokens=False)) - 256 \
        - (3 if nfc else 0)
    assert built == sorted(built)
    with caplog.at_level(logging.WARNING):
        tok = load_without_tokenizers(monkeypatch, path, eos_token=eos)
    assert type(tok) is TiktokenTokenizer and not caplog.text
    normalize = (lambda s: unicodedata.normalize("NFC", s)) if nfc else (lambda s: s)
    assert_same_as_hf(tok, ref, HARD + mixed_texts(300) + training_texts()[-100:], normalize)


def byte_level_file(tmp_path, merges: list[str], tokens: list[str] | None = None,
                    ignore_merges=False):
    """A tokenizer.json written by HF: the 256 byte tokens, then ``tokens`` (default: the ones
    ``merges`` build, in merge order), with the ``merges`` ("a b", plain ASCII)."""
    vocab = {BYTE_CHARS[b]: b for b in range(256)}
    for token in tokens or [m.replace(" ", "") for m in merges]:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges],
                               ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path, tok


@pytest.mark.parametrize("merges, tokens", [
    # one merge per token in id order (bc < ab < abc), but HF("abc") = [a, bc]: tiktoken gives [abc]
    (["b c", "a b", "ab c"], None),
    # the same merges with ids a, b, c, ab, bc, abc: merge order is not id order
    (["b c", "a b", "ab c"], ["ab", "bc", "abc"]),
    # "abc" is built by no merge and is no added token: tiktoken would build it from ab + c
    (["a b"], ["ab", "abc"]),
])
def test_counterexamples_fall_back_to_the_exact_rule(tmp_path, monkeypatch, caplog, merges, tokens):
    path, ref = byte_level_file(tmp_path, merges, tokens)
    assert hf_ids(ref, "abc") != [ref.token_to_id("abc")]
    with caplog.at_level(logging.WARNING):
        tok = load_without_tokenizers(monkeypatch, path, eos_token="<|endoftext|>")
    assert type(tok) is MergeRankBPE and "pip install tokenizers" in caplog.text
    rng = random.Random(0)
    texts = ["abc", "abcabc abc", "xabc", "cab bca aabbcc"] + [
        "".join(rng.choice("abcx ") for _ in range(rng.randint(0, 30))) for _ in range(300)]
    assert_same_as_hf(tok, ref, texts + HARD)
    # with `tokenizers` installed the library runs it, with the same ids
    assert_same_as_hf(load_tokenizer_json(path, bos_token=None, eos_token="<|endoftext|>"), ref,
                      texts)


def random_one_merge_file(rng: random.Random, tmp_path):
    """Merges over a 3-letter alphabet, each joining two random earlier tokens (so the layout
    is HF's, but the merge list need not be one a trainer could produce)."""
    tokens = ["a", "b", "c"]
    merges = []
    while len(merges) < rng.randint(3, 25):
        left, right = rng.choice(tokens), rng.choice(tokens)
        if left + right not in tokens:
            tokens.append(left + right)
            merges.append(f"{left} {right}")
    return byte_level_file(tmp_path, merges, ignore_merges=rng.random() < 0.5)


def test_random_merge_lists_tiktoken_only_when_provably_equal(tmp_path, monkeypatch):
    # The load-time condition is sufficient: whenever tiktoken is chosen its ids equal HF's, and
    # when it is not, the pure-Python rule's do. Both outcomes occur in these files.
    rng = random.Random(0)
    kinds = []
    for n in range(60):
        folder = tmp_path / str(n)
        folder.mkdir()
        path, ref = random_one_merge_file(rng, folder)
        tok = load_without_tokenizers(monkeypatch, path, eos_token="<|endoftext|>")
        kinds.append(type(tok))
        texts = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 40))) for _ in range(60)]
        assert_same_as_hf(tok, ref, texts + [" ".join(texts)])
    assert kinds.count(TiktokenTokenizer) >= 10 and kinds.count(MergeRankBPE) >= 10


def test_exact_rule_matches_hf_on_trained_file(tmp_path, monkeypatch):
    # The pure-Python rule on its own (forced on a file tiktoken could run): HF's ids on the hard
    # corpus, a 5,000-letter pre-token (heap path), and the same chat masks as tiktoken's.
    ref = qwen_style()
    path = tmp_path / "tokenizer.json"
    ref.save(str(path))
    tok = load_without_tokenizers(monkeypatch, path, eos_token="<|im_end|>")
    ranks, merges = _bpe_model(json.loads(path.read_text())["model"], str(path))
    exact = MergeRankBPE(ranks, QWEN2_PATTERN, merges, added_tokens=tok.added_tokens, special_ids=tok.special_ids, bos_id=None, eos_id=tok.eos_id,
        normalize=tok._normalize)
    long_word = "".join(random.Random(1).choice("abcé") for _ in range(5000))
    assert_same_as_hf(exact, ref, HARD + mixed_texts(200, seed=1) + [long_word],
                      lambda s: unicodedata.normalize("NFC", s))
    rng = random.Random(2)
    for _ in range(100):
        parts = [(t, rng.random() < 0.5) for t in mixed_texts(3, seed=rng.randrange(10**6))]
        assert exact._encode_parts(parts) == tok._encode_parts(parts)


def test_hf_bpe_is_lowest_rank_leftmost():
    # Hand-checked: "aaa" with the single merge (a, a) -> [aa, a] (leftmost first); a pair that
    # is no merge is never joined; a repeated merge keeps HF's last rank (see merge_table).
    merges = {(0, 0): (0, 10), (10, 0): (1, 11), (1, 2): (2, 12), (0, 1): (3, 13)}
    assert hf_bpe([0, 0, 0], {(0, 0): (0, 10)}) == [10, 0]
    assert hf_bpe([0, 0, 0], merges) == [11]
    assert hf_bpe([0, 1, 2], merges) == [0, 12]  # (1, 2) has rank 2 < (0, 1)'s 3
    assert hf_bpe([2, 1], merges) == [2, 1]
    assert hf_bpe([], merges) == []


# -- which BOS / EOS encode() adds, as transformers 5 decides, and every shipped family ----------

def llama3_style_folder(folder):
    """Llama 3 HF layout: HF's tiktoken conversion (several merges per token, ignore_merges) with
    a Sequence(ByteLevel, TemplateProcessing) post-processor that adds <|begin_of_text|>."""
    from test_tokenizers import hf_from_ranks, train_bytelevel_bpe, write_ranks
    from tokenizers import processors

    from tunekit.data.tokenizers import LLAMA3_PATTERN, llama3_special_tokens

    write_ranks(train_bytelevel_bpe(LLAMA3_PATTERN, []), folder / "ranks.tiktoken")
    n = len((folder / "ranks.tiktoken").read_text().splitlines())
    tok = hf_from_ranks(folder / "ranks.tiktoken", LLAMA3_PATTERN, list(llama3_special_tokens(n)))
    (folder / "ranks.tiktoken").unlink()
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, tok.token_to_id(bos))])])
    tok.save(str(folder / "tokenizer.json"))
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
            "eos_token": "<|eot_id|>"}


def qwen_style_folder(folder):
    qwen_style().save(str(folder / "tokenizer.json"))
    return {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>"}


def gpt2_style_folder(folder):
    gpt2_style().save(str(folder / "tokenizer.json"))
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>"}


def sentencepiece_folder(folder):
    from test_tokenizers import train_sentencepiece

    train_sentencepiece(folder, dummy_prefix=True)
    return {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
            "unk_token": "<unk>", "legacy": False}


def sentencepiece_with_tokenizer_json_folder(folder):
    """Llama 2 / Mistral HF layout: tokenizer.model plus the tokenizer.json transformers writes
    (its post-processor adds <s>; transformers then ignores add_bos_token / add_eos_token)."""
    from transformers import AutoTokenizer

    config = sentencepiece_folder(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer.model").is_file()
    return config


FAMILIES = {"llama3": llama3_style_folder, "qwen2.5/qwen3": qwen_style_folder,
            "gpt2": gpt2_style_folder, "tiny (tokenizer.model only)": sentencepiece_folder,
            "llama2/mistral": sentencepiece_with_tokenizer_json_folder}
FLAGS = [{}, {"add_bos_token": True}, {"add_bos_token": False}, {"add_eos_token": True},
         {"add_bos_token": True, "add_eos_token": True}]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(re.sub(r"\W", "_", request.param))
    return folder, FAMILIES[request.param](folder)


def test_every_shipped_family_loads_without_tokenizers_and_adds_bos_eos_like_transformers(
        family, monkeypatch):
    from transformers import AutoTokenizer

    from tunekit.data.tokenizers import from_hf

    folder, config = family
    texts = ["hi", "Hello world! 123", "<|im_start|>x 日本 👍🏽", ""]
    for flags in FLAGS:
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, **flags}))
        hf = AutoTokenizer.from_pretrained(folder)
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "tokenizers", None)
            tok = from_hf(folder, chat_format=None)
        assert not isinstance(tok, MergeRankBPE)  # every family runs on tiktoken/sentencepiece
        for text in texts:
            assert tok.encode(text) == hf(text).input_ids, (flags, text)
            plain = hf(text, add_special_tokens=False).input_ids
            assert tok.encode(text, add_bos=False, add_eos=False) == plain
            assert tok.encode(text, add_bos=False, add_eos=True) == plain + [tok.eos_id]
