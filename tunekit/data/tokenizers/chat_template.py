"""The checkpoint's own Jinja ``chat_template`` as a chat format, and ``chat_format: auto``.

Rendering follows transformers' ``apply_chat_template`` (5.x): a sandboxed, immutable jinja2
environment with ``trim_blocks``/``lstrip_blocks`` and the ``loopcontrols`` extension;
``raise_exception``, ``strftime_now`` and a ``tojson`` filter that keeps non-ASCII characters; the
template sees ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the named special
tokens (``bos_token``, ``eos_token``, ``pad_token``, ...) and any extra keyword
(``enable_thinking``, ``date_string``, ...). Messages are passed as HF passes them: keys whose
value is None dropped, reasoning under ``reasoning_content`` and ``thinking`` whichever name it
came under.

Which characters are trained (the loss mask; tokens are then masked by the character they start
at, as for the Python formats):

- ``{% generation %} ... {% endgeneration %}`` blocks where the template has them (what
  ``return_assistant_tokens_mask`` reports).
- else growing prefixes: assistant message ``i`` starts where ``render(messages[:i],
  add_generation_prompt=True)`` ends and runs to the end of ``render(messages[:i + 1])``; the
  whitespace a template writes after the turn's closing added token (ChatML's newline after
  ``<|im_end|>``) is context, not trained, since generation stops at that token. Templates that
  render an earlier turn differently once later turns follow (Qwen3 drops the ``<think>`` block of
  earlier turns) are handled when only the generation prompt and the assistant turn itself change:
  the turn then starts where the full render leaves the generation prompt and ends at its closing
  added token. Anything else (Mistral v3 moves the system message and tools to the last user turn)
  raises a ValueError naming the message: use a Python format or a template with generation
  markers.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tunekit.checkpoint.errors import CheckpointError
from tunekit.config.errors import ConfigError, did_you_mean
from tunekit.data.tokenizers.chat_formats import (
    CHAT_FORMATS,
    ChatFormat,
    Message,
    Part,
    guess_chat_format,
)

log = logging.getLogger(__name__)

# Named special tokens a template sees as variables (transformers' SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")

# A generation block renders its body between these two Unicode noncharacters (reserved for a
# program's internal use, so never in real text); they are cut out afterwards and their positions
# become the trained spans. Unlike transformers' offset tracker, this also works inside macros.
_GEN_START, _GEN_END = "\ufdd0", "\ufdd1"
_GENERATION_RE = re.compile(r"\{%-?\s*generation\s*-?%\}")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: the body, wrapped in the two sentinels."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_wrap"), [], [], body).set_lineno(lineno)

    def _wrap(self, caller: Any) -> str:
        return _GEN_START + caller() + _GEN_END


class _Namespace(jinja2.utils.Namespace):
    """Jinja's ``namespace()`` refusing underscore names (no way to reach CPython internals)."""

    def __init__(*args: Any, **kwargs: Any):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot set underscore attributes on a namespace: {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes <, >, & and ' - templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str, where: str = "chat_template") -> jinja2.Template:
    """``source`` compiled in the environment transformers renders chat templates in; a syntax
    error is a CheckpointError naming ``where`` and the line."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       namespace=_Namespace, dict=lambda *a, **k: dict(*a, **k))
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"{where}: line {e.lineno}: invalid Jinja chat template: "
                              f"{e.message}") from None


def load_chat_template(folder: Path, config: Mapping[str, Any]) -> tuple[str, str] | None:
    """(template, where it came from) of an HF checkpoint folder, or None.

    Looked up as transformers 5 does: ``chat_template.jinja`` first, then ``chat_template`` in
    tokenizer_config.json (a string, or a list of ``{"name", "template"}`` from which "default" is
    taken), then the processor-style ``chat_template.json`` (``{"chat_template": ...}``).
    """
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str):
        return template, str(folder / "tokenizer_config.json") + ": chat_template"
    json_file = folder / "chat_template.json"
    if json_file.is_file():
        try:
            template = json.loads(json_file.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            raise CheckpointError(f"{json_file}: expected a JSON object with a 'chat_template' "
                                  "string") from None
        if isinstance(template, str):
            return template, f"{json_file}: chat_template"
    return None


def _template_messages(messages: Sequence[Message]) -> list[dict]:
    """Messages the way transformers hands them to a template (see the module docstring)."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"messages[{i}]: expected a dict, got {type(m).__name__}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in _REASONING_FIELDS if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


class TemplateChatFormat(ChatFormat):
    """A chat format that renders the checkpoint's Jinja template (module docstring).

    ``special_tokens``: the named special tokens (``bos_token`` ...) the template sees;
    ``template_kwargs``: extra variables (``enable_thinking``, ``date_string``, ...);
    ``added_tokens``: the tokenizer's added-token strings (to find where a turn's closing token
    is); ``stop_strings``: end-of-turn tokens that stop generation.
    """

    def __init__(self, template: str, *, special_tokens: Mapping[str, str] | None = None,
                 template_kwargs: Mapping[str, Any] | None = None,
                 added_tokens: Iterable[str] = (), stop_strings: Sequence[str] = (),
                 where: str = "chat_template"):
        super().__init__("template", self._render_parts, tuple(stop_strings),
                         supports_tools=True)
        object.__setattr__(self, "_compiled", compile_chat_template(template, where))
        object.__setattr__(self, "where", where)
        object.__setattr__(self, "source", template)
        object.__setattr__(self, "has_generation", bool(_GENERATION_RE.search(template)))
        object.__setattr__(self, "variables",
                           dict(special_tokens or {}) | dict(template_kwargs or {}))
        object.__setattr__(self, "_added", tuple(sorted(set(added_tokens), key=len,
                                                        reverse=True)))
        names = jinja2.meta.find_undeclared_variables(self._compiled.environment.parse(template))
        object.__setattr__(self, "uses_tools", "tools" in names)
        object.__setattr__(self, "_special_tokens", dict(special_tokens or {}))
        object.__setattr__(self, "_template_kwargs", dict(template_kwargs or {}))

    def __reduce__(self):
        # Compiled templates do not pickle (spawned data-loader workers); rebuild from the text.
        return (_rebuild, (self.source, self._special_tokens, self._template_kwargs, self._added,
                           self.stop_strings, self.where))

    # -- rendering ------------------------------------------------------------------------------
    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = False,
               tools: list[dict] | None = None, bos: str = "", eos: str = "") -> list[Part]:
        """(text, trained) parts of the rendered conversation (``bos``/``eos`` are unused: the
        template writes its own special tokens)."""
        return self._render_parts(_template_messages(messages), add_generation_prompt, tools)

    def render_text(self, messages: Sequence[Message], add_generation_prompt: bool = False,
                    tools: list[dict] | None = None) -> str:
        """The rendered conversation, exactly ``apply_chat_template(..., tokenize=False)``."""
        text = self._render(_template_messages(messages), add_generation_prompt, tools)
        return text.replace(_GEN_START, "").replace(_GEN_END, "")

    def _render(self, messages: list[dict], add_generation_prompt: bool,
                tools: list[dict] | None) -> str:
        if not messages:
            raise ValueError(f"{self.where}: cannot render an empty conversation")
        try:
            return self._compiled.render(**self.variables, messages=messages, tools=tools,
                                         documents=None,
                                         add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:
            # raise_exception() in the template, or a sandbox violation: the conversation is
            # something this template does not accept.
            raise ValueError(f"{self.where} rejects this conversation: {e}") from None

    def _render_parts(self, messages: list[dict], add_generation_prompt: bool,
                      tools: list[dict] | None) -> list[Part]:
        if self.has_generation:
            text, spans = self._generation_spans(messages, add_generation_prompt, tools)
        else:
            text, spans = self._prefix_spans(messages, add_generation_prompt, tools)
        parts: list[Part] = []
        pos = 0
        for start, end in spans:
            parts += [(text[pos:start], False), (text[start:end], True)]
            pos = end
        return parts + [(text[pos:], False)]

    def _generation_spans(self, messages, add_generation_prompt, tools):
        marked = self._render(messages, add_generation_prompt, tools)
        pieces = re.split(f"([{_GEN_START}{_GEN_END}])", marked)
        text: list[str] = []
        spans: list[tuple[int, int]] = []
        depth = pos = start = 0
        for piece in pieces:
            if piece == _GEN_START:
                depth += 1
                start = pos if depth == 1 else start
            elif piece == _GEN_END:
                if depth == 0:
                    raise ValueError("the conversation contains U+FDD1, a character reserved "
                                     "to mark the template's generation blocks")
                depth -= 1
                if depth == 0 and pos > start:
                    spans.append((start, pos))
            else:
                text.append(piece)
                pos += len(piece)
        if depth:
            raise ValueError("the conversation contains U+FDD0, a character reserved to mark "
                             "the template's generation blocks")
        return "".join(text), spans

    def _prefix_spans(self, messages, add_generation_prompt, tools):
        full = self._render(messages, add_generation_prompt, tools)
        spans: list[tuple[int, int]] = []
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            if i == 0:
                raise ValueError("messages[0] is an assistant message: the chat template's mask "
                                 "needs the text before each assistant turn")
            before = self._render(messages[:i], True, tools)
            last_turn = self._render(messages[:i + 1], False, tools)
            if not last_turn.startswith(before):
                plain = self._render(messages[:i], False, tools)
                if not last_turn.startswith(plain):
                    raise self._not_prefix(i, "the messages before it are written differently "
                                              "once it follows")
                raise ValueError(
                    f"{self.where}: assistant messages[{i}] does not continue the template's "
                    f"generation prompt {before[len(plain):]!r} (e.g. reasoning in a Qwen3 turn "
                    "with enable_thinking=false): the model would never be prompted that way; "
                    "fix the data or the template kwargs")
            start = self._turn_start(messages, i, tools, full, before)
            if spans and start < spans[-1][1]:
                raise self._not_prefix(i, "its turn starts inside the previous assistant turn")
            turn = last_turn[len(before):]
            if full.startswith(turn, start):
                end = start + len(turn)
            else:  # the template writes this turn differently when later turns follow
                closing = self._closing_token(turn.rstrip())
                found = full.find(closing, start) if closing else -1
                if found < 0:
                    raise self._not_prefix(i, "its turn is written differently when later "
                                              "turns follow, and has no closing token to find")
                end = found + len(closing)
            spans.append((start, self._trim_after_closing(full, start, end)))
        return full, spans

    def _turn_start(self, messages, i, tools, full, before) -> int:
        """Where assistant message ``i`` starts in ``full``: after ``before`` (``messages[:i]``
        and the generation prompt), or after the part of the generation prompt ``full`` also
        has (Qwen3 without thinking: earlier turns have no empty <think> block)."""
        if full.startswith(before):
            return len(before)
        plain = self._render(messages[:i], False, tools)
        common = _common_prefix(before, full)
        if common < len(plain) or not full.startswith(plain):
            raise self._not_prefix(i, "the messages before it are written differently when "
                                      "more turns follow")
        return common

    def _closing_token(self, turn: str) -> str | None:
        return next((t for t in self._added if turn.endswith(t)), None)

    def _trim_after_closing(self, text: str, start: int, end: int) -> int:
        """``end`` moved back over whitespace that follows the turn's closing added token."""
        stripped = text[start:end].rstrip()
        if len(stripped) < end - start and self._closing_token(stripped):
            return start + len(stripped)
        return end

    def _not_prefix(self, i: int, why: str) -> ValueError:
        return ValueError(
            f"{self.where}: cannot find the trained tokens of assistant messages[{i}]: {why}, "
            "so rendering growing prefixes does not locate it. Use the Python chat format of "
            "this family (tokenizer.chat_format, e.g. mistral_v3, qwen3), or a template with "
            "{% generation %} ... {% endgeneration %} around each assistant turn")


def _rebuild(source, special_tokens, template_kwargs, added, stop_strings, where):
    return TemplateChatFormat(source, special_tokens=special_tokens,
                              template_kwargs=template_kwargs, added_tokens=added,
                              stop_strings=stop_strings, where=where)


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n  # binary search on equal prefixes (str compare is C speed)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


# -- chat_format: auto ------------------------------------------------------------------------

_PROBE_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
# (name, messages, add_generation_prompt, tools). Tool-call ids have 9 characters and each
# assistant message makes one call, so every template family can render them.
_PROBES: list[tuple[str, list[Message], bool, list[dict] | None]] = [
    ("system + multi-turn", [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": " And a number?\n"},
        {"role": "assistant", "content": "Seven 7\n"}], False, None),
    ("generation prompt", [{"role": "user", "content": "Hi!"}], True, None),
    ("tools", [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call00001", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "call00001", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "It is 21 degrees."}], False, _PROBE_TOOLS),
]


def _probe_ids(fmt: ChatFormat, tok, messages: list[Message], gen: bool,
               tools: list[dict] | None) -> list[int] | None:
    """Ids of the probe as ``fmt`` renders it; None when it rejects the conversation."""
    try:
        if isinstance(fmt, TemplateChatFormat):
            text = fmt.render_text(messages, gen, tools)
        else:
            text = "".join(t for t, _ in fmt.render(
                messages, add_generation_prompt=gen, tools=tools,
                bos=tok._token_text(tok.bos_id), eos=tok._token_text(tok.eos_id)))
    except ValueError:
        return None
    return tok.encode(text, add_bos=False, add_eos=False)


def first_difference(python: ChatFormat, template: TemplateChatFormat, tok) -> str | None:
    """None when ``python`` gives the template's ids on every probe conversation the template
    renders (tools only when the template uses them), else which probe differs and where."""
    compared = 0
    for name, messages, gen, tools in _PROBES:
        if tools and not template.uses_tools:
            continue
        ours = _probe_ids(python, tok, messages, gen, tools)
        theirs = _probe_ids(template, tok, messages, gen, tools)
        if theirs is None:
            # The template cannot show this conversation (Gemma's rejects a system turn); a
            # Python format that still can (Gemma folds it into the first user turn) extends it.
            continue
        if ours is None:
            return f"on the {name} probe: the Python format rejects the conversation"
        if ours != theirs:
            k = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                     min(len(ours), len(theirs)))
            return (f"on the {name} probe: ids differ from token {k}, Python "
                    f"{tok.decode(ours[k:k + 8], skip_special_tokens=False)!r} vs template "
                    f"{tok.decode(theirs[k:k + 8], skip_special_tokens=False)!r}")
        compared += 1
    return None if compared else "no probe conversation renders with both"


def _closing_tokens(fmt: TemplateChatFormat) -> tuple[str, ...]:
    """The added token that closes an assistant turn in this template (``<|im_end|>``, ...)."""
    user = [{"role": "user", "content": "Hi!"}]
    try:
        before = fmt.render_text(user, True)
        turn = fmt.render_text(user + [{"role": "assistant", "content": "Hello."}])
    except ValueError:
        return ()
    closing = fmt._closing_token(turn[len(before):].rstrip()) if turn.startswith(before) else None
    return (closing,) if closing else ()


def choose_chat_format(requested: str | None, template: tuple[str, str] | None, tok,
                       special_tokens: Mapping[str, str],
                       template_kwargs: Mapping[str, Any] | None = None) -> ChatFormat | None:
    """The chat format ``from_hf`` sets on ``tok``.

    ``requested``: a name of ``CHAT_FORMATS`` (that Python format), ``"template"`` (the
    checkpoint's template, ``template`` = (text, where)), or ``"auto"``/None: the Python format
    the template's markers point to when it gives identical ids on the probe conversations
    (system, multi-turn, generation prompt, tools), otherwise the template. Logs the choice.
    """
    if requested not in (None, "auto", "template"):
        if requested not in CHAT_FORMATS:
            names = [*CHAT_FORMATS, "template", "auto"]
            raise ConfigError(f"tokenizer.chat_format: unknown chat format {requested!r}"
                              f"{did_you_mean(str(requested), names)}; choose one of "
                              f"{', '.join(names)}")
        if template_kwargs:
            raise ConfigError("tokenizer.chat_template_kwargs only apply to the checkpoint's "
                              f"template; chat_format is {requested!r} (use auto or template)")
        return CHAT_FORMATS[requested]
    guess = guess_chat_format(template[0] if template else None, list(tok.added_tokens))
    if template is None:
        if requested == "template":
            raise ConfigError("tokenizer.chat_format: 'template' needs a chat template, but the "
                              "checkpoint has none (no chat_template in tokenizer_config.json, "
                              "chat_template.jinja or chat_template.json)")
        if guess is not None:
            log.info("chat format: Python %r (the checkpoint has no chat template; guessed from "
                     "its special tokens)", guess)
        return CHAT_FORMATS[guess] if guess else None
    text, where = template
    python = CHAT_FORMATS.get(guess) if guess else None
    fmt = TemplateChatFormat(text, special_tokens=special_tokens, template_kwargs=template_kwargs,
                             added_tokens=tok.added_tokens, where=where,
                             stop_strings=python.stop_strings if python else ())
    closing = [t for t in _closing_tokens(fmt) if t not in fmt.stop_strings]
    object.__setattr__(fmt, "stop_strings", fmt.stop_strings + tuple(closing))
    if requested == "template":
        log.info("chat format: the checkpoint's template (%s), as configured", where)
        return fmt
    if python is None:
        log.info("chat format: the checkpoint's template (%s); no Python format matches it",
                 where)
        return fmt
    difference = first_difference(python, fmt, tok)
    if difference is None:
        log.info("chat format: Python %r (same ids as the checkpoint's template %s on the probe "
                 "conversations)", guess, where)
        return python
    log.info("chat format: the checkpoint's template (%s); the Python %r format differs %s",
             where, guess, difference)
    return fmt
