"""The one chat formatter every backend uses: messages -> prompt text -> token ids.

Rendering mirrors transformers' `apply_chat_template(..., tokenize=False)` (the Jinja sandbox,
filters, globals and template variables of `transformers.utils.chat_template_utils`) without
importing transformers, so startup stays fast. Encoding follows upstream MiniMind: render the
text, then tokenize it as ordinary text (special tokens in it map to their ids).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .notes import note_once
from .tokenizer import Tokenizer

__all__ = ["FALLBACK_TEMPLATE", "ROLES", "ChatFormatter", "prompt_messages", "render_fallback",
           "render_template",
           "trim_history", "validate_messages"]

ROLES = ("system", "user", "assistant", "tool")
Message = dict[str, Any]


# -- validation ----------------------------------------------------------------------------


def _content_text(content: Any, index: int, role: str) -> str:
    """A message's content as a string; OpenAI-style text parts are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            if kind != "text":
                raise ValueError(f"messages[{index}] ({role}): content part {j} has type {kind!r}; "
                                 "only text parts ({'type': 'text', 'text': ...}) are supported")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"messages[{index}] ({role}): content part {j} needs a string "
                                 "'text'")
            texts.append(part["text"])
        return "".join(texts)
    raise ValueError(f"messages[{index}] ({role}): content must be a string or a list of text "
                     f"parts, got {type(content).__name__}")


def validate_messages(messages: Any) -> list[Message]:
    """Check chat messages and return normalised copies (list content joined into a string).

    Raises:
        ValueError: not a non-empty list of dicts, an unknown role, or unusable content.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', "
                             f"got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            what = "has no 'role'" if role is None else f"has unknown role {role!r}"
            raise ValueError(f"messages[{i}] {what}; expected one of {', '.join(ROLES)}")
        tool_calls = msg.get("tool_calls")
        if tool_calls is not None and (
                not isinstance(tool_calls, list)
                or not all(isinstance(c, Mapping) for c in tool_calls)):
            raise ValueError(f"messages[{i}] ({role}): tool_calls must be a list of dicts")
        content = msg.get("content")
        if content is None:
            if role != "assistant" or not tool_calls:
                raise ValueError(f"messages[{i}] ({role}) has no content; only an assistant "
                                 "message with tool_calls may leave it out")
            out.append(dict(msg))
        else:
            out.append({**msg, "content": _content_text(content, i, role)})
    return out


def prompt_messages(prompt: str, system: str | None = None) -> list[Message]:
    """Messages for a single prompt, with an optional system message first."""
    head = [{"role": "system", "content": system}] if system is not None else []
    return [*head, {"role": "user", "content": prompt}]


# -- history -------------------------------------------------------------------------------


def _split_turns(messages: Sequence[Message]) -> tuple[list[Message], list[list[Message]],
                                                         list[Message]]:
    """(leading system message, earlier turns, current turn).

    A turn is a user message and the assistant/tool messages after it. The current turn starts
    at the last user message (for a conversation ending in a user message: just that message),
    so an agent loop ending in tool results keeps the question that started it.
    """
    msgs = list(messages)
    head = msgs[:1] if msgs and msgs[0].get("role") == "system" else []
    rest = msgs[len(head):]
    users = [i for i, m in enumerate(rest) if m.get("role") == "user"]
    start = users[-1] if users else max(len(rest) - 1, 0)
    earlier, current = rest[:start], rest[start:]
    turns: list[list[Message]] = []
    for m in earlier:
        if not turns or m.get("role") == "user":
            turns.append([])
        turns[-1].append(m)
    return head, turns, current


def _join(head: list[Message], turns: list[list[Message]], current: list[Message]
          ) -> list[Message]:
    return [*head, *(m for turn in turns for m in turn), *current]


def trim_history(messages: Sequence[Message], max_history: int | None) -> list[Message]:
    """Keep the last `max_history` turns before the final (current) turn.

    A leading system message is always kept; `max_history=0` keeps only it and the final turn
    (the final message, when the conversation ends with a user message); None keeps everything.
    """
    if max_history is None:
        return list(messages)
    if isinstance(max_history, bool) or not isinstance(max_history, int) or max_history < 0:
        raise ValueError(f"max_history must be an integer >= 0 or None, got {max_history!r}")
    head, turns, current = _split_turns(messages)
    return _join(head, turns[len(turns) - max_history:] if max_history else [], current)


# -- rendering -----------------------------------------------------------------------------


def render_fallback(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """Plain-text prompt for a tokenizer without a chat template.

    `[{system: "S"}, {user: "U"}]` -> `"System: S\\n\\nUser: U\\n\\nAssistant: "`.
    """
    blocks = [f"{m['role'].capitalize()}: {m.get('content') or ''}" for m in messages]
    if add_generation_prompt:
        blocks.append("Assistant: ")
    return "\n\n".join(blocks)


# `render_fallback` as a Jinja chat template, for folders other tools read (converters.to_mlx
# writes it where the tokenizer has none, so stock mlx_lm renders the same prompt).
FALLBACK_TEMPLATE = (
    "{%- if tools %}{{ raise_exception('the plain System:/User:/Assistant: prompt format "
    "cannot describe tools') }}{% endif %}"
    "{%- for message in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] or '' }}{% endfor %}"
    "{%- if add_generation_prompt %}{% if messages %}{{ '\\n\\n' }}{% endif %}"
    "{{ 'Assistant: ' }}{% endif %}"
)


class _GenerationTag(Extension):
    """`{% generation %}…{% endgeneration %}` (transformers' assistant-mask tag): renders body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """`dict(...)` for templates, without attribute access to the real type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that rejects underscore-prefixed names, as transformers' does."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja's
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes, got {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters and non-ASCII; chat templates expect neither.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(template)


def _plain(value: Any) -> Any:
    """Rebuild `value` from plain JSON-like types (transformers' `_plain_template_data`)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(message: Message) -> Message:
    # Templates read `reasoning_content` (gpt-oss reads `thinking`); accept any of the names.
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def render_template(template: str, messages: Sequence[Message], *,
                    add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    documents: list[dict] | None = None,
                    special_tokens: Mapping[str, str] | None = None,
                    **template_kwargs: Any) -> str:
    """Render a Jinja chat template exactly as transformers' `apply_chat_template` does.

    The template sees `messages` (keys whose value is None dropped), `tools`, `documents`,
    `add_generation_prompt`, the tokenizer's named special tokens (`bos_token`, `eos_token`, ...)
    and `template_kwargs` (e.g. `enable_thinking`), which override special tokens of the same
    name.
    """
    chat = [_alias_reasoning(_plain({k: v for k, v in m.items() if v is not None}))
            for m in messages]
    context = _plain({**(special_tokens or {}), **template_kwargs})
    context.pop("messages", None)
    return _compile(template).render(messages=chat, tools=_plain(tools),
                                     documents=_plain(documents),
                                     add_generation_prompt=add_generation_prompt, **context)


def _fit_turns(keeping: Callable[[int], list[int]], n: int, limit: int, why: str) -> list[int]:
    """The prompt with the most of the newest earlier turns that fits in ``limit`` tokens,
    knowing that all ``n`` do not fit.

    Dropping a turn never lengthens the prompt, so "k newest turns fit" flips once as k grows:
    gallop up from k = 0 (1, 2, 4, ...), then bisect. Each try renders only the turns it keeps,
    so a 4,000-message history costs a few renders of the part that fits, not 4,000 renders of
    everything (which was quadratic).
    """
    best = keeping(0)
    if len(best) > limit:
        raise ValueError(
            f"prompt is {len(best)} tokens, longer than the context window of {limit} "
            f"tokens ({why}), even with all earlier turns dropped; shorten the input "
            "(or the system prompt), keep fewer history turns, or reserve fewer tokens "
            "for the reply")
    good, bad = 0, n  # keeping `good` turns fits, keeping `bad` does not
    step = 1
    while good + step < bad:
        ids = keeping(good + step)
        if len(ids) > limit:
            bad = good + step
            break
        good, best = good + step, ids
        step *= 2
    while bad - good > 1:
        mid = (good + bad) // 2
        ids = keeping(mid)
        if len(ids) <= limit:
            good, best = mid, ids
        else:
            bad = mid
    return best


def _check_dict_list(value: Any, name: str) -> None:
    if value is not None and (not isinstance(value, (list, tuple))
                              or not all(isinstance(v, Mapping) for v in value)):
        raise ValueError(f"{name} must be a list of dicts (JSON schemas), got {value!r:.80}")


class ChatFormatter:
    """Turns chat messages into prompt text and token ids for one tokenizer.

    Args:
        tokenizer: supplies the chat template (none: the plain "User: ..." fallback) and ids.
        context_window: the model's maximum sequence length; `encode` drops the oldest turns
            so the prompt plus `reserve_tokens` fits in it.
        default_system: a system message put first when the messages have none.
    """

    def __init__(self, tokenizer: Tokenizer, context_window: int | None = None,
                 default_system: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.context_window = context_window
        self.default_system = default_system

    def _prepare(self, messages: Any) -> list[Message]:
        msgs = validate_messages(messages)
        if self.default_system is not None and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": self.default_system})
        return msgs

    def _render(self, msgs: list[Message], add_generation_prompt: bool,
                tools: list[dict] | None, template_kwargs: dict[str, Any]) -> str:
        _check_dict_list(tools, "tools")
        documents = template_kwargs.pop("documents", None)
        _check_dict_list(documents, "documents")
        template = self.tokenizer.get_chat_template(tools)
        if template is None:
            if tools:
                raise ValueError(f"the tokenizer in {self.tokenizer.path} has no chat template, "
                                 "so it cannot describe tools to the model")
            note_once(f"the tokenizer in {self.tokenizer.path} has no chat template: prompts use "
                      "the plain 'System: ...\\n\\nUser: ...\\n\\nAssistant: ' format, which the "
                      "model may not know (give a tokenizer with a chat template, or send raw "
                      "prompts)", stacklevel=5)
            return render_fallback(msgs, add_generation_prompt)
        if not template.strip():
            raise ValueError(f"the chat template of {self.tokenizer.path} is empty; give a "
                             "template, or remove it to use the plain 'User: ...' prompt")
        try:
            return render_template(template, msgs, add_generation_prompt=add_generation_prompt,
                                   tools=tools, documents=documents,
                                   special_tokens=self.tokenizer.special_tokens_map,
                                   **template_kwargs)
        except (jinja2.TemplateError, TypeError) as e:  # TypeError: e.g. tojson of Undefined
            raise ValueError(f"chat template of {self.tokenizer.path} failed: {e}") from e

    def render(self, messages: Any, *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None, max_history: int | None = None,
               **template_kwargs: Any) -> str:
        """Prompt text for `messages` (as transformers' `apply_chat_template(tokenize=False)`).

        `template_kwargs` reach the template (e.g. `enable_thinking=False` for MiniMind2,
        `open_thinking=True` for MiniMind-3). Raises ValueError for malformed messages.
        """
        msgs = trim_history(self._prepare(messages), max_history)
        return self._render(msgs, add_generation_prompt, tools, dict(template_kwargs))

    def encode(self, messages: Any, *, max_history: int | None = None,
               max_prompt_tokens: int | None = None, reserve_tokens: int = 0,
               add_generation_prompt: bool = True, tools: list[dict] | None = None,
               **template_kwargs: Any) -> list[int]:
        """Prompt token ids: `render(...)` then `tokenizer.encode(text)`, as upstream does.

        History is cut to `max_history` turns, then the oldest turns are dropped (never the
        system message or the final turn) until the prompt fits in `max_prompt_tokens`, or else
        `context_window - reserve_tokens` (no limit when neither is set).

        Raises:
            ValueError: malformed messages, or the prompt cannot be made to fit.
        """
        head, turns, current = _split_turns(trim_history(self._prepare(messages), max_history))
        if max_prompt_tokens is not None:
            limit: int | None = max_prompt_tokens
            why = "max_prompt_tokens"
        elif self.context_window is not None:
            limit = self.context_window - reserve_tokens
            why = f"context_window {self.context_window} - {reserve_tokens} reserved tokens"
        else:
            limit, why = None, ""
        if limit is not None and limit <= 0:
            raise ValueError(f"no room for a prompt: the limit is {limit} tokens ({why})")

        def keeping(k: int) -> list[int]:  # the prompt with the newest k earlier turns
            kept = turns[len(turns) - k:] if k else []
            ids = self.tokenizer.encode(self._render(_join(head, kept, current),
                                                     add_generation_prompt, tools,
                                                     dict(template_kwargs)))
            if not ids:  # nothing to prefill: the model could not start
                raise ValueError(f"the chat template of {self.tokenizer.path} renders these "
                                 "messages as an empty prompt; check the template")
            return ids

        ids = keeping(len(turns))
        if limit is None or len(ids) <= limit:
            return ids
        return _fit_turns(keeping, len(turns), limit, why)
