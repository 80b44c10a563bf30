"""``minimind generate --batch-file FILE``: many prompts through one batch at a time.

A line of FILE is one prompt: plain text, a JSON string or ``{"prompt": ...}`` (for a prompt
with line breaks), or a JSON conversation (a list of ``{"role", "content"}`` messages, or
``{"messages": [...]}``). Blank
lines are skipped. Results come out in input order, one a line: the reply with its line breaks
written as ``\\n`` (and ``\\`` as ``\\\\``), or with ``--json`` one JSON object a line.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from ..chat import prompt_messages, validate_messages
from ..params import GenerationResult, SamplingParams

if TYPE_CHECKING:
    from ..engine import Engine

Message = dict[str, Any]


@dataclass(frozen=True)
class BatchItem:
    """One prompt of a batch file: its line number and either text or a conversation."""

    line: int
    text: str | None = None
    messages: list[Message] | None = None


def parse_line(text: str, line: int) -> BatchItem:
    """A batch-file line as a prompt (ValueError naming the line for a malformed conversation)."""
    stripped = text.strip()
    if stripped[:1] in ('"', "[", "{"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            value = None  # not JSON: plain text that happens to start with a bracket
        if isinstance(value, dict) and isinstance(value.get("prompt"), str):
            value = value["prompt"]
        if isinstance(value, str):
            return BatchItem(line, text=value)
        if isinstance(value, dict):
            if "messages" not in value:
                raise ValueError(f"batch file line {line}: a JSON object needs \"messages\" "
                                 "(a conversation) or \"prompt\" (a text)")
            value = value["messages"]
        if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
            try:
                return BatchItem(line, messages=validate_messages(value))
            except ValueError as e:
                raise ValueError(f"batch file line {line}: {e}") from None
    return BatchItem(line, text=text.rstrip("\r\n"))


def read_batch(lines: Iterable[str]) -> list[BatchItem]:
    """Every non-blank line as a BatchItem."""
    return [parse_line(text, n) for n, text in enumerate(lines, 1) if text.strip()]


def encode_item(engine: Engine, item: BatchItem, *, raw: bool, prefix: str = "",
                system: str | None = None, template_kwargs: dict[str, Any] | None = None,
                max_new_tokens: int = 0) -> list[int]:
    """Prompt ids of one item: chat-formatted (``system`` first unless it has one), or raw text."""
    if raw:
        if item.messages is not None:
            raise ValueError(f"batch file line {item.line} is a conversation; --raw takes plain "
                             "prompts (drop --raw to chat-format it)")
        return engine.encode(prefix + (item.text or ""))
    messages = item.messages or prompt_messages(item.text or "")
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return engine.chat_ids(messages, max_new_tokens=max_new_tokens, **(template_kwargs or {}))


def chunks(items: Sequence[BatchItem], size: int) -> Iterator[Sequence[BatchItem]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def one_line(text: str) -> str:
    """A reply on one line: backslashes doubled, line breaks written as ``\\n`` / ``\\r``."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def run_batch(engine: Engine, items: Sequence[BatchItem], params: SamplingParams, *,
              raw: bool = False, prefix: str = "", system: str | None = None,
              template_kwargs: dict[str, Any] | None = None, batch_size: int = 16,
              as_json: bool = False, out: TextIO | None = None) -> list[GenerationResult]:
    """Generate for every item, ``batch_size`` rows at a time, printing each result as its batch
    finishes (one line each, in input order). Returns the results."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    out = out or sys.stdout
    results: list[GenerationResult] = []
    for group in chunks(items, batch_size):
        rows = [encode_item(engine, item, raw=raw, prefix=prefix, system=system,
                            template_kwargs=template_kwargs, max_new_tokens=params.max_new_tokens)
                for item in group]
        for item, result in zip(group, engine.generate_batch(rows, params), strict=True):
            if as_json:
                record = {"line": item.line, "prompt": item.messages or item.text,
                          **result.to_dict()}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
            else:
                out.write(one_line(result.text) + "\n")
            results.append(result)
        out.flush()
    return results
