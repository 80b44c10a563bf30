"""One request's output as the token loop draws it: text deltas, stopping, usage and timings.

Written once for the library's generate/stream (``Engine``) and the server's scheduler: feed each
drawn token to ``RequestOutput.add``; it says whether the request is finished (a stop token, a stop
string, or its token budget) and gives the text to send; ``final`` makes the last chunk.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from .params import SamplingParams, StreamChunk, Usage
from .textstream import TextAssembler
from .tokenizer import Tokenizer


class RequestOutput:
    """Text assembly and stop handling of one row (``index`` is its place in a batch)."""

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, prompt_tokens: int,
                 budget: int, index: int = 0, stop_ids: Collection[int] | None = None,
                 started: float | None = None) -> None:
        self.asm = TextAssembler(tokenizer, params.stop)
        self.stop_ids = tokenizer.stop_token_ids if stop_ids is None else stop_ids
        self.prompt_tokens, self.budget, self.index = prompt_tokens, budget, index
        self.finish_reason: str | None = None
        self.started = time.perf_counter() if started is None else started
        self.first: float | None = None
        self.last = 0.0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or len(self.asm.ids) >= self.budget

    def add(self, token: int) -> StreamChunk | None:
        """Take one drawn token; returns the chunk of new text, if any (check ``done`` after)."""
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now
        if token in self.stop_ids:
            self.asm.ids.append(token)
            self.finish_reason = "stop"
            return None
        delta = self.asm.add(token)
        if self.asm.stopped:
            self.finish_reason = "stop"
        return StreamChunk(delta, token, index=self.index) if delta else None

    def final(self) -> StreamChunk:
        """The last chunk: any held-back text, finish_reason, usage, timings and every id."""
        tail = self.asm.finish()
        n_out = len(self.asm.ids)
        ttft = (self.first - self.started) if self.first else 0.0
        tps = ((n_out - 1) / (self.last - self.first)
               if n_out > 1 and self.first and self.last > self.first else 0.0)
        return StreamChunk(tail, None, index=self.index, finish_reason=self.finish_reason or "length",
                           usage=Usage(self.prompt_tokens, n_out), time_to_first_token=ttft,
                           tokens_per_second=tps, token_ids=list(self.asm.ids))
