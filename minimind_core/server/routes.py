"""What each OpenAI endpoint does: check the request, queue the generation, answer in
OpenAI's shape (JSON, or Server-Sent Events for ``stream: true``).

Every check happens before the first byte of the answer: a request is parsed, its prompt built
and fitted to the context, then queued, and the status line goes out only once its generation
has produced a first chunk (or failed: then the status says so). So a streamed request never
gets 200 followed by an error event for a bad input, and a queued request can still get 503
when the server shuts down. A stream cut short by shutdown ends with an error event and
``data: [DONE]``.

``app.py`` builds the FastAPI app around these and runs it; ``schema.py`` checks
requests and builds bodies; ``reasoning.py`` splits ``<think>`` / ``<tool_call>`` out of replies;
``worker.py`` runs generations off the event loop.
"""

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..params import SamplingParams, StreamChunk, TokenLogprob
from ..reasoning import ReplyDelta, ReplyParser, prompt_opens_think
from .logprobs import TokenText, chat_logprobs
from .scheduler import Scheduler
from .schema import (
    APIError,
    ChatRequest,
    chat_chunk,
    chat_completion,
    choice,
    error_body,
    model_card,
    new_id,
    parse_chat_request,
    parse_json_body,
    usage_body,
)
from .worker import SHUTDOWN, Job, QueueFull

if TYPE_CHECKING:
    from fastapi import Request

    from ..engine import Engine

__all__ = ["ServerState", "cancel_all", "chat_completions", "collect_all", "compat_chat",
           "first_chunks", "list_models", "merged"]

log = logging.getLogger("minimind_core.server")


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


@dataclass
class ServerState:
    """Everything the routes share: the engine (loaded at startup when given a factory),
    the scheduler (continuous batching), and the server's settings."""

    factory: "Callable[[], Engine] | None"
    engine: "Engine | None"
    model_name: str | None
    api_key: str | None
    max_tokens_cap: int | None
    max_queue: int
    defaults: SamplingParams
    think_default: bool = False  # the page's "think first" switch starts on
    created: int = field(default_factory=lambda: int(time.time()))
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 512
    prefix_cache_mb: float = 512.0  # 0 = no prefix cache
    worker: Scheduler | None = None
    on_token: "Callable[[Any, int], None] | None" = None  # per drawn token (metrics)
    _names: TokenText | None = None

    def ready(self) -> "Engine":
        if self.engine is None:
            raise APIError(503, "the model is still loading; retry in a moment",
                           code="model_loading")
        return self.engine

    def get_worker(self) -> Scheduler:
        if self.worker is None:
            self.worker = Scheduler(self.ready(), max_num_seqs=self.max_num_seqs,
                                    max_queue=self.max_queue,
                                    max_num_batched_tokens=self.max_num_batched_tokens,
                                    prefix_cache_mb=self.prefix_cache_mb,
                                    on_token=self.on_token)
        return self.worker

    @property
    def name(self) -> str:
        return self.model_name or (self.engine.name if self.engine is not None else "minimind")

    def lora_id(self) -> str | None:
        path = getattr(self.engine, "lora_path", None)
        return Path(str(path)).stem if path else None

    def model_ids(self) -> list[str]:
        return [self.name, *([self.lora_id()] if self.lora_id() else [])]

    def check_model(self, requested: str | None) -> str:
        if requested is None or requested in self.model_ids():
            return requested or self.name
        raise APIError(404, f"The model '{requested}' does not exist; this server serves "
                            f"{', '.join(repr(m) for m in self.model_ids())}",
                       param="model", code="model_not_found")

    def submit(self, ids: list[int], params: SamplingParams, n: int = 1) -> list[Job]:
        """Queue ``n`` choices of one prompt (they share its prefill)."""
        worker = self.get_worker()
        try:
            return worker.submit_n(ids, params, n)
        except QueueFull as e:
            if worker.closed:
                raise _shutting_down() from e
            raise APIError(503, f"the server is busy: {e}", code="server_busy") from e
        except ValueError as e:
            raise APIError(400, str(e), param="n", code="invalid_value") from e

    def token_text(self) -> TokenText:
        """Token texts and bytes for logprobs (cached per engine)."""
        engine = self.ready()
        if self._names is None or self._names.tokenizer is not engine.tokenizer:
            self._names = TokenText(engine.tokenizer)
        return self._names

    def begin_shutdown(self, grace: float) -> None:
        """The server is stopping (SIGTERM): take no new generations, answer every queued
        request 503 now, and let the running one go on for ``grace`` seconds before it is
        cancelled (its stream then ends with an error event). Call from the event loop."""
        if self.worker is None:
            return
        for running in self.worker.drain():
            asyncio.get_running_loop().call_later(max(grace, 0.0), self.worker.cancel,
                                                  running, SHUTDOWN)


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down; retry against another instance or "
                         "once it is back", code="server_shutting_down")


# -- the streaming response ------------------------------------------------------------------


def _event_stream(content: AsyncIterator[str], on_close: Callable[[], None]):
    """An SSE StreamingResponse that calls ``on_close`` however it ends (done, disconnect,
    shutdown), so the generation behind it never outlives its client."""
    from starlette.responses import StreamingResponse

    class EventStream(StreamingResponse):
        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                on_close()

    return EventStream(content, media_type="text/event-stream",
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _watch_disconnect(request: "Request", cancel: Callable[[], None]) -> None:
    """For non-streaming requests: cancel the generation when the client goes away."""
    while True:
        await asyncio.sleep(0.1)
        if await request.is_disconnected():
            cancel()
            return


async def _first_chunk(state: ServerState, job: Job, request: "Request") -> StreamChunk:
    """Wait (while the job queues and starts) for its first chunk; the client leaving cancels
    it. A failed start, a shutdown or a vanished client become an APIError here, before any
    byte of the answer is sent."""
    worker = state.get_worker()
    watcher = asyncio.create_task(_watch_disconnect(request, partial(worker.cancel, job)))
    try:
        first = await job.next()
    except ValueError as e:  # the engine refused the request
        raise APIError(400, str(e)) from e
    except Exception as e:
        log.exception("generation failed")
        raise APIError(500, f"generation failed: {type(e).__name__}: {e}") from e
    finally:
        watcher.cancel()
    if first is None:
        raise _ended_early(job)
    return first


def _ended_early(job: Job) -> APIError:
    if job.reason == SHUTDOWN:
        return _shutting_down()
    return APIError(499, "the client closed the request", code="client_closed")


async def _collect(state: ServerState, job: Job, request: "Request",
                   first: StreamChunk) -> tuple[str, StreamChunk, list[TokenLogprob]]:
    """All text of a job, its final chunk (APIError when it ended without one) and the
    logprobs of its tokens (with ``params.logprobs``)."""
    worker = state.get_worker()
    watcher = asyncio.create_task(_watch_disconnect(request, partial(worker.cancel, job)))
    parts, final = [first.text], first if first.finish_reason is not None else None
    logprobs = list(first.logprobs or [])
    try:
        while final is None and (chunk := await job.next()) is not None:
            parts.append(chunk.text)
            logprobs += chunk.logprobs or []
            if chunk.finish_reason is not None:
                final = chunk
    except ValueError as e:
        raise APIError(400, str(e)) from e
    finally:
        watcher.cancel()
        worker.cancel(job)
    if final is None:
        raise _ended_early(job)
    return "".join(parts), final, logprobs


async def first_chunks(state: ServerState, jobs: list[Job],
                       request: "Request") -> list[StreamChunk]:
    """The first chunk of every job (all choices of a request); any failure cancels them all."""
    try:
        return list(await asyncio.gather(*(_first_chunk(state, j, request) for j in jobs)))
    except BaseException:
        cancel_all(state, jobs)
        raise


def cancel_all(state: ServerState, jobs: list[Job]) -> None:
    worker = state.get_worker()
    for job in jobs:
        worker.cancel(job)


async def collect_all(state: ServerState, jobs: list[Job], request: "Request",
                      firsts: list[StreamChunk]):
    """``_collect`` for every job at once, in order."""
    try:
        return list(await asyncio.gather(*(_collect(state, j, request, f)
                                           for j, f in zip(jobs, firsts))))
    finally:
        cancel_all(state, jobs)


async def merged(streams: list[AsyncIterator[StreamChunk]]
                 ) -> AsyncIterator[tuple[int, StreamChunk]]:
    """(choice index, chunk) from several streams as they come; an error in one is raised."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[StreamChunk]) -> None:
        try:
            async for chunk in stream:
                await queue.put((i, chunk, None))
        except Exception as e:
            await queue.put((i, None, e))
            return
        await queue.put((i, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, chunk, error = await queue.get()
            if error is not None:
                raise error
            if chunk is None:
                left -= 1
                continue
            yield i, chunk
    finally:
        for task in tasks:
            task.cancel()


async def _rest(first: StreamChunk, job: Job) -> AsyncIterator[StreamChunk]:
    yield first
    if first.finish_reason is None:
        async for chunk in job:
            yield chunk


def _finish_reason(parser: ReplyParser, reason: str) -> str:
    return "tool_calls" if parser.tool_calls and reason == "stop" else reason


def _message(delta: ReplyDelta) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant",
                               "content": delta.content or (None if delta.tool_calls else "")}
    if delta.reasoning:
        message["reasoning_content"] = delta.reasoning
    if delta.tool_calls:
        message["tool_calls"] = [c.to_openai() for c in delta.tool_calls]
    return message


# -- route bodies ----------------------------------------------------------------------------


async def _read_json(request: "Request") -> Any:
    """The body (already size-checked by BodyGuard), parsed off the event loop."""
    from fastapi.concurrency import run_in_threadpool

    return await run_in_threadpool(parse_json_body, await request.body())


def _context_error(e: ValueError, param: str) -> APIError:
    """A prompt that cannot fit is a 400 ``context_length_exceeded`` (OpenAI's and vLLM's
    answer); any other ValueError a plain 400."""
    message = str(e)
    if "context window" in message or "no room for a prompt" in message:
        return APIError(400, message, param=param, code="context_length_exceeded")
    return APIError(400, message, param=param)


def _chat_prompt(engine: "Engine", req: ChatRequest) -> tuple[list[int], bool]:
    """The prompt ids (oldest turns dropped to fit; 400 when even the last turn cannot) and
    whether they leave a ``<think>`` block open, so the reply starts inside it."""
    try:
        ids = engine.chat_ids(req.messages, tools=req.tools,
                              max_new_tokens=req.params.max_new_tokens, **req.template_kwargs)
    except TypeError as e:  # a chat_template_kwargs key that clashes with an argument
        raise APIError(400, f"bad chat_template_kwargs: {e}",
                       param="chat_template_kwargs") from e
    except ValueError as e:
        raise _context_error(e, "messages") from e
    return ids, prompt_opens_think(engine.tokenizer.decode(ids, skip_special_tokens=False))


async def _start_chat(state: ServerState, engine: "Engine", req: ChatRequest,
                      request: "Request") -> tuple[list[Job], list[StreamChunk], bool, int]:
    """Build the prompt, queue its ``n`` generations and wait for their first chunks."""
    from fastapi.concurrency import run_in_threadpool

    ids, in_think = await run_in_threadpool(_chat_prompt, engine, req)
    # the ids just checked are the ones generated from (no second render in the scheduler)
    jobs = state.submit(ids, req.params, req.n)
    return jobs, await first_chunks(state, jobs, request), in_think, len(ids)


async def chat_completions(state: ServerState, request: "Request"):
    """POST /v1/chat/completions."""
    from fastapi.responses import JSONResponse

    engine = state.ready()
    req = parse_chat_request(await _read_json(request), defaults=state.defaults,
                             window=engine.config.max_position_embeddings,
                             max_tokens_cap=state.max_tokens_cap)
    model = state.check_model(req.model)
    jobs, firsts, in_think, n_prompt = await _start_chat(state, engine, req, request)
    parsers = [ReplyParser(parse_tools=req.parse_tools, in_think=in_think) for _ in jobs]
    rid, created = new_id("chatcmpl"), int(time.time())
    want = req.params.logprobs is not None
    if req.stream:
        events = _chat_events([_rest(f, j) for f, j in zip(firsts, jobs)], jobs, parsers,
                              state.token_text() if want else None, rid, created, model,
                              req.include_usage, n_prompt)
        return _event_stream(events, partial(cancel_all, state, jobs))
    choices, n_out = [], 0
    for i, (parser, (text, final, logprobs)) in enumerate(
            zip(parsers, await collect_all(state, jobs, request, firsts))):
        delta = parser.feed(text)
        delta += parser.finish()
        n_out += final.usage.completion_tokens
        choices.append(choice(i, _finish_reason(parser, final.finish_reason),
                              chat_logprobs(state.token_text(), logprobs) if want else None,
                              message=_message(delta)))
    return JSONResponse(chat_completion(rid, created, model, None, None,
                                        usage_body(n_prompt, n_out), choices=choices))


async def compat_chat(state: ServerState, request: "Request"):
    """POST /chat: upstream MiniMind's FastAPI example, ``{messages, max_tokens, temperature}``
    → ``{"response": text}`` (the raw reply text); other OpenAI fields work as in /v1."""
    from fastapi.responses import JSONResponse

    engine = state.ready()
    req = parse_chat_request(await _read_json(request), defaults=state.defaults,
                             window=engine.config.max_position_embeddings,
                             max_tokens_cap=state.max_tokens_cap)
    if req.stream:
        raise APIError(400, "/chat answers in one piece; for streaming use "
                            "POST /v1/chat/completions", param="stream", code="invalid_value")
    req.n = 1
    jobs, firsts, _, _ = await _start_chat(state, engine, req, request)
    (text, _, _), = await collect_all(state, jobs, request, firsts)
    return JSONResponse({"response": text})


def _cut_short(job: Job) -> str:
    """The error event of a stream that ended without a finish_reason."""
    if job.reason == SHUTDOWN:
        return _sse(_shutting_down().body())
    return _sse(error_body("the generation was cancelled", type="server_error",
                           code="cancelled"))


async def _chat_events(streams: list[AsyncIterator[StreamChunk]], jobs: list[Job],
                       parsers: list[ReplyParser], names: TokenText | None, rid: str,
                       created: int, model: str, include_usage: bool,
                       n_prompt: int) -> AsyncIterator[str]:
    chunk_of = partial(chat_chunk, rid, created, model, include_usage=include_usage)
    for i in range(len(jobs)):
        yield _sse(chunk_of({"role": "assistant", "content": ""}, index=i))
    n_calls = [0] * len(jobs)
    pending: list[list[TokenLogprob]] = [[] for _ in jobs]  # logprobs of held-back text
    finished, n_out = set(), 0

    def take(i: int) -> dict[str, Any] | None:
        if names is None:
            return None
        out, pending[i] = chat_logprobs(names, pending[i]), []
        return out

    try:
        async for i, chunk in merged(streams):
            parser = parsers[i]
            pending[i] += chunk.logprobs or []
            delta = parser.feed(chunk.text)
            if chunk.finish_reason is not None:
                delta += parser.finish()
            if delta.reasoning:
                yield _sse(chunk_of({"reasoning_content": delta.reasoning}, index=i,
                                    logprobs=take(i)))
            if delta.content:
                yield _sse(chunk_of({"content": delta.content}, index=i, logprobs=take(i)))
            for call in delta.tool_calls:
                yield _sse(chunk_of({"tool_calls": [call.to_openai(index=n_calls[i])]},
                                    index=i))
                n_calls[i] += 1
            if chunk.finish_reason is not None:
                finished.add(i)
                n_out += chunk.usage.completion_tokens
                last = take(i) if pending[i] else None
                yield _sse(chunk_of({}, _finish_reason(parser, chunk.finish_reason), index=i,
                                    logprobs=last))
        if len(finished) < len(jobs):
            yield _cut_short(next(j for i, j in enumerate(jobs) if i not in finished))
        elif include_usage:
            yield _sse(chat_chunk(rid, created, model, None, include_usage=True,
                                  usage=usage_body(n_prompt, n_out)))
    except Exception as e:  # headers are sent: report in the stream, as vLLM does
        log.exception("generation failed")
        yield _sse(error_body(str(e), type="server_error"))
    yield "data: [DONE]\n\n"


def list_models(state: ServerState) -> dict[str, Any]:
    engine = state.ready()
    info = engine.describe()
    cards = [model_card(state.name, created=state.created, backend=engine.backend,
                        kind=info.get("kind"), context_window=engine.config.max_position_embeddings,
                        lora=engine.lora_path)]
    if state.lora_id():
        cards.append(model_card(state.lora_id(), created=state.created, parent=state.name,
                                root=str(engine.lora_path)))
    return {"object": "list", "data": cards}
