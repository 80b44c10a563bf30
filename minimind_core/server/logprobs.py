"""Logprobs in OpenAI's two wire shapes, from the core's ``TokenLogprob`` lists.

- Legacy completions (``logprobs: N``): ``{tokens, token_logprobs, top_logprobs, text_offset}``,
  one entry per token; with ``echo`` the prompt's tokens come first, the first one ``null`` (no
  token before it). ``top_logprobs`` holds a ``{token text: logprob}`` dict per position: the N
  likeliest plus the chosen token, as vLLM gives them (so ``logprobs: 0`` still shows it).
- Chat (``logprobs: true, top_logprobs: N``): ``content = [{token, logprob, bytes,
  top_logprobs: [N x {token, logprob, bytes}]}]``.

Token text is the token decoded alone with special tokens kept; ``bytes`` are the token's own
UTF-8 bytes (for byte-level BPE, the raw bytes even where a token holds part of a character).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ..params import TokenLogprob
from ..tokenizer import Tokenizer

__all__ = ["TokenText", "chat_logprobs", "completion_logprobs"]


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: byte-level BPE writes each byte as one of these
    characters (openai/gpt-2 encoder.py ``bytes_to_unicode``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    """Per-id token text and bytes for one tokenizer (cached: a response repeats tokens)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}
        self._specials = tokenizer.special_token_ids

    def text(self, token: int) -> str:
        if token not in self._text:
            self._text[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return self._text[token]

    def bytes(self, token: int) -> list[int]:
        text = self.text(token)
        if "\ufffd" in text and token not in self._specials:
            piece = self.tokenizer.id_to_token(token) or ""
            table = _byte_decoder()
            if piece and all(ch in table for ch in piece):
                return [table[ch] for ch in piece]
        return list(text.encode("utf-8"))


def _top_dict(names: TokenText, lp: TokenLogprob) -> dict[str, float]:
    top = {names.text(t): v for t, v in lp.top}
    top.setdefault(names.text(lp.token), lp.logprob)
    return top


def completion_logprobs(names: TokenText, prompt: list[TokenLogprob | None] | None,
                        prompt_ids: list[int], generated: list[TokenLogprob],
                        start: int = 0) -> dict[str, Any]:
    """The legacy ``logprobs`` object: ``prompt`` (echo: one entry per prompt id, the first
    None) then ``generated``; ``text_offset`` counts characters from ``start``."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    at = start
    if prompt is not None:
        for token, lp in zip(prompt_ids, prompt):
            tokens.append(names.text(token))
            values.append(None if lp is None else lp.logprob)
            tops.append(None if lp is None else _top_dict(names, lp))
            offsets.append(at)
            at += len(tokens[-1])
    for lp in generated:
        tokens.append(names.text(lp.token))
        values.append(lp.logprob)
        tops.append(_top_dict(names, lp))
        offsets.append(at)
        at += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(names: TokenText, generated: list[TokenLogprob]) -> dict[str, Any]:
    """The chat ``logprobs`` object: ``{"content": [...], "refusal": None}``."""
    def entry(token: int, logprob: float) -> dict[str, Any]:
        return {"token": names.text(token), "logprob": logprob, "bytes": names.bytes(token)}

    return {"content": [{**entry(lp.token, lp.logprob),
                         "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in generated],
            "refusal": None}
