"""The abstract Engine and everything generation shares across backends.

A backend implements only ``_prefill`` (start a batch, return the last logits), ``_decode``
(one token per row → next logits) and ``_logits`` (full-sequence logits); it may override
``_sample`` (e.g. greedy on the device) or ``_steps`` (the whole token loop, as MLX does with
mlx_lm). Formatting, sampling parameters, stop handling, UTF-8-safe streaming, usage and timings
live here, once.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from . import sampling
from .chat import ChatFormatter
from .config import ModelConfig
from .params import GenerationResult, SamplingParams, StreamChunk, Usage
from .textstream import TextAssembler
from .tokenizer import Tokenizer

Prompt = str | Sequence[int]


class EngineBusyError(RuntimeError):
    """A second generation was started in a thread whose first one is still open."""


class Engine(ABC):
    """A loaded model plus its tokenizer, ready to generate. Build one with ``minimind_core.load``."""

    backend: str = "abstract"

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, *, name: str = "minimind",
                 info: dict[str, Any] | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.formatter = ChatFormatter(tokenizer, context_window=config.max_position_embeddings)
        self.name = name
        self.info: dict[str, Any] = dict(info or {})
        self.lora_path: str | None = None
        self._lock = threading.Lock()  # one generation at a time: it owns the backend's cache
        self._owner: int | None = None  # the thread holding it

    # ---- what a backend implements ------------------------------------------------------
    @abstractmethod
    def _prefill(self, prompts: list[list[int]], max_len: int) -> Any:
        """Start a batch (left-padded), return last-position logits [B, vocab] (backend array)."""

    @abstractmethod
    def _decode(self, tokens: np.ndarray) -> Any:
        """Feed one token per row, return the next logits [B, vocab]."""

    @abstractmethod
    def _logits(self, ids: list[int]) -> np.ndarray:
        """Logits for every position of one sequence, float32 [T, vocab]."""

    def _to_numpy(self, logits: Any) -> np.ndarray:
        return np.asarray(logits, dtype=np.float32)

    def _sample(self, logits: Any, params: SamplingParams, histories: list[list[int]],
                rng: np.random.Generator) -> np.ndarray:
        return sampling.sample(self._to_numpy(logits), params, histories, rng)

    def _steps(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[np.ndarray]:
        """Yield the next token of every row, step after step, until the caller stops."""
        histories = [list(p) for p in prompts]
        rng = np.random.default_rng(params.seed)
        logits = self._prefill(prompts, max(map(len, prompts)) + params.max_new_tokens)
        track = params.repetition_penalty != 1.0  # only the penalty reads the history
        while True:
            tokens = self._sample(logits, params, histories, rng)
            yield tokens
            if track:
                for history, token in zip(histories, tokens):
                    history.append(int(token))
            logits = self._decode(tokens)

    # ---- shared API ----------------------------------------------------------------------
    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the engine: other threads wait; the same thread asking again (e.g. a second
        generation while its first stream is paused) gets EngineBusyError instead of corrupting
        the first one's cache."""
        if self._owner == threading.get_ident():
            raise EngineBusyError(
                "this engine is already generating in this thread (an unfinished stream); "
                "read it to the end or call .close() on it first")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    def logits(self, ids: Prompt) -> np.ndarray:
        """Logits of every position, numpy float32 [T, vocab]."""
        ids = self.encode(ids)
        self._budget([ids], SamplingParams(max_new_tokens=0))
        with self.exclusive():
            return self._logits(ids)

    def iter_tokens(self, prompts: Sequence[Prompt], params: SamplingParams | None = None,
                    **sampling_kwargs: Any) -> Iterator[np.ndarray]:
        """Token ids of every row, step after step, without stopping at eos or stop strings
        (for benchmarks and custom loops); at most ``max_new_tokens`` steps. Close it when done."""
        params = SamplingParams.from_kwargs(params, **sampling_kwargs)
        rows = [self.encode(p) for p in prompts]
        budget = self._budget(rows, params)

        def steps() -> Iterator[np.ndarray]:
            with self.exclusive():
                inner = self._steps(rows, params)
                try:
                    yield from itertools.islice(inner, budget)
                finally:
                    inner.close()

        return steps()

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a raw prompt (no chat template); lists of ids pass through."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt is empty: give some text or token ids")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               **sampling_kwargs: Any) -> Iterator[StreamChunk]:
        """Generate from a raw prompt, yielding text deltas; the last chunk has finish_reason.
        Arguments are checked at the call, not at the first ``next()``."""
        params = SamplingParams.from_kwargs(params, **sampling_kwargs)
        return self._stream_rows([self.encode(prompt)], params)

    def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                 **sampling_kwargs: Any) -> GenerationResult:
        """Generate from a raw prompt (text or token ids; no chat template)."""
        params = SamplingParams.from_kwargs(params, **sampling_kwargs)
        return self._collect(self._stream_rows([self.encode(prompt)], params), 1)[0]

    def generate_batch(self, prompts: Sequence[Prompt], params: SamplingParams | None = None,
                       **sampling_kwargs: Any) -> list[GenerationResult]:
        """Generate for several prompts at once (left-padded batch, per-row stopping): raw prompts
        (text or ids) and conversations (lists of message dicts, chat-formatted) may be mixed."""
        if not prompts:
            return []
        params = SamplingParams.from_kwargs(params, **sampling_kwargs)
        # a row that is a list of message dicts is a conversation: the shared chat formatter
        rows = [self.chat_ids(list(p), max_new_tokens=params.max_new_tokens)
                if isinstance(p, (list, tuple)) and p and isinstance(p[0], dict)
                else self.encode(p) for p in prompts]
        return self._collect(self._stream_rows(rows, params), len(rows))

    def chat_ids(self, messages: list[dict[str, Any]], *, max_history: int | None = None,
                 tools: list[dict] | None = None, max_new_tokens: int = 0,
                 **template_kwargs: Any) -> list[int]:
        """Prompt ids for a conversation through the shared ChatFormatter. Old turns are dropped
        so that the reply has room for ``max_new_tokens`` (at most half the context window)."""
        reserve = min(max_new_tokens, self.config.max_position_embeddings // 2)
        return self.formatter.encode(messages, max_history=max_history, tools=tools,
                                     reserve_tokens=max(reserve, 1), **template_kwargs)

    def stream_chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None, *,
                    max_history: int | None = None, tools: list[dict] | None = None,
                    template_kwargs: dict[str, Any] | None = None,
                    **sampling_kwargs: Any) -> Iterator[StreamChunk]:
        """Chat-formatted streaming generation (template options via ``template_kwargs``)."""
        params = SamplingParams.from_kwargs(params, **sampling_kwargs)
        ids = self.chat_ids(messages, max_history=max_history, tools=tools,
                            max_new_tokens=params.max_new_tokens, **(template_kwargs or {}))
        return self._stream_rows([ids], params)

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None, *,
             max_history: int | None = None, tools: list[dict] | None = None,
             template_kwargs: dict[str, Any] | None = None,
             **sampling_kwargs: Any) -> GenerationResult:
        """Answer a conversation: ``[{"role": "user", "content": "你好"}]`` → GenerationResult."""
        chunks = self.stream_chat(messages, params, max_history=max_history, tools=tools,
                                  template_kwargs=template_kwargs, **sampling_kwargs)
        return self._collect(chunks, 1)[0]

    # ---- the loop ----------------------------------------------------------------------------
    def _budget(self, rows: list[list[int]], params: SamplingParams) -> int:
        """Tokens that may be generated: max_new_tokens, clamped to the context window."""
        window = self.config.max_position_embeddings
        longest = max(map(len, rows))
        if longest > window or (longest == window and params.max_new_tokens):
            raise ValueError(f"prompt is {longest} tokens, longer than the context window of "
                             f"{window} tokens; shorten the input (in a chat: keep fewer turns)")
        return min(params.max_new_tokens, window - longest)

    def _stream_rows(self, rows: list[list[int]], params: SamplingParams) -> Iterator[StreamChunk]:
        budget = self._budget(rows, params)  # checked now, at the call
        return self._stream_rows_checked(rows, params, budget)

    def _stream_rows_checked(self, rows: list[list[int]], params: SamplingParams,
                             budget: int) -> Iterator[StreamChunk]:
        stops = self.tokenizer.stop_token_ids
        asm = [TextAssembler(self.tokenizer, params.stop) for _ in rows]
        done = [None] * len(rows)  # finish_reason per row
        first: list[float | None] = [None] * len(rows)
        last = [0.0] * len(rows)
        t0 = time.perf_counter()
        with self.exclusive():
            steps = self._steps(rows, params) if budget > 0 else iter(())
            try:
                for n, tokens in enumerate(steps):
                    now = time.perf_counter()
                    for i, token in enumerate(tokens):
                        if done[i]:
                            continue
                        token = int(token)
                        first[i] = first[i] or now
                        last[i] = now
                        if token in stops:
                            asm[i].ids.append(token)
                            done[i] = "stop"
                            continue
                        delta = asm[i].add(token)
                        if asm[i].stopped:
                            done[i] = "stop"
                        if delta:
                            yield StreamChunk(delta, token, index=i)
                    if all(done) or n + 1 >= budget:
                        break
            finally:
                if hasattr(steps, "close"):
                    steps.close()
        for i, a in enumerate(asm):
            tail = a.finish()
            n_out = len(a.ids)
            ttft = (first[i] - t0) if first[i] else 0.0
            tps = (n_out - 1) / (last[i] - first[i]) if n_out > 1 and last[i] > first[i] else 0.0
            yield StreamChunk(tail, None, index=i, finish_reason=done[i] or "length",
                              usage=Usage(len(rows[i]), n_out), time_to_first_token=ttft,
                              tokens_per_second=tps, token_ids=list(a.ids))

    def _collect(self, chunks: Iterator[StreamChunk], n: int) -> list[GenerationResult]:
        results = [GenerationResult(text="") for _ in range(n)]
        parts: list[list[str]] = [[] for _ in range(n)]
        for chunk in chunks:
            parts[chunk.index].append(chunk.text)
            if chunk.finish_reason is not None:
                r = results[chunk.index]
                r.finish_reason = chunk.finish_reason
                r.prompt_tokens = chunk.usage.prompt_tokens
                r.completion_tokens = chunk.usage.completion_tokens
                r.time_to_first_token = chunk.time_to_first_token or 0.0
                r.tokens_per_second = chunk.tokens_per_second or 0.0
                r.token_ids = chunk.token_ids or []
        for i, r in enumerate(results):
            r.text = "".join(parts[i])
        return results

    def describe(self) -> dict[str, Any]:
        """What is loaded: backend, model kind and sizes (used by ``minimind info`` and /v1/models)."""
        c = self.config
        return {"name": self.name, "backend": self.backend, "kind": c.kind,
                "parameters": c.num_parameters(), **self.info, "lora": self.lora_path}
