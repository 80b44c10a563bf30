"""Split a model reply into reasoning, visible content and tool calls, as it streams.

MiniMind-3 writes ``<think>…</think>`` before its answer and ``<tool_call>{json}</tool_call>``
blocks for function calls (both are plain, non-special tokens, so they arrive as text). The
OpenAI wire format wants them apart: ``reasoning_content``, ``content`` and ``tool_calls``.
One incremental parser serves both the streaming and the non-streaming server paths, so the two
always agree; a tag split across two deltas (``"<thi"`` + ``"nk>"``) is held back until it is
known to be, or not to be, a tag.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
CONTENT, THINK, TOOL = "content", "think", "tool"

__all__ = ["ReplyDelta", "ReplyParser", "ToolCall", "parse_tool_call", "prompt_opens_think",
           "split_reply"]


@dataclass
class ToolCall:
    """One function call the model asked for; ``arguments`` is a JSON string (OpenAI's shape)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


@dataclass
class ReplyDelta:
    """What a piece of reply text added to each part of the message."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __iadd__(self, other: ReplyDelta) -> ReplyDelta:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls.extend(other.tool_calls)
        return self

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)


def parse_tool_call(body: str) -> ToolCall | None:
    """``{"name": ..., "arguments": {...}}`` (the inside of a tool_call block) → ToolCall.

    Returns None when the body is not such JSON, so the caller can show it as text instead.
    """
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    args = data.get("arguments", data.get("parameters", {}))
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return ToolCall(name=data["name"], arguments=args)


def prompt_opens_think(prompt: str) -> bool:
    """Whether the prompt leaves a ``<think>`` block open, so the reply starts inside it.

    MiniMind-3's template ends the prompt with ``<think>\\n`` when ``open_thinking=True``
    (and with a closed, empty block otherwise). Only the final turn is looked at.
    """
    tail = prompt[prompt.rfind("<|im_start|>"):] if "<|im_start|>" in prompt else prompt
    return tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE)


class _Section:
    """Whitespace next to a tag is layout, not text: ``<think>\\nidea\\n</think>\\n\\nanswer``
    gives "idea" and "answer" in both paths. Leading whitespace is dropped after a tag; with
    ``hold``, trailing whitespace waits until more text shows whether a tag follows."""

    def __init__(self, *, hold: bool, strip_leading: bool) -> None:
        self.hold, self.strip_leading = hold, strip_leading
        self.pending = ""

    def emit(self, text: str) -> str:
        if self.strip_leading:
            text = text.lstrip()
            if not text:
                return ""
            self.strip_leading = False
        text = self.pending + text
        kept = text.rstrip() if self.hold else text
        self.pending = text[len(kept):]
        return kept

    def restart(self) -> None:
        """A tag was just passed: drop held whitespace and strip what comes next."""
        self.strip_leading, self.pending = True, ""

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class ReplyParser:
    """Incremental splitter: ``feed(delta)`` for each text delta, then ``finish()``.

    Args:
        in_think: the prompt left a ``<think>`` block open (see ``prompt_opens_think``).
        parse_tools: turn ``<tool_call>`` blocks into ToolCalls (only when tools were offered;
            otherwise they stay text, as in vLLM).
    """

    def __init__(self, *, in_think: bool = False, parse_tools: bool = False) -> None:
        self.state = THINK if in_think else CONTENT
        self.parse_tools = parse_tools
        self._buf = ""  # text not yet assigned (may end in the start of a tag)
        self._tool = ""  # body of the tool call being read
        # Content is verbatim except around tags: its trailing whitespace is only held back
        # when a <tool_call> could follow. Reasoning sits between tags, so it is trimmed.
        self._content = _Section(hold=parse_tools, strip_leading=False)
        self._reasoning = _Section(hold=True, strip_leading=True)
        self.tool_calls: list[ToolCall] = []

    def _markers(self) -> tuple[str, ...]:
        if self.state == THINK:
            return (THINK_CLOSE,)
        if self.state == TOOL:
            return (TOOL_CLOSE,)
        return (THINK_OPEN, TOOL_OPEN) if self.parse_tools else (THINK_OPEN,)

    def _put(self, out: ReplyDelta, text: str) -> None:
        if not text:
            return
        if self.state == THINK:
            out.reasoning += self._reasoning.emit(text)
        elif self.state == TOOL:
            self._tool += text
        else:
            out.content += self._content.emit(text)

    def _switch(self, marker: str, out: ReplyDelta) -> None:
        if marker == THINK_OPEN:
            self.state = THINK
            self._reasoning.restart()
            self._content.pending = ""
        elif marker == TOOL_OPEN:
            self.state, self._tool = TOOL, ""
            self._content.pending = ""  # whitespace before a call is layout
        elif marker == THINK_CLOSE:
            self.state = CONTENT
            self._content.restart()
        else:  # TOOL_CLOSE
            self.state = CONTENT
            call = parse_tool_call(self._tool)
            if call is None:  # not a call after all: show the block as text
                out.content += self._content.emit(TOOL_OPEN + self._tool + TOOL_CLOSE)
            else:
                self.tool_calls.append(call)
                out.tool_calls.append(call)
                self._content.restart()

    def feed(self, text: str) -> ReplyDelta:
        """Add reply text; return what it adds to reasoning, content and tool calls."""
        out = ReplyDelta()
        self._buf += text
        while True:
            hits = [(i, m) for m in self._markers() if (i := self._buf.find(m)) >= 0]
            if not hits:
                break
            i, marker = min(hits)
            self._put(out, self._buf[:i])
            self._buf = self._buf[i + len(marker):]
            self._switch(marker, out)
        hold = _partial_tag_len(self._buf, self._markers())
        self._put(out, self._buf[:len(self._buf) - hold])
        self._buf = self._buf[len(self._buf) - hold:]
        return out

    def finish(self) -> ReplyDelta:
        """End of the reply: flush held text; an unclosed tool call is shown as text."""
        out = ReplyDelta()
        self._put(out, self._buf)
        self._buf = ""
        if self.state == TOOL:
            self.state = CONTENT
            out.content += self._content.emit(TOOL_OPEN + self._tool)
        out.content += self._content.flush()
        return out


def _partial_tag_len(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of one of the markers."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


def split_reply(text: str, *, in_think: bool = False, parse_tools: bool = False) -> ReplyDelta:
    """The whole reply split at once (the non-streaming path; same rules as ``ReplyParser``)."""
    parser = ReplyParser(in_think=in_think, parse_tools=parse_tools)
    out = parser.feed(text)
    out += parser.finish()
    return out
