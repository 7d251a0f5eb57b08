"""Message transforms and conversation validation."""

import pytest

from tunekit.data import (
    AlpacaToMessages,
    ChosenRejectedToMessages,
    DataError,
    InputOutputToMessages,
    OpenAIToMessages,
    ShareGPTToMessages,
    TextToDocument,
    detect_format,
)
from tunekit.data.messages import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT


def test_alpaca_prompt_with_and_without_input():
    msgs = AlpacaToMessages()({"instruction": "Add.", "input": "2 and 3", "output": "5"})
    assert msgs[0] == {"role": "user", "content": ALPACA_PROMPT_WITH_INPUT.format(instruction="Add.", input="2 and 3")}
    assert msgs[0]["content"].startswith("Below is an instruction that describes a task, paired with an input")
    assert msgs[0]["content"].endswith("### Input:\n2 and 3\n\n### Response:\n")
    assert msgs[1] == {"role": "assistant", "content": "5"}
    no_input = AlpacaToMessages()({"instruction": "Say hi.", "input": "  ", "output": "hi"})
    assert no_input[0]["content"] == ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.")
    assert "### Input" not in no_input[0]["content"]


def test_column_map_and_missing_column_message():
    t = AlpacaToMessages(column_map={"output": "response"})
    assert t({"instruction": "a", "response": "b"})[1]["content"] == "b"
    with pytest.raises(DataError) as e:
        t({"instruction": "a", "output": "b"})
    assert e.value.field == "response" and "column_map" in str(e.value) and "instruction, output" in str(e.value)


def test_input_output_with_system_prompt():
    msgs = InputOutputToMessages(system_prompt="Be brief.")({"input": "q", "output": "a"})
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]


def test_sharegpt_roles_and_errors():
    row = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "hi"},
                             {"from": "gpt", "value": "hello"}, {"from": "human", "value": "bye"},
                             {"from": "gpt", "value": "ciao"}]}
    assert [m["role"] for m in ShareGPTToMessages()(row)] == ["system", "user", "assistant", "user", "assistant"]
    bad_role = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "x"}]}
    with pytest.raises(DataError, match="unknown role 'bot'") as e:
        ShareGPTToMessages()(bad_role)
    assert e.value.field == "conversations[1].from"
    order = {"conversations": [{"from": "human", "value": "hi"}, {"from": "human", "value": "again"},
                               {"from": "gpt", "value": "x"}]}
    with pytest.raises(DataError, match="role 'user' cannot come after a 'user' message") as e:
        ShareGPTToMessages()(order)
    assert e.value.field == "conversations[1].from"
    empty = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "  "}]}
    with pytest.raises(DataError, match="empty text") as e:
        ShareGPTToMessages()(empty)
    assert e.value.field == "conversations[1].value"


def test_openai_messages_validation():
    t = OpenAIToMessages()
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}]},
            {"role": "tool", "content": "42"}, {"role": "assistant", "content": "it is 42"}]
    out = t({"messages": msgs})
    assert out[0]["content"] == "ab" and out[1]["tool_calls"] == [{"name": "f"}]
    with pytest.raises(DataError, match="first message") as e:
        t({"messages": [{"role": "assistant", "content": "x"}]})
    assert e.value.field == "messages[0].role"
    with pytest.raises(DataError, match="no assistant message"):
        t({"messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(DataError, match="empty text") as e:
        t({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]})
    assert e.value.field == "messages[1].content"
    with pytest.raises(DataError, match="only text content parts"):
        t({"messages": [{"role": "user", "content": [{"type": "image_url"}]}, {"role": "assistant", "content": "x"}]})


def test_chosen_rejected_strings_and_conversations():
    chosen, rejected = ChosenRejectedToMessages()({"prompt": "p", "chosen": "good", "rejected": "bad"})
    assert chosen == [{"role": "user", "content": "p"}, {"role": "assistant", "content": "good"}]
    assert rejected[-1]["content"] == "bad" and rejected[0] == chosen[0]
    conv = lambda a: [{"role": "user", "content": "p"}, {"role": "assistant", "content": a}]  # noqa: E731
    chosen, rejected = ChosenRejectedToMessages()({"chosen": conv("g"), "rejected": conv("b")})
    assert chosen[1]["content"] == "g" and rejected[1]["content"] == "b"
    with pytest.raises(DataError) as e:
        ChosenRejectedToMessages()({"chosen": "g", "rejected": "b"})
    assert e.value.field == "prompt"


def test_text_and_detect_format():
    assert TextToDocument()({"text": "hello"}) == "hello"
    with pytest.raises(DataError, match="expected a string"):
        TextToDocument()({"text": 3})
    assert detect_format({"conversations": []}) == "sharegpt"
    assert detect_format({"messages": []}) == "openai"
    assert detect_format({"instruction": "", "input": "", "output": ""}) == "alpaca"
    assert detect_format({"input": "", "output": ""}) == "input_output"
    assert detect_format({"prompt": "", "chosen": "", "rejected": ""}) == "preference"
    assert detect_format({"body": ""}, column_map={"text": "body"}) == "text"
    with pytest.raises(DataError, match="cannot tell the data format"):
        detect_format({"foo": 1})
