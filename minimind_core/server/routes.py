"""What each OpenAI endpoint does: check the request, queue the generation, answer in
OpenAI's shape (JSON, or Server-Sent Events for ``stream: true``).

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

from ..params import SamplingParams, StreamChunk
from ..reasoning import ReplyDelta, ReplyParser, prompt_opens_think
from .schema import (
    APIError,
    ChatRequest,
    chat_chunk,
    chat_completion,
    completion,
    completion_chunk,
    error_body,
    model_card,
    new_id,
    parse_chat_request,
    parse_completion_request,
    usage_body,
)
from .worker import GenerationWorker, Job, QueueFull

if TYPE_CHECKING:
    from fastapi import Request

    from ..engine import Engine

__all__ = ["MAX_BODY_BYTES", "ServerState", "chat_completions", "completions", "list_models"]

log = logging.getLogger("minimind_core.server")
MAX_BODY_BYTES = 16 * 1024 * 1024


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


@dataclass
class ServerState:
    """Everything the routes share: the engine (loaded at startup when given a factory),
    the worker, and the server's settings."""

    factory: "Callable[[], Engine] | None"
    engine: "Engine | None"
    model_name: str | None
    api_key: str | None
    max_tokens_cap: int | None
    max_queue: int
    defaults: SamplingParams
    created: int = field(default_factory=lambda: int(time.time()))
    worker: GenerationWorker | None = None

    def ready(self) -> "Engine":
        if self.engine is None:
            raise APIError(503, "the model is still loading; retry in a moment",
                           code="model_loading")
        return self.engine

    def get_worker(self) -> GenerationWorker:
        if self.worker is None:
            self.worker = GenerationWorker(self.max_queue)
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

    def submit(self, start: Callable[[], Any]) -> Job:
        try:
            return self.get_worker().submit(start)
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {e}", code="server_busy") from e


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


async def _collect(state: ServerState, job: Job, request: "Request") -> tuple[str, StreamChunk | None]:
    """All text of a job and its final chunk (None when the client left first)."""
    worker = state.get_worker()
    watcher = asyncio.create_task(_watch_disconnect(request, partial(worker.cancel, job)))
    parts, final = [], None
    try:
        async for chunk in job:
            parts.append(chunk.text)
            if chunk.finish_reason is not None:
                final = chunk
    except ValueError as e:
        raise APIError(400, str(e)) from e
    finally:
        watcher.cancel()
        worker.cancel(job)
    return "".join(parts), final


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
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is {int(length)} bytes; the limit is "
                            f"{MAX_BODY_BYTES}", code="request_too_large")
    raw = await request.body()
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object",
                       code="invalid_body")
    try:
        return json.loads(raw)
    except ValueError as e:
        raise APIError(400, f"could not parse the JSON body: {e}", code="invalid_json") from e


def _chat_prompt(engine: "Engine", req: ChatRequest) -> bool:
    """Check the prompt fits (413 when even the last turn cannot) and say whether it leaves a
    ``<think>`` block open, so the reply starts inside it."""
    try:
        ids = engine.chat_ids(req.messages, tools=req.tools,
                              max_new_tokens=req.params.max_new_tokens, **req.template_kwargs)
    except TypeError as e:  # a chat_template_kwargs key that clashes with an argument
        raise APIError(400, f"bad chat_template_kwargs: {e}",
                       param="chat_template_kwargs") from e
    except ValueError as e:
        if "context window" in str(e):
            raise APIError(413, str(e), param="messages", code="context_length_exceeded") from e
        raise APIError(400, str(e), param="messages") from e
    return prompt_opens_think(engine.tokenizer.decode(ids, skip_special_tokens=False))


async def chat_completions(state: ServerState, request: "Request"):
    """POST /v1/chat/completions."""
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    engine = state.ready()
    req = parse_chat_request(await _read_json(request), defaults=state.defaults,
                             window=engine.config.max_position_embeddings,
                             max_tokens_cap=state.max_tokens_cap)
    model = state.check_model(req.model)
    in_think = await run_in_threadpool(_chat_prompt, engine, req)
    parser = ReplyParser(parse_tools=req.parse_tools, in_think=in_think)
    job = state.submit(partial(engine.stream_chat, req.messages, req.params, tools=req.tools,
                               template_kwargs=req.template_kwargs))
    rid, created = new_id("chatcmpl"), int(time.time())
    if req.stream:
        events = _chat_events(job, parser, rid, created, model, req.include_usage)
        return _event_stream(events, partial(state.get_worker().cancel, job))
    text, final = await _collect(state, job, request)
    if final is None:  # the client left; nobody reads this
        raise APIError(499, "the client closed the request", code="client_closed")
    delta = parser.feed(text)
    delta += parser.finish()
    return JSONResponse(chat_completion(
        rid, created, model, _message(delta), _finish_reason(parser, final.finish_reason),
        usage_body(final.usage.prompt_tokens, final.usage.completion_tokens)))


async def _chat_events(job: Job, parser: ReplyParser, rid: str, created: int, model: str,
                       include_usage: bool) -> AsyncIterator[str]:
    chunk_of = partial(chat_chunk, rid, created, model, include_usage=include_usage)
    yield _sse(chunk_of({"role": "assistant", "content": ""}))
    n_calls = 0
    try:
        async for chunk in job:
            delta = parser.feed(chunk.text)
            if chunk.finish_reason is not None:
                delta += parser.finish()
            if delta.reasoning:
                yield _sse(chunk_of({"reasoning_content": delta.reasoning}))
            if delta.content:
                yield _sse(chunk_of({"content": delta.content}))
            for call in delta.tool_calls:
                yield _sse(chunk_of({"tool_calls": [call.to_openai(index=n_calls)]}))
                n_calls += 1
            if chunk.finish_reason is not None:
                yield _sse(chunk_of({}, _finish_reason(parser, chunk.finish_reason)))
                if include_usage:
                    yield _sse(chat_chunk(rid, created, model, None, include_usage=True,
                                          usage=usage_body(chunk.usage.prompt_tokens,
                                                           chunk.usage.completion_tokens)))
    except Exception as e:  # headers are sent: report in the stream, as vLLM does
        log.exception("generation failed")
        yield _sse(error_body(str(e), type="server_error"))
    yield "data: [DONE]\n\n"


async def completions(state: ServerState, request: "Request"):
    """POST /v1/completions (raw prompt, no chat template)."""
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    engine = state.ready()
    req = parse_completion_request(await _read_json(request), defaults=state.defaults,
                                   window=engine.config.max_position_embeddings,
                                   max_tokens_cap=state.max_tokens_cap)
    model = state.check_model(req.model)
    try:
        ids = await run_in_threadpool(engine.encode, req.prompt)
    except ValueError as e:
        raise APIError(400, str(e), param="prompt") from e
    window = engine.config.max_position_embeddings
    if len(ids) >= window:
        raise APIError(413, f"prompt is {len(ids)} tokens, longer than the context window of "
                            f"{window} tokens; shorten the prompt", param="prompt",
                       code="context_length_exceeded")
    echo = (req.prompt if isinstance(req.prompt, str) else engine.tokenizer.decode(ids)) \
        if req.echo else ""
    job = state.submit(partial(engine.stream, ids, req.params))
    rid, created = new_id("cmpl"), int(time.time())
    if req.stream:
        events = _completion_events(job, rid, created, model, req.include_usage, echo)
        return _event_stream(events, partial(state.get_worker().cancel, job))
    text, final = await _collect(state, job, request)
    if final is None:
        raise APIError(499, "the client closed the request", code="client_closed")
    return JSONResponse(completion(rid, created, model, echo + text, final.finish_reason,
                                   usage_body(final.usage.prompt_tokens,
                                              final.usage.completion_tokens)))


async def _completion_events(job: Job, rid: str, created: int, model: str,
                             include_usage: bool, echo: str) -> AsyncIterator[str]:
    chunk_of = partial(completion_chunk, rid, created, model, include_usage=include_usage)
    if echo:
        yield _sse(chunk_of(echo))
    try:
        async for chunk in job:
            if chunk.text or chunk.finish_reason is not None:
                yield _sse(chunk_of(chunk.text, chunk.finish_reason))
            if chunk.finish_reason is not None and include_usage:
                yield _sse(completion_chunk(rid, created, model, None, include_usage=True,
                                            usage=usage_body(chunk.usage.prompt_tokens,
                                                             chunk.usage.completion_tokens)))
    except Exception as e:
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
