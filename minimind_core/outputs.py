"""One request's output as the token loop draws it: text deltas, stopping, usage and timings.

Written once for the library's generate/stream (``Engine``) and the server's scheduler: feed each
drawn token to ``RequestOutput.add``; it says whether the request is finished (a stop token, a stop
string, or its token budget) and gives the text to send; ``final`` makes the last chunk.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from .params import SamplingParams, StreamChunk, TokenLogprob, Usage
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
        self.want_logprobs = params.logprobs is not None
        self._logprobs: list[TokenLogprob] = []  # not yet sent with a chunk

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or len(self.asm.ids) >= self.budget

    def add(self, token: int, logprob: TokenLogprob | None = None) -> StreamChunk | None:
        """Take one drawn token (and its logprob); returns the chunk of new text, if any (check
        ``done`` after). Logprobs ride on the chunk whose text their tokens made."""
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now
        if self.want_logprobs and logprob is not None:
            self._logprobs.append(logprob)
        if token in self.stop_ids:
            self.asm.ids.append(token)
            self.finish_reason = "stop"
            return None
        delta = self.asm.add(token)
        if self.asm.stopped:
            self.finish_reason = "stop"
        if not delta:
            return None
        return StreamChunk(delta, token, index=self.index, logprobs=self._take_logprobs())

    def _take_logprobs(self) -> list[TokenLogprob] | None:
        if not self.want_logprobs:
            return None
        out, self._logprobs = self._logprobs, []
        return out

    def final(self) -> StreamChunk:
        """The last chunk: any held-back text, finish_reason, usage, timings and every id."""
        tail = self.asm.finish()
        n_out = len(self.asm.ids)
        ttft = (self.first - self.started) if self.first else 0.0
        tps = ((n_out - 1) / (self.last - self.first)
               if n_out > 1 and self.first and self.last > self.first else 0.0)
        return StreamChunk(tail, None, index=self.index, finish_reason=self.finish_reason or "length",
                           usage=Usage(self.prompt_tokens, n_out), time_to_first_token=ttft,
                           tokens_per_second=tps, token_ids=list(self.asm.ids),
                           logprobs=self._take_logprobs())
