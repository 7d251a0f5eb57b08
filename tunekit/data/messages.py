"""Message transforms: one row of a dataset (a dict) -> OpenAI-style messages.

Every transform is a tiny callable ``transform(row) -> list[Message]`` (or ``str`` for plain text,
or the prompt and completions of a preference row). ``column_map`` maps the names a transform
expects to the names used in your files, e.g. ``{"output": "response"}``. Transforms validate what
they produce and raise :class:`~tunekit.data.errors.DataError` naming the offending field; the
dataset adds the file and line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tunekit.data.errors import DataError

Message = dict[str, Any]

ROLES = ("system", "user", "assistant", "tool")

# The wording of the original Stanford Alpaca release, so that models trained on Alpaca-style data
# see the prompt they were trained on.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "observation": "tool",
}


def get_field(row: Mapping[str, Any], name: str, column_map: Mapping[str, str] | None,
              *, required: bool = True) -> Any:
    """``row[column_map.get(name, name)]`` with a DataError naming the column when it is missing."""
    column = (column_map or {}).get(name, name)
    if column in row and row[column] is not None:
        return row[column]
    if not required:
        return None
    available = ", ".join(sorted(map(str, row))) or "none"
    hint = f" (mapped from {name!r} by column_map)" if column != name else (
        f"; map it with column_map: {{{name}: <your column>}}")
    raise DataError(f"missing column{hint}; the row has: {available}", field=column)


def _text(value: Any, field: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", field=field)
    if not allow_empty and not value.strip():
        raise DataError("empty text", field=field)
    return value


# Which roles may follow a message of each role (None: the first message).
_NEXT_ROLES = {
    None: ("system", "user"),
    "system": ("user",),
    "user": ("assistant",),
    "assistant": ("user", "tool"),
    "tool": ("tool", "assistant"),
}


def validate_messages(messages: list[Message], field: str = "messages") -> list[Message]:
    """Check roles, contents and turn order of a conversation; return it unchanged.

    Accepted order: an optional leading system message, then user and assistant alternating from a
    user turn; tool messages follow an assistant turn (or other tool messages). The conversation
    must contain an assistant turn (otherwise nothing would be trained on).
    """
    if not isinstance(messages, list) or not messages:
        raise DataError("expected a non-empty list of messages", field=field)
    previous = None
    for i, msg in enumerate(messages):
        where = f"{field}[{i}]"
        role = msg.get("role")
        if role not in ROLES:
            raise DataError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}",
                            field=f"{where}.role")
        has_tool_calls = bool(msg.get("tool_calls"))
        _text(msg.get("content"), f"{where}.content",
              allow_empty=role == "assistant" and has_tool_calls)
        allowed = _NEXT_ROLES[previous]
        if role not in allowed:
            after = f"after a {previous!r} message" if previous else "as the first message"
            raise DataError(f"role {role!r} cannot come {after}; expected {' or '.join(allowed)}",
                            field=f"{where}.role")
        previous = role
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("conversation has no assistant message, nothing to train on", field=field)
    return messages


class AlpacaToMessages:
    """Alpaca rows (``instruction``, optional ``input``, ``output``) -> [user prompt, assistant].

    The user turn is the standard Alpaca prompt; only the response is trained on unless the
    dataset is built with ``train_on_input=True``.
    """

    def __init__(self, column_map: Mapping[str, str] | None = None):
        self.column_map = dict(column_map or {})

    def fields(self, row: Mapping[str, Any]) -> tuple[str, str, str]:
        """(instruction, input or "", output), validated."""
        cm = self.column_map
        instruction = _text(get_field(row, "instruction", cm), cm.get("instruction", "instruction"))
        inp = get_field(row, "input", cm, required=False)
        inp = "" if inp is None else _text(inp, cm.get("input", "input"), allow_empty=True)
        output = _text(get_field(row, "output", cm), cm.get("output", "output"))
        return instruction, inp, output

    def __call__(self, row: Mapping[str, Any]) -> list[Message]:
        instruction, inp, output = self.fields(row)
        if inp.strip():
            prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=inp)
        else:
            prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]

    def raw_messages(self, row: Mapping[str, Any]) -> list[Message]:
        """The row's own text without the shared prompt wording (for duplicate/contamination checks)."""
        instruction, inp, output = self.fields(row)
        user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


class InputOutputToMessages:
    """``input`` / ``output`` pairs -> [optional system, user, assistant]."""

    def __init__(self, column_map: Mapping[str, str] | None = None, system_prompt: str | None = None):
        self.column_map = dict(column_map or {})
        self.system_prompt = system_prompt

    def __call__(self, row: Mapping[str, Any]) -> list[Message]:
        cm = self.column_map
        messages = [] if not self.system_prompt else [{"role": "system", "content": self.system_prompt}]
        messages.append({"role": "user", "content": _text(get_field(row, "input", cm), cm.get("input", "input"))})
        messages.append({"role": "assistant",
                         "content": _text(get_field(row, "output", cm), cm.get("output", "output"))})
        return messages


class ShareGPTToMessages:
    """ShareGPT rows: ``conversations`` = [{"from": "human"|"gpt"|"system", "value": str}, ...]."""

    def __init__(self, column_map: Mapping[str, str] | None = None):
        self.column_map = dict(column_map or {})

    def __call__(self, row: Mapping[str, Any]) -> list[Message]:
        column = self.column_map.get("conversations", "conversations")
        turns = get_field(row, "conversations", self.column_map)
        if not isinstance(turns, list):
            raise DataError(f"expected a list of turns, got {type(turns).__name__}", field=column)
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
                raise DataError('expected {"from": ..., "value": ...}', field=f"{column}[{i}]")
            role = SHAREGPT_ROLES.get(turn["from"])
            if role is None:
                raise DataError(f"unknown role {turn['from']!r}; expected one of "
                                f"{', '.join(SHAREGPT_ROLES)}", field=f"{column}[{i}].from")
            messages.append({"role": role, "content": turn["value"]})
        try:
            return validate_messages(messages, column)
        except DataError as e:  # name the ShareGPT keys, not the OpenAI ones
            field = (e.field or "").replace(".role", ".from").replace(".content", ".value")
            raise DataError(e.reason, field=field) from None


def _openai_content(content: Any, field: str) -> Any:
    """Flatten ``[{"type": "text", "text": ...}, ...]`` content into one string."""
    if not isinstance(content, list):
        return content
    parts = []
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise DataError(f"only text content parts are supported, got {kind!r}",
                            field=f"{field}[{j}]")
        parts.append(part.get("text", ""))
    return "".join(parts)


def _convert_openai(value: Any, field: str) -> list[Message]:
    if not isinstance(value, list):
        raise DataError(f"expected a list of messages, got {type(value).__name__}", field=field)
    messages = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping):
            raise DataError(f"expected a message object, got {type(msg).__name__}", field=f"{field}[{i}]")
        out = {"role": msg.get("role"),
               "content": _openai_content(msg.get("content") or "", f"{field}[{i}].content")}
        for key in ("tool_calls", "tool_call_id", "name"):  # chat formats may render these
            if msg.get(key):
                out[key] = msg[key]
        messages.append(out)
    return messages


class OpenAIToMessages:
    """OpenAI-style rows: ``messages`` = [{"role": ..., "content": ...}, ...] (validated)."""

    def __init__(self, column_map: Mapping[str, str] | None = None):
        self.column_map = dict(column_map or {})

    def __call__(self, row: Mapping[str, Any]) -> list[Message]:
        field = self.column_map.get("messages", "messages")
        return validate_messages(_convert_openai(get_field(row, "messages", self.column_map), field),
                                 field)


def _prompt_messages(value: Any, field: str) -> list[Message]:
    """A prompt column: a string (the user turn) or a list of messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value, field)}]
    return _convert_openai(value, field)


def _completion_messages(value: Any, field: str) -> list[Message]:
    """A completion column: a string (the assistant turn) or a list of messages starting with an
    assistant turn."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": _text(value, field)}]
    messages = _convert_openai(value, field)
    if not messages:
        raise DataError("expected a non-empty list of messages", field=field)
    if messages[0].get("role") != "assistant":
        raise DataError(f"a completion must start with an assistant message, got role "
                        f"{messages[0].get('role')!r}", field=f"{field}[0].role")
    return messages


def _validate_joined(prompt: list[Message], completion: list[Message], prompt_field: str,
                     prompt_is_text: bool, completion_field: str, completion_is_text: bool) -> None:
    """:func:`validate_messages` of ``prompt + completion``, with errors naming the column (and
    index inside it) the offending message came from."""
    try:
        validate_messages(prompt + completion, "#")
    except DataError as e:
        index, _, rest = (e.field or "#").partition("]")
        if not index.startswith("#["):
            raise DataError(e.reason, field=completion_field) from None
        i = int(index[2:])
        if i < len(prompt):
            field = prompt_field if prompt_is_text else f"{prompt_field}[{i}]{rest}"
        else:
            field = completion_field if completion_is_text else f"{completion_field}[{i - len(prompt)}]{rest}"
        raise DataError(e.reason, field=field) from None


class ChosenRejectedToMessages:
    """Preference rows in the formats TRL accepts -> ``(chosen_messages, rejected_messages)``, each
    the whole conversation (prompt + completion); :meth:`split` gives the prompt and the two
    completions separately.

    - standard: ``prompt``, ``chosen``, ``rejected`` strings (the prompt becomes the user turn, the
      completions assistant turns);
    - conversational, explicit prompt: ``prompt`` (string or message list) and ``chosen`` /
      ``rejected`` message lists that start with an assistant turn;
    - implicit prompt: ``chosen`` / ``rejected`` are whole conversations sharing their first
      messages; the prompt is the longest common prefix of messages, the completions are the rest
      (which must start with an assistant turn). A ``prompt`` column next to whole conversations is
      ignored, as TRL does (some datasets carry the question in both).
    """

    def __init__(self, column_map: Mapping[str, str] | None = None):
        self.column_map = dict(column_map or {})

    def split(self, row: Mapping[str, Any]) -> tuple[list[Message], list[Message], list[Message]]:
        """``(prompt, chosen completion, rejected completion)`` messages of ``row``, validated."""
        cm = self.column_map
        names = {k: cm.get(k, k) for k in ("prompt", "chosen", "rejected")}
        chosen = get_field(row, "chosen", cm)
        rejected = get_field(row, "rejected", cm)
        if isinstance(chosen, list) != isinstance(rejected, list):
            kinds = {True: "a message list", False: type(chosen).__name__}
            raise DataError(f"{names['chosen']!r} is {kinds[isinstance(chosen, list)]} but "
                            f"{names['rejected']!r} is not; give both as strings or both as message "
                            "lists", field=names["rejected"])
        if isinstance(chosen, list):
            chosen_m = _convert_openai(chosen, names["chosen"])
            rejected_m = _convert_openai(rejected, names["rejected"])
            if chosen_m and rejected_m and "assistant" not in (chosen_m[0]["role"], rejected_m[0]["role"]):
                return self._implicit(chosen_m, rejected_m, names)
        prompt = get_field(row, "prompt", cm)  # raises: completions alone need a prompt
        prompt_m = _prompt_messages(prompt, names["prompt"])
        out = [prompt_m]
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            completion = _completion_messages(value, names[name])
            _validate_joined(prompt_m, completion, names["prompt"], isinstance(prompt, str),
                             names[name], isinstance(value, str))
            out.append(completion)
        return out[0], out[1], out[2]

    @staticmethod
    def _implicit(chosen: list[Message], rejected: list[Message], names: dict[str, str]
                  ) -> tuple[list[Message], list[Message], list[Message]]:
        c, r = names["chosen"], names["rejected"]
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        if k == len(chosen) == len(rejected):
            raise DataError(f"{c!r} and {r!r} are the same conversation: nothing to prefer", field=c)
        if k == len(chosen) or k == len(rejected):
            short, long = (c, r) if k == len(chosen) else (r, c)
            raise DataError(f"{short!r} is the start of {long!r}, so its completion would be empty",
                            field=short)
        for name, conv in ((c, chosen), (r, rejected)):
            if conv[k]["role"] != "assistant":
                raise DataError(f"{c!r} and {r!r} first differ at message {k}, a {conv[k]['role']!r} "
                                "message; with an implicit prompt they must share every message "
                                "before their final assistant turn(s)", field=f"{name}[{k}].role")
            validate_messages(conv, name)
        return chosen[:k], chosen[k:], rejected[k:]

    def __call__(self, row: Mapping[str, Any]) -> tuple[list[Message], list[Message]]:
        prompt, chosen, rejected = self.split(row)
        return prompt + chosen, prompt + rejected


def _label(value: Any, field: str) -> bool:
    if isinstance(value, str):  # CSV cells
        text = value.strip().lower()
        if text in ("true", "1"):
            return True
        if text in ("false", "0"):
            return False
    elif isinstance(value, bool) or value in (0, 1):  # also numpy bools and 0/1 integers
        return bool(value)
    raise DataError(f"expected a boolean (true = desirable), got {value!r}", field=field)


class UnpairedPreferenceToMessages:
    """KTO's unpaired rows: ``prompt`` (string or messages), ``completion`` (string or messages
    starting with an assistant turn), ``label`` (true = desirable) -> ``(prompt, completion,
    desirable)``."""

    def __init__(self, column_map: Mapping[str, str] | None = None):
        self.column_map = dict(column_map or {})

    def __call__(self, row: Mapping[str, Any]) -> tuple[list[Message], list[Message], bool]:
        cm = self.column_map
        names = {k: cm.get(k, k) for k in ("prompt", "completion", "label")}
        prompt, completion = get_field(row, "prompt", cm), get_field(row, "completion", cm)
        desirable = _label(get_field(row, "label", cm), names["label"])
        prompt_m = _prompt_messages(prompt, names["prompt"])
        completion_m = _completion_messages(completion, names["completion"])
        _validate_joined(prompt_m, completion_m, names["prompt"], isinstance(prompt, str),
                         names["completion"], isinstance(completion, str))
        return prompt_m, completion_m, desirable


class TextToDocument:
    """Plain text rows (``text``) -> the document string, for continued pretraining."""

    def __init__(self, column_map: Mapping[str, str] | None = None):
        self.column_map = dict(column_map or {})

    def __call__(self, row: Mapping[str, Any]) -> str:
        return _text(get_field(row, "text", self.column_map), self.column_map.get("text", "text"))


TRANSFORMS = {
    "alpaca": AlpacaToMessages,
    "input_output": InputOutputToMessages,
    "sharegpt": ShareGPTToMessages,
    "openai": OpenAIToMessages,
    "preference": ChosenRejectedToMessages,
    "kto": UnpairedPreferenceToMessages,
    "text": TextToDocument,
}


def detect_format(row: Mapping[str, Any], column_map: Mapping[str, str] | None = None) -> str:
    """Guess the row format from its keys (after ``column_map``): a key of :data:`TRANSFORMS`."""
    keys = {k for k in row}
    inverse = {v: k for k, v in (column_map or {}).items()}
    keys |= {inverse[k] for k in row if k in inverse}
    for fmt, needed in (("preference", {"chosen", "rejected"}), ("kto", {"prompt", "completion", "label"}),
                        ("sharegpt", {"conversations"}),
                        ("openai", {"messages"}), ("alpaca", {"instruction", "output"}),
                        ("input_output", {"input", "output"}), ("text", {"text"})):
        if needed <= keys:
            return fmt
    raise DataError(f"cannot tell the data format from the columns {sorted(map(str, row))}; "
                    f"pass one of {', '.join(TRANSFORMS)} (and a column_map if names differ)")
