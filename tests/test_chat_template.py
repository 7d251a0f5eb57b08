"""The checkpoint's own chat template (``chat_format: template``) and ``chat_format: auto``.

Reference: transformers' ``apply_chat_template`` on the official templates in
tests/assets/chat_templates. Ids: ``tokenize=True, return_dict=True``. Masks: HF's
``return_assistant_tokens_mask`` where the template has ``{% generation %}`` blocks; else the
growing-prefix rule computed from HF's own renders and HF's token offsets (a token is trained when
it overlaps a trained span, as HF's assistant mask does), or, where earlier turns change when later
ones follow, the Python format's mask (itself checked against HF in test_chat_formats.py).
"""

from __future__ import annotations

import datetime
import json
import logging
import pickle
import re
import shutil

import pytest
import sentencepiece as spm
from test_chat_formats import (
    CONVERSATIONS,
    LLAMA3_1_TOOL_CONVERSATION,
    MISTRAL_V3_CONTROL,
    MISTRAL_V3_TOOL_CONVERSATION,
    QWEN3_CONVERSATIONS,
    TOOLS,
)
from test_tokenizers import (  # noqa: F401  (fixtures are used by name)
    TEMPLATES,
    llama3_files,
    qwen_json,
    train_sentencepiece,
    write_config,
)
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tunekit.checkpoint.errors import CheckpointError
from tunekit.config.errors import ConfigError
from tunekit.data.tokenizers import from_hf
from tunekit.data.tokenizers.chat_template import (
    _GENERATION_RE,
    TemplateChatFormat,
    load_chat_template,
)

DATE = {"date_string": "05 Mar 2025"}


def hf_reference(hf, messages, gen=False, tools=None, **kwargs):
    """(ids, mask) from transformers; mask True = not trained, as tunekit's."""
    marked = bool(_GENERATION_RE.search(hf.chat_template))
    out = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, tokenize=True,
                                 return_dict=True, return_assistant_tokens_mask=marked, **kwargs)
    ids = list(out["input_ids"])
    if marked:
        return ids, [m == 0 for m in out["assistant_masks"]]

    def render(msgs, g):
        return hf.apply_chat_template(msgs, tools=tools, add_generation_prompt=g,
                                      tokenize=False, **kwargs)

    full = render(messages, gen)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, upto = render(messages[:i], True), render(messages[:i + 1], False)
        assert upto.startswith(before) and full.startswith(upto)  # the prefix property holds
        turn = upto[len(before):]
        if turn.rstrip() != turn and any(turn.rstrip().endswith(t)
                                         for t in hf.added_tokens_encoder):
            turn = turn.rstrip()  # whitespace after the closing token is not generated
        spans.append((len(before), len(before) + len(turn)))
    enc = hf(full, add_special_tokens=False, return_offsets_mapping=True)
    assert list(enc["input_ids"]) == ids
    mask = [not any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]
    return ids, mask


def check(tok, hf, messages, gen=False, tools=None, **kwargs):
    ids, mask = tok.tokenize_messages(messages, add_generation_prompt=gen, tools=tools)
    ref_ids, ref_mask = hf_reference(hf, messages, gen, tools, **kwargs)
    assert ids == ref_ids
    assert mask == ref_mask
    assert not gen or all(mask[-3:])  # the generation prompt is never trained
    return ids, mask


def checkpoint(folder, backend, template, **special):
    """An HF checkpoint folder (tokenizer.json + config + chat_template.jinja) and its HF tokenizer."""
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, **special)
    hf.save_pretrained(folder)
    return folder, hf


@pytest.fixture(scope="module")
def llama_backend(request):
    return request.getfixturevalue("llama3_files")[1]


@pytest.fixture(scope="module")
def qwen_files(request):
    """(tokenizer.json path, its ``tokenizers`` object): a Qwen2-style tiktoken-derived file."""
    return request.getfixturevalue("qwen_json")


def llama_checkpoint(tmp_path_factory, backend, template):
    return checkpoint(tmp_path_factory.mktemp("llama"), backend, template,
                      bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def qwen_checkpoint(tmp_path_factory, backend, template):
    return checkpoint(tmp_path_factory.mktemp("qwen"), backend, template,
                      eos_token="<|im_end|>", pad_token="<|endoftext|>")


# -- Llama 3.1 / 3.2 ---------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["llama3_1", "llama3_2"])
def llama_pair(request, llama_backend, tmp_path_factory):
    folder, hf = llama_checkpoint(tmp_path_factory, llama_backend,
                                  (TEMPLATES / f"{request.param}.jinja").read_text())
    return folder, hf


@pytest.mark.parametrize("name, gen, tools", [
    ("one_turn", False, None), ("system_multi_turn", False, None), ("prompt_only", True, None),
    ("system_multi_turn", True, TOOLS), ("tools", False, None), ("tools", False, TOOLS)])
def test_llama3_templates_match_hf(llama_pair, name, gen, tools):
    folder, hf = llama_pair
    tok = from_hf(folder, chat_format="template", chat_template_kwargs=DATE)
    assert isinstance(tok.chat_format, TemplateChatFormat)
    messages = LLAMA3_1_TOOL_CONVERSATION if name == "tools" else CONVERSATIONS[name]
    ids, _ = check(tok, hf, messages, gen, tools, **DATE)
    assert "Today Date: 05 Mar 2025" in tok.decode(ids, skip_special_tokens=False)
    assert {tok.added_tokens[t] for t in ("<|eot_id|>", "<|eom_id|>")} <= set(tok.stop_tokens)


def test_llama3_2_date_is_today_unless_pinned(llama_backend, tmp_path_factory, caplog):
    folder, hf = llama_checkpoint(tmp_path_factory, llama_backend,
                                  (TEMPLATES / "llama3_2.jinja").read_text())
    with caplog.at_level(logging.INFO, logger="tunekit.data.tokenizers.chat_template"):
        tok = from_hf(folder)  # auto: the Python llama3.1 format writes 26 Jul 2024
    assert isinstance(tok.chat_format, TemplateChatFormat)
    assert "format differs on the system + multi-turn probe: ids differ" in caplog.text
    messages = CONVERSATIONS["system_multi_turn"]
    for _ in range(3):  # same day on both sides (retried if the test runs across midnight)
        day = datetime.date.today()
        ids, mask = tok.tokenize_messages(messages)
        ref_ids, ref_mask = hf_reference(hf, messages)
        if datetime.date.today() == day:
            break
    assert (ids, mask) == (ref_ids, ref_mask)
    assert f"Today Date: {day.strftime('%d %b %Y')}" in tok.decode(ids)
    # pinned to the Python format's date, the template gives the same ids: auto keeps Python
    assert from_hf(folder, chat_template_kwargs={"date_string": "26 Jul 2024"}
                   ).chat_format.name == "llama3.1"
    assert from_hf(folder, chat_format="llama3.1").chat_format.name == "llama3.1"


# -- Qwen3 -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen3_pair(qwen_files, tmp_path_factory):
    return qwen_checkpoint(tmp_path_factory, qwen_files[1],
                           (TEMPLATES / "qwen3.jinja").read_text())


@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("name, gen", [("reasoning_field", False), ("no_think", False),
                                       ("no_think", True)])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_qwen3_template_matches_hf(qwen3_pair, thinking, name, gen, tools):
    folder, hf = qwen3_pair
    kwargs = {} if thinking is None else {"enable_thinking": thinking}
    tok = from_hf(folder, chat_format="template", chat_template_kwargs=kwargs)
    messages = QWEN3_CONVERSATIONS[name][:1] if gen else QWEN3_CONVERSATIONS[name]
    if name == "reasoning_field" and thinking is False:
        # the prompt would end in an empty <think> block that this turn does not continue
        with pytest.raises(ValueError, match=r"messages\[1\] does not continue .*enable_thinking"):
            tok.tokenize_messages(messages, tools=tools)
        return
    ids, mask = check(tok, hf, messages, gen, tools, **kwargs)
    text = tok.decode(ids, skip_special_tokens=False)
    if name == "reasoning_field":  # the reasoning is trained, inside <think>
        trained = tok.decode([t for t, m in zip(ids, mask) if not m], skip_special_tokens=False)
        assert trained == "<think>\ngreet back\n</think>\n\nhello<|im_end|>"
    if gen and thinking is False:
        assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("name", ["think_multi_turn", "tools"])
def test_qwen3_earlier_turns_that_change_are_still_found(qwen3_pair, name):
    """Qwen3 drops the <think> block of turns before the last user query once later turns follow:
    the full render is not a growing prefix; each turn still trains exactly its text up to
    <|im_end|> (the Python qwen3 format's mask, checked against HF text in test_chat_formats)."""
    folder, hf = qwen3_pair
    tok = from_hf(folder, chat_format="template")
    messages = QWEN3_CONVERSATIONS[name]
    ids, mask = tok.tokenize_messages(messages, tools=TOOLS)
    assert ids == hf.apply_chat_template(messages, tools=TOOLS, tokenize=True,
                                         return_dict=True)["input_ids"]
    assert (ids, mask) == from_hf(folder, chat_format="qwen3").tokenize_messages(messages,
                                                                                 tools=TOOLS)


def test_qwen3_without_thinking_multi_turn(qwen3_pair):
    """enable_thinking=false: the generation prompt ends in an empty <think> block, which earlier
    turns do not have; every turn trains its answer and <|im_end|>, the last one not the empty
    <think> block (it is part of the prompt the model will see)."""
    folder, hf = qwen3_pair
    tok = from_hf(folder, chat_template_kwargs={"enable_thinking": False})
    assert tok.chat_format.name == "template"
    messages = CONVERSATIONS["system_multi_turn"]
    ids, mask = tok.tokenize_messages(messages)
    assert ids == hf.apply_chat_template(messages, tokenize=True, return_dict=True,
                                         enable_thinking=False)["input_ids"]
    runs, run = [], []
    for t, masked in zip(ids, [*mask, True]):
        if not masked:
            run.append(t)
        elif run:
            runs, run = [*runs, tok.decode(run, skip_special_tokens=False)], []
    assert runs == ["猫 (neko)<|im_end|>", "犬 (inu)\n\nDone 👍  <|im_end|>"]
    assert "<think>\n\n</think>\n\n犬" in tok.decode(ids)


# -- Mistral v3 --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mistral_v3_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mistral_v3_template")
    model = train_sentencepiece(folder, dummy_prefix=True, control=MISTRAL_V3_CONTROL)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    added = {str(sp.piece_to_id(t)): {"content": t, "special": True}
             for t in ["<unk>", "<s>", "</s>", *MISTRAL_V3_CONTROL]}
    write_config(folder, tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>",
                 unk_token="<unk>", legacy=False, added_tokens_decoder=added,
                 chat_template=(TEMPLATES / "mistral_v3.jinja").read_text())
    return folder


@pytest.mark.parametrize("name, tools", [
    ("one_turn", None), ("one_turn", TOOLS), ("tools", None), ("tools", TOOLS)])
def test_mistral_v3_template_matches_hf(mistral_v3_folder, name, tools):
    tok = from_hf(mistral_v3_folder, chat_format="template")
    hf = AutoTokenizer.from_pretrained(mistral_v3_folder)
    # no system message and no user turn after the tool use: the template keeps earlier turns
    messages = MISTRAL_V3_TOOL_CONVERSATION[1:5] if name == "tools" else CONVERSATIONS[name]
    ids, mask = check(tok, hf, messages, tools=tools)
    python = from_hf(mistral_v3_folder, chat_format="mistral_v3")
    assert (ids, mask) == python.tokenize_messages(messages, tools=tools)


def test_mistral_v3_moving_system_and_tools_is_a_clear_error(mistral_v3_folder, caplog):
    tok = from_hf(mistral_v3_folder, chat_format="template")
    # The template puts the system message and the tools on the last user turn only, so the
    # text before an assistant turn changes when more turns follow: prefix diffs cannot work.
    for messages, tools in ((MISTRAL_V3_TOOL_CONVERSATION[:5], None),
                            (CONVERSATIONS["system_multi_turn"], None),
                            (MISTRAL_V3_TOOL_CONVERSATION[1:] + [
                                {"role": "assistant", "content": "Cold."}], TOOLS)):
        with pytest.raises(ValueError, match=r"assistant messages\[\d\].*mistral_v3.*generation"):
            tok.tokenize_messages(messages, tools=tools)
    with caplog.at_level(logging.INFO, logger="tunekit.data.tokenizers.chat_template"):
        auto = from_hf(mistral_v3_folder)
    assert auto.chat_format.name == "mistral_v3"  # identical ids: the Python format is used
    assert "Python 'mistral_v3' (same ids as the checkpoint's template" in caplog.text


# -- generation markers ------------------------------------------------------------------------
# Qwen2.5's template with {% generation %} around what the assistant writes (as training
# templates do), and the same without the markers: both masks must be HF's assistant mask.
QWEN_MARKED = (TEMPLATES / "qwen2_5.jinja").read_text().replace(
    """    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or """
    """(message.role == "assistant" and not message.tool_calls) %}""",
    """    {%- if message.role == "assistant" and not message.tool_calls %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}{{- message.content + '<|im_end|>' }}{%- endgeneration %}
        {{- '\\n' }}
    {%- elif (message.role == "user") or (message.role == "system" and not loop.first) %}""")


@pytest.mark.parametrize("name", ["one_turn", "system_multi_turn", "prompt_only"])
def test_generation_markers_match_hf_assistant_mask(qwen_files, tmp_path_factory, name):
    assert QWEN_MARKED.count("generation %}") == 2
    folder, hf = qwen_checkpoint(tmp_path_factory, qwen_files[1], QWEN_MARKED)
    tok = from_hf(folder, chat_format="template")
    assert tok.chat_format.has_generation
    messages = CONVERSATIONS[name]
    gen = name == "prompt_only"
    ids, mask = check(tok, hf, messages, gen)
    copy = pickle.loads(pickle.dumps(tok))  # spawned data-loader workers get a copy
    assert copy.chat_format.has_generation and copy.tokenize_messages(messages, gen) == (ids, mask)
    # the unmarked template (prefix diffs) and the Python format train the same tokens
    plain_folder, _ = qwen_checkpoint(tmp_path_factory, qwen_files[1],
                                      (TEMPLATES / "qwen2_5.jinja").read_text())
    plain = from_hf(plain_folder, chat_format="template")
    assert not plain.chat_format.has_generation
    assert plain.tokenize_messages(messages, gen) == (ids, mask)
    assert from_hf(plain_folder, chat_format="qwen2.5").tokenize_messages(messages, gen) == (
        ids, mask)


# -- auto --------------------------------------------------------------------------------------
@pytest.mark.parametrize("template, python", [
    ("qwen3", "qwen3"), ("qwen2_5", "qwen2.5"), ("llama3_1", "llama3.1"), ("llama3", "llama3")])
def test_auto_keeps_the_python_format_when_ids_are_identical(
        template, python, qwen_files, llama_backend, tmp_path_factory, caplog):
    source = (TEMPLATES / f"{template}.jinja").read_text()
    make = qwen_checkpoint if template.startswith("qwen") else llama_checkpoint
    folder, _ = make(tmp_path_factory, qwen_files[1] if template.startswith("qwen")
                     else llama_backend, source)
    with caplog.at_level(logging.INFO, logger="tunekit.data.tokenizers.chat_template"):
        tok = from_hf(folder)
    assert tok.chat_format.name == python
    assert f"chat format: Python {python!r} (same ids" in caplog.text


@pytest.mark.parametrize("change", [
    ("You are Qwen, created by Alibaba Cloud.", "You are Qwen, made by Alibaba Cloud."),
    ("'<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n'",
     "'<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>' + '\\n'")])
def test_auto_picks_the_template_when_the_python_format_differs(
        change, qwen_files, tmp_path_factory, caplog):
    source = (TEMPLATES / "qwen2_5.jinja").read_text()
    assert change[0] in source
    folder, hf = qwen_checkpoint(tmp_path_factory, qwen_files[1], source.replace(*change))
    with caplog.at_level(logging.INFO, logger="tunekit.data.tokenizers.chat_template"):
        tok = from_hf(folder)
    assert tok.chat_format.name == "template"
    assert re.search(r"the Python '(qwen2.5|chatml)' format differs on the .* probe: ids differ",
                     caplog.text)
    check(tok, hf, CONVERSATIONS["system_multi_turn"])
    check(tok, hf, CONVERSATIONS["prompt_only"], gen=True)
    assert from_hf(folder, chat_format="qwen2.5").chat_format.name == "qwen2.5"


def test_auto_picks_the_template_for_qwen3_without_thinking(qwen3_pair):
    folder, hf = qwen3_pair
    tok = from_hf(folder, chat_template_kwargs={"enable_thinking": False})
    assert tok.chat_format.name == "template"  # the generation prompt gains an empty <think>
    check(tok, hf, QWEN3_CONVERSATIONS["no_think"][:1], gen=True, enable_thinking=False)


# -- files and errors --------------------------------------------------------------------------
def test_template_files_are_found_as_transformers_finds_them(tmp_path):
    assert load_chat_template(tmp_path, {}) is None
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json"}))
    assert load_chat_template(tmp_path, {})[0] == "json"
    config = {"chat_template": [{"name": "tool_use", "template": "tools"},
                                {"name": "default", "template": "config"}]}
    assert load_chat_template(tmp_path, config)[0] == "config"
    (tmp_path / "chat_template.jinja").write_text("jinja")
    assert load_chat_template(tmp_path, config) == ("jinja", str(tmp_path / "chat_template.jinja"))
    (tmp_path / "chat_template.json").write_text("[1]")
    (tmp_path / "chat_template.jinja").unlink()
    assert load_chat_template(tmp_path, {"chat_template": "config"})[0] == "config"
    with pytest.raises(CheckpointError, match="chat_template.json: expected a JSON object"):
        load_chat_template(tmp_path, {})


def test_template_errors_are_clear(qwen_files, tmp_path):
    shutil.copy(qwen_files[0], tmp_path / "tokenizer.json")
    write_config(tmp_path, eos_token="<|im_end|>")
    with pytest.raises(ConfigError, match="'template' needs a chat template"):
        from_hf(tmp_path, chat_format="template")
    with pytest.raises(ConfigError, match="unknown chat format 'tempalte'; did you mean template"):
        from_hf(tmp_path, chat_format="tempalte")
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}\n{{ m.content }")
    with pytest.raises(CheckpointError, match=r"chat_template.jinja: line 2: invalid Jinja"):
        from_hf(tmp_path, chat_format="template")
    (tmp_path / "chat_template.jinja").write_text(
        "{% if messages[0].role != 'user' %}{{ raise_exception('user first!') }}{% endif %}"
        "{% for m in messages %}{{ m.content | tojson }}"
        "{% if m.role == 'tool' %}{{ m.content.__class__() }}{% endif %}{% endfor %}")
    tok = from_hf(tmp_path, chat_format="template")
    with pytest.raises(ValueError, match="rejects this conversation: user first!"):
        tok.tokenize_messages([{"role": "system", "content": "x"}])
    # tojson keeps non-ASCII and does not HTML-escape, as transformers' filter
    assert tok.chat_format.render_text([{"role": "user", "content": "<é>"}]) == '"<é>"'
    with pytest.raises(ValueError, match="rejects this conversation: .*__class__.* is unsafe"):
        tok.tokenize_messages([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
