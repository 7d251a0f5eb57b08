"""Chat formats: token ids equal HF ``apply_chat_template`` with each family's official template
(tests/assets/chat_templates), and the mask trains exactly assistant content + end of turn."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import sentencepiece as spm
from test_tokenizers import (  # noqa: F401  (fixtures are used by name)
    QWEN2_PATTERN,
    QWEN_SPECIALS,
    TEMPLATES,
    gemma_sp,
    llama3_files,
    llama_sp,
    qwen_json,
    train_bytelevel_bpe,
    train_sentencepiece,
    write_config,
)
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tunekit.data.tokenizers import CHAT_FORMATS, from_hf, get_chat_format, guess_chat_format

CONVERSATIONS = {
    "one_turn": [{"role": "user", "content": "What is 2+2?"},
                 {"role": "assistant", "content": "It is 4."}],
    "system_multi_turn": [
        {"role": "system", "content": "You are terse. Answer in one line."},
        {"role": "user", "content": "Translate 'cat' to Japanese 🐱"},
        {"role": "assistant", "content": "猫 (neko)"},
        {"role": "user", "content": "  And dog?\n"},
        {"role": "assistant", "content": "犬 (inu)\n\nDone 👍  "},
    ],
    "prompt_only": [{"role": "user", "content": "Write a haiku about tabs\tand  spaces."}],
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris and Tokyo?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "東京"}}}]},
    {"role": "tool", "content": "{\"temp\": 21}"},
    {"role": "tool", "content": "{\"temp\": 18}"},
    {"role": "assistant", "content": "Paris 21°C, Tokyo 18°C."},
]

# What each assistant turn trains on: its content and the end-of-turn marker.
TRAINED_TEXT = {
    "llama2": lambda m, eos: f" {m['content'].strip()} {eos}",
    "mistral": lambda m, eos: f" {m['content']}{eos}",
    "llama3": lambda m, eos: m["content"].strip() + "<|eot_id|>",
    "qwen2.5": lambda m, eos: m["content"] + "<|im_end|>",
    "gemma": lambda m, eos: m["content"].strip() + "<end_of_turn>",
}


def hf_chat_ids(hf, messages, add_generation_prompt, tools=None) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, tools=tools,
                                 add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def trained_runs(tokens, mask) -> list[list[int]]:
    runs, run = [], []
    for t, masked in zip(tokens, mask):
        if not masked:
            run.append(t)
        elif run:
            runs.append(run)
            run = []
    return runs + ([run] if run else [])


def check_chat(tok, hf, fmt, messages, add_generation_prompt=False, tools=None):
    tokens, mask = tok.tokenize_messages(messages, add_generation_prompt=add_generation_prompt,
                                         tools=tools)
    assert tokens == hf_chat_ids(hf, messages, add_generation_prompt, tools)
    assert len(mask) == len(tokens)
    eos = tok.decode([tok.eos_id], skip_special_tokens=False)
    expected = [TRAINED_TEXT[fmt](m, eos) for m in messages
                if m["role"] == "assistant" and not m.get("tool_calls")]
    got = [tok.decode(run, skip_special_tokens=False) for run in trained_runs(tokens, mask)]
    got = [g for g in got if "<tool_call>" not in g]
    # exact text; only sentencepiece's decode drops the space that starts a decoded run
    assert got == [e.lstrip(" ") for e in expected]
    return tokens, mask


def saved_checkpoint(hf, folder):
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama3_pair(llama3_files, tmp_path_factory):
    root, converted = llama3_files
    hf = PreTrainedTokenizerFast(tokenizer_object=converted, bos_token="<|begin_of_text|>",
                                 eos_token="<|eot_id|>",
                                 chat_template=(TEMPLATES / "llama3.jinja").read_text())
    folder = saved_checkpoint(hf, tmp_path_factory.mktemp("llama3_ckpt"))
    return from_hf(folder), hf


@pytest.fixture(scope="module", params=["tiktoken_derived", "trained"])
def qwen_pair(request, qwen_json, tmp_path_factory):
    if request.param == "trained":  # exercises the tokenizers-library fallback
        backend = train_bytelevel_bpe(QWEN2_PATTERN, QWEN_SPECIALS, nfc=True)
    else:
        backend = qwen_json[1]
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>",
                                 chat_template=(TEMPLATES / "qwen2_5.jinja").read_text())
    folder = saved_checkpoint(hf, tmp_path_factory.mktemp("qwen_ckpt"))
    return from_hf(folder), hf


def sp_pair(source, tmp_path_factory, template, **config_changes):
    """The checkpoint folder ``source`` with a chat template added to its tokenizer_config.json.

    The config is copied as written: rebuilding it from ``AutoTokenizer.init_kwargs`` loses
    ``tokenizer_class`` and ``legacy`` (not kept there), and transformers >= 5.24 then loads a
    generic backend with legacy=True, a different tokenizer than the checkpoint's.
    """
    folder = tmp_path_factory.mktemp(template)
    shutil.copy(source / "tokenizer.model", folder / "tokenizer.model")
    config = json.loads((source / "tokenizer_config.json").read_text())
    write_config(folder, **{**config, **config_changes},
                 chat_template=(TEMPLATES / f"{template}.jinja").read_text())
    return from_hf(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("gen", [False, True])
def test_llama3(llama3_pair, name, gen):
    tok, hf = llama3_pair
    assert tok.chat_format.name == "llama3"
    check_chat(tok, hf, "llama3", CONVERSATIONS[name], gen)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("gen", [False, True])
def test_qwen2_5(qwen_pair, name, gen):
    tok, hf = qwen_pair
    assert tok.chat_format.name == "qwen2.5"
    check_chat(tok, hf, "qwen2.5", CONVERSATIONS[name], gen)


@pytest.mark.parametrize("with_system", [False, True])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_qwen2_5_tool_calls(qwen_pair, with_system, tools):
    tok, hf = qwen_pair
    system = [{"role": "system", "content": "Use tools."}] if with_system else []
    tokens, mask = check_chat(tok, hf, "qwen2.5", system + TOOL_CONVERSATION, tools=tools)
    runs = [tok.decode(r, skip_special_tokens=False) for r in trained_runs(tokens, mask)]
    assert runs[0] == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
                       '\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": '
                       '{"city": "東京"}}\n</tool_call><|im_end|>')


QWEN3_CONVERSATIONS = {
    "think_multi_turn": [
        {"role": "system", "content": "Think first."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>\nagain\n</think>\n\n6"},
    ],
    "reasoning_field": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "reasoning_content": "greet back"},
    ],
    "no_think": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    "tools": TOOL_CONVERSATION[:1] + [dict(TOOL_CONVERSATION[1], content="Checking.")] + [
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "content": "{\"temp\": 3}"},
        {"role": "assistant", "content": "<think>\ndone\n</think>\n\nAll good."}],
}


@pytest.fixture(scope="module")
def qwen3_pair(qwen_json, tmp_path_factory):
    hf = PreTrainedTokenizerFast(tokenizer_object=qwen_json[1], eos_token="<|im_end|>",
                                 pad_token="<|endoftext|>",
                                 chat_template=(TEMPLATES / "qwen3.jinja").read_text())
    folder = saved_checkpoint(hf, tmp_path_factory.mktemp("qwen3_ckpt"))
    return from_hf(folder), hf


@pytest.mark.parametrize("name", list(QWEN3_CONVERSATIONS))
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_qwen3(qwen3_pair, name, tools):
    tok, hf = qwen3_pair
    assert tok.chat_format.name == "qwen3"
    messages = QWEN3_CONVERSATIONS[name]
    tokens, mask = tok.tokenize_messages(messages, tools=tools)
    assert tokens == hf_chat_ids(hf, messages, False, tools)
    # trained = exactly what the template puts between each assistant header and its <|im_end|>
    text = hf.apply_chat_template(messages, tokenize=False, tools=tools)
    expected = re.findall(r"<\|im_start\|>assistant\n(.*?<\|im_end\|>)", text, re.DOTALL)
    assert [tok.decode(r, skip_special_tokens=False)
            for r in trained_runs(tokens, mask)] == expected
    if name == "think_multi_turn":  # earlier turns drop their reasoning, the last keeps it
        assert "add them" not in text and "<think>\nagain\n</think>" in text


LLAMA3_1_TOOL_CONVERSATION = [
    {"role": "system", "content": "  You can call tools. "},
    {"role": "user", "content": " Weather in Paris? "},
    {"role": "assistant", "tool_calls": [{"type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris", "unit": "°C"}}}]},
    {"role": "tool", "content": "{\"temp\": 21, \"sky\": \"☀\"}"},
    {"role": "assistant", "content": "It is 21°C and sunny."},
]


@pytest.fixture(scope="module")
def llama3_1_pair(llama3_files, tmp_path_factory):
    hf = PreTrainedTokenizerFast(tokenizer_object=llama3_files[1], bos_token="<|begin_of_text|>",
                                 eos_token="<|eot_id|>",
                                 chat_template=(TEMPLATES / "llama3_1.jinja").read_text())
    folder = saved_checkpoint(hf, tmp_path_factory.mktemp("llama3_1_ckpt"))
    return from_hf(folder), hf


@pytest.mark.parametrize("name", [*CONVERSATIONS, "tools"])
@pytest.mark.parametrize("tools", [None, TOOLS])
@pytest.mark.parametrize("gen", [False, True])
def test_llama3_1(llama3_1_pair, name, tools, gen):
    tok, hf = llama3_1_pair
    assert tok.chat_format.name == "llama3.1"
    messages = LLAMA3_1_TOOL_CONVERSATION if name == "tools" else CONVERSATIONS[name]
    tokens, mask = tok.tokenize_messages(messages, add_generation_prompt=gen, tools=tools)
    assert tokens == hf_chat_ids(hf, messages, gen, tools)
    text = hf.apply_chat_template(messages, tokenize=False, tools=tools,
                                  add_generation_prompt=gen)
    expected = re.findall(r"<\|start_header_id\|>assistant<\|end_header_id\|>\n\n"
                          r"(.+?<\|eot_id\|>)", text, re.DOTALL)
    assert [tok.decode(r, skip_special_tokens=False)
            for r in trained_runs(tokens, mask)] == expected


MISTRAL_V3_CONTROL = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                      "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
MISTRAL_V3_TOOL_CONVERSATION = [
    {"role": "system", "content": "Use tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "tool_calls": [{"id": "call00001", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call00001", "content": "{\"temp\": 21}"},
    {"role": "assistant", "content": "21 degrees."},
    {"role": "user", "content": "Thanks, and Oslo?"},
]


@pytest.fixture(scope="module")
def mistral_v3_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mistral_v3")
    model = train_sentencepiece(folder, dummy_prefix=True, control=MISTRAL_V3_CONTROL)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    added = {str(sp.piece_to_id(t)): {"content": t, "special": True}
             for t in ["<unk>", "<s>", "</s>", *MISTRAL_V3_CONTROL]}
    write_config(folder, tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>",
                 unk_token="<unk>", legacy=False, added_tokens_decoder=added,
                 chat_template=(TEMPLATES / "mistral_v3.jinja").read_text())
    return from_hf(folder), AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("name", [*CONVERSATIONS, "tools", "tools_ending_in_assistant"])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_mistral_v3(mistral_v3_pair, name, tools):
    tok, hf = mistral_v3_pair
    assert tok.chat_format.name == "mistral_v3"
    messages = {"tools": MISTRAL_V3_TOOL_CONVERSATION,
                "tools_ending_in_assistant": MISTRAL_V3_TOOL_CONVERSATION[:5]}.get(name)
    messages = messages or CONVERSATIONS[name]
    tokens, mask = tok.tokenize_messages(messages, tools=tools)
    assert tokens == hf_chat_ids(hf, messages, False, tools)
    text = hf.apply_chat_template(messages, tokenize=False, tools=tools)
    expected = re.findall(r"\[/(?:INST|TOOL_RESULTS)\] ?(.+?</s>)", text, re.DOTALL)
    assert [tok.decode(r, skip_special_tokens=False).lstrip(" ")
            for r in trained_runs(tokens, mask)] == expected
    with pytest.raises(ValueError, match="9-character"):
        bad = [dict(m, tool_call_id="x") if m["role"] == "tool" else m
               for m in MISTRAL_V3_TOOL_CONVERSATION]
        tok.tokenize_messages(bad)


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("fmt", ["llama2", "mistral"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_inst_formats(llama_sp, tmp_path_factory, fmt, name, legacy):
    # legacy=True (HF's flag in tokenizer_config.json): "[INST]" after <s> gets a dummy prefix.
    tok, hf = sp_pair(llama_sp, tmp_path_factory, fmt, legacy=legacy)
    assert tok.chat_format.name == fmt and hf.legacy is legacy
    tokens, _ = check_chat(tok, hf, fmt, CONVERSATIONS[name])
    if fmt == "llama2":  # "<s>[INST]": only legacy puts the dummy prefix "▁" between the two
        assert (hf.convert_ids_to_tokens(tokens[1]) == "▁") is legacy


@pytest.mark.parametrize("name", ["one_turn", "prompt_only"])
@pytest.mark.parametrize("gen", [False, True])
def test_gemma(gemma_sp, tmp_path_factory, name, gen):
    tok, hf = sp_pair(gemma_sp, tmp_path_factory, "gemma")
    assert tok.chat_format.name == "gemma"
    check_chat(tok, hf, "gemma", CONVERSATIONS[name], gen)
    multi = CONVERSATIONS["system_multi_turn"]
    # Gemma has no system role: like Gemma 3, the system text opens the first user turn.
    folded = [{"role": "user", "content": f"{multi[0]['content']}\n\n{multi[1]['content']}"}]
    ours = tok.tokenize_messages(multi)
    assert ours[0] == hf_chat_ids(hf, folded + multi[2:], False)


def test_llama3_tool_messages_use_ipython_role(llama3_pair):
    tok, _ = llama3_pair
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {
                "name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "21C"},
            {"role": "assistant", "content": "It is 21C."}]
    tokens, mask = tok.tokenize_messages(msgs)
    text = tok.decode(tokens, skip_special_tokens=False)
    assert ("<|start_header_id|>ipython<|end_header_id|>\n\n21C<|eot_id|>" in text)
    runs = [tok.decode(r, skip_special_tokens=False) for r in trained_runs(tokens, mask)]
    assert runs == ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                    "It is 21C.<|eot_id|>"]


def test_max_seq_len_truncates_tokens_and_mask(qwen_pair):
    tok, _ = qwen_pair
    full_tokens, full_mask = tok.tokenize_messages(CONVERSATIONS["system_multi_turn"])
    tok.max_seq_len = 20
    try:
        tokens, mask = tok.tokenize_messages(CONVERSATIONS["system_multi_turn"])
    finally:
        tok.max_seq_len = None
    assert (tokens, mask) == (full_tokens[:20], full_mask[:20])


def test_bad_conversations_raise_clear_errors(llama_sp, tmp_path_factory):
    tok, _ = sp_pair(llama_sp, tmp_path_factory, "llama2")
    with pytest.raises(ValueError, match="roles must alternate"):
        tok.tokenize_messages([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match=r"messages\[0\].role: unknown role 'bot'"):
        tok.tokenize_messages([{"role": "bot", "content": "hi"}])
    with pytest.raises(ValueError, match="only user/assistant turns"):
        tok.tokenize_messages([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    assert set(CHAT_FORMATS) >= {"llama2", "llama3", "mistral", "chatml", "qwen2.5", "gemma"}
    with pytest.raises(ValueError, match="tokenizer.chat_format: unknown chat format"):
        get_chat_format("alpaca")
    with pytest.raises(ValueError, match="'llama2' has no way to show tool definitions"):
        tok.tokenize_messages(CONVERSATIONS["one_turn"], tools=TOOLS)


@pytest.mark.parametrize("fixture, expected", [
    ("llama2", "llama2"), ("llama3", "llama3"), ("llama3_1", "llama3.1"), ("mistral", "mistral"),
    ("qwen2_5", "qwen2.5"), ("qwen3", "qwen3"), ("gemma", "gemma")])
def test_guess_chat_format_from_official_templates(fixture, expected):
    assert guess_chat_format((TEMPLATES / f"{fixture}.jinja").read_text()) == expected


def test_guess_chat_format_without_template_uses_marker_tokens():
    assert guess_chat_format(None, ["<|im_start|>", "<|im_end|>"]) == "chatml"
    assert guess_chat_format("", ["<s>", "</s>"]) is None
