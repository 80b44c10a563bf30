"""Terminal output shared by generate and chat: dimmed thinking, streaming a reply, the stats line."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

from ..params import StreamChunk

DIM = "\x1b[2m"
RESET = "\x1b[0m"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def use_color(stream: TextIO) -> bool:
    """ANSI styling only on a terminal, and never when NO_COLOR is set (no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def ends_in_think(prompt_text: str) -> bool:
    """Whether a prompt leaves a ``<think>`` block open, so the reply starts inside it."""
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)


class ThinkStyler:
    """Wraps ``<think>…</think>`` text in ANSI dim, one streamed delta at a time.

    A tag may be split across deltas, so a tail that could still become a tag is held back until
    the next delta (or ``finish``). Disabled, it passes text through untouched.
    """

    def __init__(self, enabled: bool = True, inside: bool = False) -> None:
        self.enabled = enabled
        self.inside = inside
        self._pending = ""
        self._started = False

    def feed(self, text: str) -> str:
        if not self.enabled:
            return text
        out = []
        if self.inside and not self._started:
            out.append(DIM)
        self._started = True
        buf = self._pending + text
        while True:
            tag = THINK_CLOSE if self.inside else THINK_OPEN
            at = buf.find(tag)
            if at < 0:
                break
            out.append(buf[:at])
            out.append(tag + RESET if self.inside else DIM + tag)
            self.inside = not self.inside
            buf = buf[at + len(tag):]
        keep = _partial_suffix(buf, THINK_CLOSE if self.inside else THINK_OPEN)
        self._pending = buf[len(buf) - keep:] if keep else ""
        out.append(buf[:len(buf) - keep])
        return "".join(out)

    def finish(self) -> str:
        """Whatever is held back, and a reset if the reply ended (or stopped) inside thinking."""
        if not self.enabled:
            return ""
        tail, self._pending = self._pending, ""
        return tail + (RESET if self.inside and self._started else "")


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


@dataclass
class ReplyStats:
    """What one reply cost; ``interrupted`` when Ctrl-C stopped it."""

    completion_tokens: int = 0
    prompt_tokens: int = 0
    tokens_per_second: float = 0.0
    time_to_first_token: float = 0.0
    finish_reason: str | None = None
    interrupted: bool = False

    def line(self) -> str:
        """One short line: ``42 tokens, 85.3 tok/s (prompt 17 tokens)``."""
        what = "stopped: " if self.interrupted else ""
        return (f"[{what}{self.completion_tokens} tokens, {self.tokens_per_second:.1f} tok/s, "
                f"prompt {self.prompt_tokens} tokens]")


def print_stream(chunks: Iterator[StreamChunk], out: TextIO, styler: ThinkStyler) -> tuple[str, ReplyStats]:
    """Print text deltas as they come; return the whole text and its stats.

    Ctrl-C stops this reply only: the generator is closed (so the engine frees its lock and
    cache) and the partial text is returned with ``interrupted=True``.
    """
    parts: list[str] = []
    stats = ReplyStats()
    count = 0
    t0 = time.perf_counter()
    first = last = None
    try:
        for chunk in chunks:
            if chunk.text:
                parts.append(chunk.text)
                out.write(styler.feed(chunk.text))
                out.flush()
            if chunk.finish_reason is not None:
                stats.finish_reason = chunk.finish_reason
                stats.completion_tokens = chunk.usage.completion_tokens if chunk.usage else count
                stats.prompt_tokens = chunk.usage.prompt_tokens if chunk.usage else 0
                stats.tokens_per_second = chunk.tokens_per_second or 0.0
                stats.time_to_first_token = chunk.time_to_first_token or 0.0
            elif chunk.token_id is not None:
                count += 1
                last = time.perf_counter()
                first = first or last
    except KeyboardInterrupt:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()
        stats.interrupted = True
        stats.completion_tokens = count
        if first is not None and last is not None and last > first:
            stats.tokens_per_second = (count - 1) / (last - first)
        stats.time_to_first_token = (first - t0) if first else 0.0
    out.write(styler.finish())
    out.flush()
    return "".join(parts), stats


def print_stats(stats: ReplyStats, err: TextIO | None = None) -> None:
    err = err or sys.stderr
    sys.stdout.flush()  # the reply first, then its stats, when both go to one terminal
    line = stats.line()
    err.write((DIM + line + RESET if use_color(err) else line) + "\n")
    err.flush()
