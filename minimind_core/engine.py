"""The abstract Engine and the one token loop every generation runs through.

A backend implements the decode core only — a cache of slots whose rows each have their own
length (``_new_cache``), ``_prefill`` (one row's prompt into its slot → its next-token logits),
``_decode_step`` (one token per row at each row's own position → logits per row) and
``_logits`` (full-sequence logits) — plus how its arrays reach the sampler. Everything else lives
here once: ``TokenLoop`` (rows join and leave between two decode steps; one seeded sampler per row),
and on top of it formatting, stop handling, UTF-8-safe streaming, usage and timings for
``generate``, ``stream``, ``chat``, ``stream_chat``, ``generate_batch`` and ``iter_tokens``.
"""

from __future__ import annotations

import contextlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .chat import ChatFormatter
from .config import ModelConfig
from .outputs import RequestOutput
from .params import GenerationResult, SamplingParams, StreamChunk, TokenLogprob
from .sampling import new_seed, token_logprobs
from .sampling import sample as sample_rows
from .tokenizer import Tokenizer

Prompt = str | Sequence[int]
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CACHE_STEP = 256  # cache lengths are rounded up to this, so one cache serves many requests
PREFILL_TOKENS = 8192  # prompt tokens a library call prefills per step, its rows packed together


class EngineBusyError(RuntimeError):
    """A second generation was started in a thread whose first one is still open."""


def batch_bucket(n: int) -> int:
    """The number of cache slots that serves ``n`` rows (so one cache serves nearby batch sizes)."""
    return next((b for b in BATCH_BUCKETS if b >= n), n)


@dataclass(eq=False)
class Row:
    """One request in the running batch: its cache slot, sampler state and next logits."""

    slot: int
    params: SamplingParams
    seed: int
    history: list[int]  # prompt + drawn ids (the repetition penalty reads it)
    prompt_tokens: int
    ids: list[int] = field(default_factory=list, repr=False)  # the ids whose keys are cached
    todo: list[int] = field(default_factory=list, repr=False)  # prompt ids not prefilled yet
    cached_tokens: int = 0  # prompt ids whose keys came from the prefix cache
    drawn: int = 0  # tokens drawn so far: the index of the next uniform
    pending: int | None = None  # the last drawn token, fed at the next step
    logits: Any = field(default=None, repr=False)  # next-token logits (a backend array [vocab])
    logprob: TokenLogprob | None = None  # of the last drawn token, with params.logprobs


class TokenLoop:
    """The one token loop. ``add`` puts a prompt into a free slot (prefilled at once, or chunk by
    chunk in the following steps); ``step`` prefills what is due, feeds every running row's last
    token through one decode step and draws the next one per ready row; ``remove`` frees a row.
    Rows may be added and removed between any two steps without touching the others.

    ``prefix_cache``: how many finished rows' slots to keep as reusable prefixes (0 = off); a new
    prompt then prefills only what follows the longest cached prefix. ``chunk``: the most prompt
    tokens prefilled per step (None = a whole prompt at ``add``), so long prompts do not stall
    the running rows.
    """

    def __init__(self, engine: Engine, slots: int, max_len: int, *, prefix_cache: int = 0,
                 chunk: int | None = None) -> None:
        self.engine = engine
        self.cache = engine._cache_for(slots, max_len)
        self.rows: list[Row] = []
        self.prefix_cache, self.chunk = prefix_cache, chunk

    def has_room(self) -> bool:
        """Whether ``add`` would find a slot (an empty one, or a cached prefix to evict)."""
        return not self.cache.used.all()

    def add(self, ids: list[int], params: SamplingParams, seed: int | None = None,
            reserve: int = 0) -> Row:
        """Put ``ids`` into a slot with room for ``reserve`` more positions; the row's first
        token comes with a later ``step``."""
        self._grow(len(ids) + reserve)
        slot, n = self.cache.match(ids) if self.prefix_cache else (None, 0)
        n = min(n, len(ids) - 1)  # the last prompt token is always prefilled: it gives the logits
        if slot is not None and n > 0:
            self.cache.take(slot, n)
        else:
            slot, n = self.cache.alloc(), 0
        row = Row(slot, params, new_seed() if seed is None else int(seed), list(ids), len(ids),
                  ids=list(ids[:n]), todo=list(ids[n:]), cached_tokens=n)
        self.rows.append(row)
        if self.chunk is None:
            try:
                self._prefill_rows([(row, len(row.todo))])
            except BaseException:
                self.remove(row)
                raise
        return row

    def fork(self, row: Row, seed: int | None = None) -> Row:
        """A second row with ``row``'s prompt, sharing its prefill (the keys are copied into a
        free slot, the first logits shared): ``n > 1`` choices of one prompt. Call it before
        ``row``'s first ``step``."""
        if row.todo or row.pending is not None:
            raise ValueError("fork a row after its prefill and before its first step")
        slot = self.cache.alloc()
        self.engine._copy_prefix(self.cache, row.slot, slot, len(row.ids))
        self.cache.lengths[slot] = len(row.ids)
        twin = Row(slot, row.params, new_seed() if seed is None else int(seed),
                   list(row.history), row.prompt_tokens, ids=list(row.ids),
                   cached_tokens=row.cached_tokens)
        twin.logits = row.logits
        self.rows.append(twin)
        return twin

    def _grow(self, length: int) -> None:
        if length > self.cache.max_len:
            self.cache = self.engine._grow_cache(self.cache, length)

    def _prefill_rows(self, due: list[tuple[Row, int]]) -> None:
        """Prefill the next ``n`` prompt ids of each row, every row in one backend call."""
        parts = [row.todo[:n] for row, n in due]
        logits = self.engine._prefill_rows(self.cache, [(row.slot, part) for (row, _), part
                                                        in zip(due, parts)])
        for (row, n), part, out in zip(due, parts, logits):
            row.todo = row.todo[n:]
            row.ids += part
            if not row.todo:
                row.logits = out

    def remove(self, row: Row) -> None:
        """Take a finished or cancelled row out; its slot is free for the next ``add`` (kept as a
        reusable prefix when the prefix cache is on)."""
        self.rows.remove(row)
        self.cache.free(row.slot, keep=row.ids if not row.todo else None,
                        max_cached=self.prefix_cache)

    def step(self) -> list[tuple[Row, int]]:
        """Prefill what is due, feed each row's pending token (one decode step), then draw one
        token per row whose prompt is in."""
        engine = self.engine
        budget = self.chunk
        due = []
        for row in [r for r in self.rows if r.todo]:
            if budget is not None and budget <= 0:
                break
            n = len(row.todo) if budget is None else min(budget, len(row.todo))
            due.append((row, n))
            if budget is not None:
                budget -= n
        if due:
            self._prefill_rows(due)
        fed = [r for r in self.rows if r.pending is not None]
        if fed:
            slots = np.array([r.slot for r in fed], dtype=np.int64)
            tokens = np.array([r.pending for r in fed], dtype=np.int64)
            out = engine._decode_step(self.cache, slots, tokens)
            for i, r in enumerate(fed):
                r.logits = out[i]
                r.ids.append(r.pending)
        ready = [r for r in self.rows if r.logits is not None]
        if not ready:
            return []
        logits = out if fed and len(fed) == len(ready) == len(self.rows) else engine._stack(
            [r.logits for r in ready])
        drawn = engine._sample(logits, ready)
        wants = [i for i, r in enumerate(ready) if r.params.logprobs is not None]
        if wants:  # log-softmax of the raw float32 logits, before any sampling filter
            host = engine._to_numpy(logits)
            for i in wants:
                ready[i].logprob = token_logprobs(host[i:i + 1], [int(drawn[i])],
                                                  ready[i].params.logprobs)[0]
        out_rows = []
        for r, token in zip(ready, drawn):
            token = int(token)
            r.pending, r.drawn, r.logits = token, r.drawn + 1, None
            if r.params.repetition_penalty != 1.0:
                r.history.append(token)
            out_rows.append((r, token))
        return out_rows

    def close(self) -> None:
        for row in list(self.rows):
            self.remove(row)


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
        self._lock = threading.Lock()  # one open generation at a time: it owns the cache
        self._owner: threading.Thread | None = None  # the thread of the open generation
        self._cache: Any = None

    # ---- the decode core a backend implements ------------------------------------------
    @abstractmethod
    def _new_cache(self, slots: int, max_len: int) -> Any:
        """A cache of ``slots`` rows of ``max_len`` positions (``alloc``/``free``/``fits``)."""

    @abstractmethod
    def _prefill(self, cache: Any, slot: int, ids: list[int]) -> Any:
        """Write ``ids`` into ``slot`` from position 0; return the next-token logits [vocab]."""

    def _prefill_rows(self, cache: Any, parts: list[tuple[int, list[int]]]) -> Any:
        """Several rows' prompt parts ``(slot, ids)`` at once → each row's next-token logits, in
        order (a backend may pack them into one pass; by default one ``_prefill`` each)."""
        return [self._prefill(cache, slot, ids) for slot, ids in parts]

    @abstractmethod
    def _decode_step(self, cache: Any, slots: np.ndarray, tokens: np.ndarray) -> Any:
        """Feed ``tokens[i]`` at the current length of ``slots[i]``; return logits [rows, vocab]."""

    def _grow_cache(self, cache: Any, max_len: int) -> Any:
        """A longer cache holding everything ``cache`` holds (rows keep running in it): at least
        twice as long, so a server's cache grows (and copies every slot) a few times, not once
        per 256 positions."""
        window = self.config.max_position_embeddings
        length = min(max(-(-max_len // CACHE_STEP) * CACHE_STEP, 2 * cache.max_len), window)
        if max_len > length:
            raise ValueError(f"{max_len} positions do not fit the context window of {window}")
        new = self._new_cache(cache.slots, length)
        self._copy_cache(cache, new)
        new.lengths[:], new.used[:], new.cached = cache.lengths, cache.used, cache.cached
        self._cache = new
        return new

    def _copy_prefix(self, cache: Any, src: int, dst: int, n: int) -> None:
        """Copy positions ``0..n`` of slot ``src`` into slot ``dst`` (every layer)."""
        raise NotImplementedError(f"the {self.backend} backend cannot copy a cache slot")

    def _copy_cache(self, src: Any, dst: Any) -> None:
        """Copy every slot's keys and values of ``src`` into the (longer) ``dst``."""
        raise NotImplementedError(f"the {self.backend} backend cannot grow a running cache")

    @abstractmethod
    def _logits(self, ids: list[int]) -> np.ndarray:
        """Logits for every position of one sequence, float32 [T, vocab]."""

    def _to_numpy(self, logits: Any) -> np.ndarray:
        return np.asarray(logits, dtype=np.float32)

    def _stack(self, rows: list[Any]) -> Any:
        """Per-row logits → one [rows, vocab] array (a backend may keep it on its device)."""
        return np.stack([self._to_numpy(r) for r in rows])

    def _sample(self, logits: Any, rows: list[Row]) -> np.ndarray:
        """The one sampler (``minimind_core.sampling``); a backend may run the same contract
        on its device."""
        return sample_rows(self._to_numpy(logits), [r.params for r in rows],
                           [r.history for r in rows], [r.seed for r in rows],
                           [r.drawn for r in rows])

    def _cache_for(self, slots: int, max_len: int) -> Any:
        """The engine's cache when it has ``slots`` free rows of ``max_len`` positions, else a new
        one (rounded up, so nearby requests reuse it)."""
        length = min(-(-max_len // CACHE_STEP) * CACHE_STEP, self.config.max_position_embeddings)
        if self._cache is None or not self._cache.fits(slots, length):
            self._cache = None  # free the old one (and what was built on it) first
            self._cache = self._new_cache(batch_bucket(slots), length)
        return self._cache

    # ---- shared API ----------------------------------------------------------------------
    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the engine for one generation: other threads wait; the thread whose generation is
        still open (e.g. a paused stream) gets EngineBusyError instead of corrupting it. The open
        generation is tracked by its thread object, not its id, so a new thread that reuses a
        finished thread's id waits like any other."""
        if self._owner is threading.current_thread():
            raise EngineBusyError(
                "this engine is already generating in this thread (an unfinished stream); "
                "read it to the end or call .close() on it first")
        with self._lock:
            self._owner = threading.current_thread()
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

    def prompt_logprobs(self, ids: Prompt, top: int = 0) -> list[TokenLogprob | None]:
        """Logprob of every prompt token given the ones before it (the first: None), with the
        ``top`` likeliest at each position — what ``echo`` with ``logprobs`` scores."""
        ids = self.encode(ids)
        logits = self.logits(ids)
        out: list[TokenLogprob | None] = [None]
        if len(ids) > 1:
            out += token_logprobs(logits[:-1], ids[1:], top)
        return out

    def iter_tokens(self, prompts: Sequence[Prompt], params: SamplingParams | None = None,
                    **sampling_kwargs: Any) -> Iterator[np.ndarray]:
        """Token ids of every row, step after step, without stopping at eos or stop strings
        (for benchmarks and custom loops); at most ``max_new_tokens`` steps. Close it when done."""
        params, seeds = self._params(sampling_kwargs, params, len(prompts))
        rows = [self.encode(p) for p in prompts]
        budget = self._budget(rows, params)

        def steps() -> Iterator[np.ndarray]:
            with self.exclusive():
                loop = TokenLoop(self, len(rows), max(map(len, rows)) + budget,
                                 chunk=PREFILL_TOKENS)
                try:
                    order = [loop.add(ids, params, seed) for ids, seed in zip(rows, seeds)]
                    for _ in range(budget):
                        drawn = dict(loop.step())
                        yield np.array([drawn[r] for r in order], dtype=np.int64)
                finally:
                    loop.close()

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
        params, seeds = self._params(sampling_kwargs, params, 1)
        return self._stream_rows([self.encode(prompt)], params, seeds)

    def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                 **sampling_kwargs: Any) -> GenerationResult:
        """Generate from a raw prompt (text or token ids; no chat template)."""
        params, seeds = self._params(sampling_kwargs, params, 1)
        return self._collect(self._stream_rows([self.encode(prompt)], params, seeds), 1)[0]

    def generate_batch(self, prompts: Sequence[Prompt], params: SamplingParams | None = None,
                       **sampling_kwargs: Any) -> list[GenerationResult]:
        """Generate for several prompts at once (each row in its own cache slot): raw prompts
        (text or ids) and conversations (lists of message dicts, chat-formatted) may be mixed.
        ``seed=s`` gives every row seed ``s`` (as vLLM's per-request seed); a list gives one seed
        per row. A row's tokens are the same as when it runs alone with the same seed."""
        if not prompts:
            return []
        params, seeds = self._params(sampling_kwargs, params, len(prompts))
        # a row that is a list of message dicts is a conversation: the shared chat formatter
        rows = [self.chat_ids(list(p), max_new_tokens=params.max_new_tokens)
                if isinstance(p, (list, tuple)) and p and isinstance(p[0], dict)
                else self.encode(p) for p in prompts]
        return self._collect(self._stream_rows(rows, params, seeds), len(rows))

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
        params, seeds = self._params(sampling_kwargs, params, 1)
        ids = self.chat_ids(messages, max_history=max_history, tools=tools,
                            max_new_tokens=params.max_new_tokens, **(template_kwargs or {}))
        return self._stream_rows([ids], params, seeds)

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None, *,
             max_history: int | None = None, tools: list[dict] | None = None,
             template_kwargs: dict[str, Any] | None = None,
             **sampling_kwargs: Any) -> GenerationResult:
        """Answer a conversation: ``[{"role": "user", "content": "你好"}]`` → GenerationResult."""
        chunks = self.stream_chat(messages, params, max_history=max_history, tools=tools,
                                  template_kwargs=template_kwargs, **sampling_kwargs)
        return self._collect(chunks, 1)[0]

    # ---- the loop ----------------------------------------------------------------------------
    @staticmethod
    def _params(kwargs: dict[str, Any], params: SamplingParams | None, rows: int
                ) -> tuple[SamplingParams, list[int | None]]:
        """SamplingParams plus one seed per row: ``seed=s`` for every row, a list per row, None
        a fresh random seed per row."""
        seed = kwargs.pop("seed", None)
        if isinstance(seed, (list, tuple)):
            if len(seed) != rows:
                raise ValueError(f"seed is a list of {len(seed)} seeds for {rows} prompts; give "
                                 f"one per prompt, or one int for all")
            for s in seed:
                SamplingParams(seed=s)  # the same check as a single seed
            params = SamplingParams.from_kwargs(params, **kwargs)
            return params, list(seed)
        params = SamplingParams.from_kwargs(params, seed=seed, **kwargs)
        return params, [params.seed] * rows

    def _budget(self, rows: list[list[int]], params: SamplingParams) -> int:
        """Tokens that may be generated: max_new_tokens, clamped to the context window."""
        window = self.config.max_position_embeddings
        longest = max(map(len, rows))
        if longest > window or (longest == window and params.max_new_tokens):
            raise ValueError(f"prompt is {longest} tokens, longer than the context window of "
                             f"{window} tokens; shorten the input (in a chat: keep fewer turns)")
        return min(params.max_new_tokens, window - longest)

    def _stream_rows(self, rows: list[list[int]], params: SamplingParams,
                     seeds: list[int | None]) -> Iterator[StreamChunk]:
        budget = self._budget(rows, params)  # checked now, at the call
        return self._stream_rows_checked(rows, params, seeds, budget)

    def _stream_rows_checked(self, rows: list[list[int]], params: SamplingParams,
                             seeds: list[int | None], budget: int) -> Iterator[StreamChunk]:
        outs = [RequestOutput(self.tokenizer, params, len(ids), budget, i)
                for i, ids in enumerate(rows)]
        with self.exclusive():
            loop = TokenLoop(self, len(rows), max(map(len, rows)) + budget,
                             chunk=PREFILL_TOKENS) if budget else None
            try:
                index = {id(loop.add(ids, params, seed)): i
                         for i, (ids, seed) in enumerate(zip(rows, seeds))} if loop else {}
                while loop is not None and loop.rows:
                    for row, token in loop.step():
                        out = outs[index[id(row)]]
                        chunk = out.add(token, row.logprob)
                        if chunk is not None:
                            yield chunk
                        if out.done:
                            loop.remove(row)  # leaves the batch: no more decode work for it
            finally:
                if loop is not None:
                    loop.close()
        for out in outs:
            yield out.final()

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
            if chunk.logprobs is not None:
                results[chunk.index].logprobs = (results[chunk.index].logprobs or []) + \
                    chunk.logprobs
        for i, r in enumerate(results):
            r.text = "".join(parts[i])
        return results

    def describe(self) -> dict[str, Any]:
        """What is loaded: backend, model kind and sizes, which decode step runs (used by
        ``minimind info``/``bench`` and /v1/models)."""
        c = self.config
        return {"name": self.name, "backend": self.backend, "kind": c.kind,
                "parameters": c.num_parameters(), **self.info, "lora": self.lora_path}
