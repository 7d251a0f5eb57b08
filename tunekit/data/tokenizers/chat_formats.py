"""Chat formats: OpenAI-style messages -> text parts, each flagged trained or not.

Each format reproduces, character for character, the official HF chat template of its family
(``tokenizer.apply_chat_template``); the tokenizer then encodes the joined text exactly like HF
does and derives the loss mask from which part each token starts in. Trained parts are the
assistant content and its end-of-turn marker; everything else (system, user, tool content, role
headers, BOS) is not trained on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tunekit.config.errors import ConfigError, did_you_mean

Message = dict[str, Any]
Part = tuple[str, bool]  # (text, trained)

log = logging.getLogger(__name__)

QWEN2_5_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN2_SYSTEM = "You are a helpful assistant."


@dataclass(frozen=True)
class ChatFormat:
    """A named renderer plus the end-of-turn strings that should stop generation."""

    name: str
    renderer: Callable[..., list[Part]]
    stop_strings: tuple[str, ...] = ()
    default_system: str | None = None
    supports_tools: bool = False

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False,
               tools: list[dict] | None = None, bos: str = "", eos: str = "") -> list[Part]:
        _check_roles(messages)
        if tools and not self.supports_tools:
            raise ValueError(f"chat format {self.name!r} has no way to show tool definitions; "
                             "pass tools=None or use a format with tools (llama3.1, qwen2.5, "
                             "qwen3, mistral_v3, chatml)")
        return self.renderer(list(messages), add_generation_prompt=add_generation_prompt,
                             tools=tools, bos=bos, eos=eos, default_system=self.default_system)


def _check_roles(messages: Sequence[Message]) -> None:
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"messages[{i}].role: unknown role {m.get('role')!r}; expected "
                             "system, user, assistant or tool")
        if not isinstance(m.get("content", ""), str):
            raise ValueError(f"messages[{i}].content: expected a string, got "
                             f"{type(m.get('content')).__name__}")


def _content(m: Message) -> str:
    return m.get("content") or ""


def _tojson(x: Any) -> str:
    # transformers' chat-template ``tojson`` filter: json.dumps keeping non-ASCII characters.
    return json.dumps(x, ensure_ascii=False)


def _alternating(messages: list[Message], fmt: str) -> None:
    """The [INST]/Gemma templates require user/assistant alternation starting with user."""
    for i, m in enumerate(messages):
        if m["role"] not in ("user", "assistant"):
            raise ValueError(f"chat format {fmt!r} supports only user/assistant turns after an "
                             f"optional system message; got role {m['role']!r} in a later message")
        if (m["role"] == "user") != (i % 2 == 0):
            raise ValueError(f"chat format {fmt!r}: roles must alternate user/assistant "
                             f"starting with user (message {i} is {m['role']!r})")


def _split_system(messages: list[Message]) -> tuple[str | None, list[Message]]:
    if messages and messages[0]["role"] == "system":
        return _content(messages[0]), messages[1:]
    return None, messages


def _llama2(messages, *, add_generation_prompt, tools, bos, eos, default_system) -> list[Part]:
    system, turns = _split_system(messages)
    _alternating(turns, "llama2")
    parts: list[Part] = []
    for i, m in enumerate(turns):
        content = _content(m)
        if i == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m["role"] == "user":
            parts.append((f"{bos}[INST] {content.strip()} [/INST]", False))
        else:
            parts.append((f" {content.strip()} {eos}", True))
    return parts


def _mistral(messages, *, add_generation_prompt, tools, bos, eos, default_system) -> list[Part]:
    system, turns = _split_system(messages)
    _alternating(turns, "mistral")
    parts: list[Part] = [(bos, False)]
    for i, m in enumerate(turns):
        if m["role"] == "user":
            content = _content(m)
            if i == 0 and system is not None:
                content = f"{system}\n\n{content}"
            parts.append((f" [INST] {content} [/INST]", False))
        else:
            parts.append((f" {_content(m)}{eos}", True))
    return parts


def _mistral_v3_tools(tools: list[dict]) -> str:
    def one(tool: dict) -> str:
        fn = tool.get("function", tool)
        fields = ", ".join(f'"{k}": "{v}"' if isinstance(v, str) else f'"{k}": {_tojson(v)}'
                           for k, v in fn.items() if k != "return")
        return f'{{"type": "function", "function": {{{fields}}}}}'
    return "[AVAILABLE_TOOLS] [" + ", ".join(one(t) for t in tools) + "][/AVAILABLE_TOOLS]"


def _mistral_v3_call_id(value: Any, field: str) -> str:
    if not isinstance(value, str) or len(value) != 9:
        raise ValueError(f"chat format 'mistral_v3': {field} must be a 9-character string "
                         f"(Mistral tool-call ids), got {value!r}")
    return value


def _mistral_v3(messages, *, add_generation_prompt, tools, bos, eos, default_system
                ) -> list[Part]:
    """Mistral v3 (Mistral-7B-Instruct-v0.3): ``[INST]``/``[/INST]`` control tokens, tools in
    the last user turn, and, as the template does, the system message only prefixed to the
    last user turn when the conversation ends there."""
    system, turns = _split_system(messages)
    _alternating([m for m in turns if m["role"] != "tool" and not m.get("tool_calls")],
                 "mistral_v3")
    last_user = [m for m in turns if m["role"] == "user"][-1:]
    parts: list[Part] = [(bos, False)]
    for i, m in enumerate(turns):
        if m["role"] == "user":
            prefix = _mistral_v3_tools(tools) if tools and m == last_user[0] else ""
            content = _content(m)
            if i == len(turns) - 1 and system is not None:
                content = f"{system}\n\n{content}"
            parts.append((f"{prefix}[INST] {content}[/INST]", False))
        elif m.get("tool_calls"):
            calls = []
            for k, call in enumerate(m["tool_calls"]):
                call_id = _mistral_v3_call_id(call.get("id"), f"tool_calls[{k}].id")
                calls.append(_tojson(call["function"])[:-1] + f', "id": "{call_id}"}}')
            parts.append(("[TOOL_CALLS] [" + ", ".join(calls) + "]" + eos, True))
        elif m["role"] == "assistant":
            parts.append((f" {_content(m).strip()}{eos}", True))
        else:
            call_id = _mistral_v3_call_id(m.get("tool_call_id"), "tool_call_id")
            parts.append((f'[TOOL_RESULTS] {{"content": {_content(m)}, "call_id": '
                          f'"{call_id}"}}[/TOOL_RESULTS]', False))
    return parts


def _llama3_tool_call(m: Message) -> str:
    calls = m["tool_calls"]
    if len(calls) != 1:
        raise ValueError("Llama 3 chat formats render exactly one tool call per assistant "
                         f"message (as the Llama 3.1 template); got {len(calls)}")
    call = calls[0].get("function", calls[0])
    return (f'{{"name": "{call["name"]}", "parameters": '
            f'{_tojson(call.get("arguments", {}))}}}')


def _llama3_turn(m: Message, content: str | None = None) -> list[Part]:
    """One header + content + <|eot_id|> turn; tool results use Llama 3.1's ipython role."""
    role = "ipython" if m["role"] == "tool" else m["role"]
    header = f"<|start_header_id|>{role}<|end_header_id|>\n\n"
    if content is None:
        content = _llama3_tool_call(m) if m.get("tool_calls") else _content(m).strip()
    if m["role"] == "assistant":
        return [(header, False), (content + "<|eot_id|>", True)]
    return [(header + content + "<|eot_id|>", False)]


def _llama3_generation_prompt(add_generation_prompt: bool) -> list[Part]:
    return [("<|start_header_id|>assistant<|end_header_id|>\n\n", False)] * add_generation_prompt


def _llama3(messages, *, add_generation_prompt, tools, bos, eos, default_system) -> list[Part]:
    """Llama 3 / 3.0 template (tool messages follow the 3.1 conventions)."""
    parts: list[Part] = [(bos, False)]
    for m in messages:
        parts += _llama3_turn(m)
    return parts + _llama3_generation_prompt(add_generation_prompt)


LLAMA3_1_DATE = "26 Jul 2024"  # the template's default ``date_string``


def _llama3_1(messages, *, add_generation_prompt, tools, bos, eos, default_system) -> list[Part]:
    """Llama 3.1 template: a system turn with the knowledge-cutoff/date header, custom tools in
    the first user turn (``tools_in_user_message``), one JSON tool call per assistant message."""
    system, turns = _split_system(messages)
    head = ("Environment: ipython\n" if tools else "") + (
        f"Cutting Knowledge Date: December 2023\nToday Date: {LLAMA3_1_DATE}\n\n")
    parts: list[Part] = [(f"{bos}<|start_header_id|>system<|end_header_id|>\n\n{head}"
                          f"{(system or '').strip()}<|eot_id|>", False)]
    if tools:
        if not turns:
            raise ValueError("chat format 'llama3.1' puts tools in the first user message, "
                             "but there is none")
        listed = "".join(json.dumps(t, ensure_ascii=False, indent=4) + "\n\n" for t in tools)
        parts.append(("<|start_header_id|>user<|end_header_id|>\n\nGiven the following "
                      "functions, please respond with a JSON for a function call with its "
                      "proper arguments that best answers the given prompt.\n\nRespond in the "
                      'format {"name": function name, "parameters": dictionary of argument name '
                      f"and its value}}.Do not use variables.\n\n{listed}"
                      f"{_content(turns[0]).strip()}<|eot_id|>", False))
        turns = turns[1:]
    for m in turns:
        # The template writes tool output through ``tojson`` (strings count as iterable).
        parts += _llama3_turn(m, _tojson(_content(m)) if m["role"] == "tool" else None)
    return parts + _llama3_generation_prompt(add_generation_prompt)


def _chatml_tools_system(system: str | None, tools: list[dict]) -> str:
    listed = "".join("\n" + _tojson(t) for t in tools)
    head = "" if system is None else system + "\n\n"
    return ("<|im_start|>system\n" + head +
            "# Tools\n\nYou may call one or more functions to assist with the user query."
            "\n\nYou are provided with function signatures within <tools></tools> XML tags:"
            f"\n<tools>{listed}\n</tools>\n\nFor each function call, return a json object with "
            "function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>"
            '\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
            "<|im_end|>\n")


def _chatml_system(messages: list[Message], tools, default_system) -> list[Part]:
    has_system = bool(messages) and messages[0]["role"] == "system"
    system = _content(messages[0]) if has_system else default_system
    if tools:
        return [(_chatml_tools_system(system, tools), False)]
    return [] if system is None else [(f"<|im_start|>system\n{system}<|im_end|>\n", False)]


def _chatml_tool_result(messages: list[Message], i: int) -> Part:
    """Consecutive tool results share one user turn, each wrapped in <tool_response>."""
    first = i == 0 or messages[i - 1]["role"] != "tool"
    last = i == len(messages) - 1 or messages[i + 1]["role"] != "tool"
    return (("<|im_start|>user" if first else "") +
            f"\n<tool_response>\n{_content(messages[i])}\n</tool_response>" +
            ("<|im_end|>\n" if last else ""), False)


def _tool_call_json(call: dict, raw_string_arguments: bool) -> str:
    call = call.get("function", call)
    args = call.get("arguments", {})
    args = args if raw_string_arguments and isinstance(args, str) else _tojson(args)
    return f'<tool_call>\n{{"name": "{call["name"]}", "arguments": {args}}}\n</tool_call>'


def _chatml_turns(messages: list[Message], assistant: Callable[[int, Message], str],
                  add_generation_prompt: bool) -> list[Part]:
    parts: list[Part] = []
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system" and i == 0:
            continue
        if role == "assistant":
            # Renderers return the turn after "<|im_start|>assistant"; its leading newline is
            # part of the generation prompt, so not trained on.
            body = assistant(i, m)
            assert body.startswith("\n")
            parts += [("<|im_start|>assistant\n", False), (body[1:] + "<|im_end|>", True),
                      ("\n", False)]
        elif role == "tool":
            parts.append(_chatml_tool_result(messages, i))
        else:
            parts.append((f"<|im_start|>{role}\n{_content(m)}<|im_end|>\n", False))
    if add_generation_prompt:
        parts.append(("<|im_start|>assistant\n", False))
    return parts


def _chatml(messages, *, add_generation_prompt, tools, bos, eos, default_system) -> list[Part]:
    """Qwen2 / Qwen2.5 (and plain ChatML when there is no default system prompt)."""
    def assistant(i: int, m: Message) -> str:
        if not m.get("tool_calls"):
            return "\n" + _content(m)
        body = ("\n" + _content(m)) if _content(m) else ""
        return body + "".join("\n" + _tool_call_json(c, False) for c in m["tool_calls"])

    return (_chatml_system(messages, tools, default_system) +
            _chatml_turns(messages, assistant, add_generation_prompt))


def _qwen3(messages, *, add_generation_prompt, tools, bos, eos, default_system) -> list[Part]:
    """Qwen3: reasoning is kept (as <think>...</think>) only after the last real user query."""
    last_query = len(messages) - 1
    for i in range(len(messages) - 1, -1, -1):
        c = _content(messages[i])
        if messages[i]["role"] == "user" and not (c.startswith("<tool_response>") and
                                                  c.endswith("</tool_response>")):
            last_query = i
            break

    def assistant(i: int, m: Message) -> str:
        content = _content(m)
        reasoning = m.get("reasoning_content")
        if not isinstance(reasoning, str):
            reasoning = ""
            if "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1]
                reasoning = reasoning.lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
        if i > last_query and (i == len(messages) - 1 or reasoning):
            reasoning, answer = reasoning.strip("\n"), content.lstrip("\n")
            body = f"\n<think>\n{reasoning}\n</think>\n\n{answer}"
        else:
            body = "\n" + content
        for k, call in enumerate(m.get("tool_calls") or ()):
            body += ("\n" if k or content else "") + _tool_call_json(call, True)
        return body

    return (_chatml_system(messages, tools, None) +
            _chatml_turns(messages, assistant, add_generation_prompt))


def _gemma(messages, *, add_generation_prompt, tools, bos, eos, default_system) -> list[Part]:
    system, turns = _split_system(messages)
    _alternating(turns, "gemma")
    # Gemma has no system role; like the Gemma 3 template, the system text opens the first turn.
    prefix = f"{system}\n\n" if system is not None else ""
    parts: list[Part] = [(bos, False)]
    for i, m in enumerate(turns):
        content = _content(m).strip()
        if m["role"] == "user":
            parts.append((f"<start_of_turn>user\n{prefix if i == 0 else ''}{content}"
                          "<end_of_turn>\n", False))
        else:
            parts += [("<start_of_turn>model\n", False), (content + "<end_of_turn>", True),
                      ("\n", False)]
    if add_generation_prompt:
        parts.append(("<start_of_turn>model\n", False))
    return parts


_LLAMA3_STOPS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")
_CHATML_STOPS = ("<|im_end|>", "<|endoftext|>")

CHAT_FORMATS: dict[str, ChatFormat] = {
    "llama2": ChatFormat("llama2", _llama2),
    "mistral": ChatFormat("mistral", _mistral),
    "mistral_v3": ChatFormat("mistral_v3", _mistral_v3, supports_tools=True),
    "llama3": ChatFormat("llama3", _llama3, _LLAMA3_STOPS),
    "llama3.1": ChatFormat("llama3.1", _llama3_1, _LLAMA3_STOPS, supports_tools=True),
    "chatml": ChatFormat("chatml", _chatml, _CHATML_STOPS, supports_tools=True),
    "qwen2": ChatFormat("qwen2", _chatml, _CHATML_STOPS, QWEN2_SYSTEM, supports_tools=True),
    "qwen2.5": ChatFormat("qwen2.5", _chatml, _CHATML_STOPS, QWEN2_5_SYSTEM,
                          supports_tools=True),
    "qwen3": ChatFormat("qwen3", _qwen3, _CHATML_STOPS, supports_tools=True),
    "gemma": ChatFormat("gemma", _gemma, ("<end_of_turn>",)),
}


def get_chat_format(name: str) -> ChatFormat:
    """The chat format called ``name`` (see ``CHAT_FORMATS``), with a clear error otherwise."""
    try:
        return CHAT_FORMATS[name]
    except KeyError:
        raise ConfigError(f"tokenizer.chat_format: unknown chat format {name!r}{did_you_mean(str(name), CHAT_FORMATS)}; "
                          f"choose one of {', '.join(CHAT_FORMATS)} (null: guessed from the checkpoint)") from None


def guess_chat_format(chat_template: str | None, token_strings: Sequence[str] = ()) -> str | None:
    """Name of the chat format an HF ``chat_template`` follows (markers it contains), else a
    guess from the tokenizer's special tokens; None when nothing matches."""
    template = chat_template or ""
    tokens = set(token_strings)
    if "<|start_header_id|>" in template:
        return "llama3.1" if "Cutting Knowledge Date" in template else "llama3"
    if "<|im_start|>" in template:
        if "<think>" in template and "last_query_index" in template:
            return "qwen3"
        if QWEN2_5_SYSTEM in template:
            return "qwen2.5"
        if f"system\\n{QWEN2_SYSTEM}" in template or f"system\n{QWEN2_SYSTEM}" in template:
            return "qwen2"
        return "chatml"
    if "<start_of_turn>" in template:
        return "gemma"
    if "[INST]" in template:
        if "<<SYS>>" in template:
            return "llama2"
        return "mistral_v3" if "[TOOL_CALLS]" in template else "mistral"
    if template:
        log.warning("chat_template matches none of the known formats; guessing from tokens")
    for marker, name in (("<|start_header_id|>", "llama3"), ("<|im_start|>", "chatml"),
                         ("<start_of_turn>", "gemma"), ("[INST]", "mistral")):
        if marker in tokens:
            return name
    return None
