"""An OpenAI-compatible HTTP server and a web chat page for one loaded model.

    minimind serve --model out/full_sft_768.pth          # or: python -m minimind_core.server
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "你好"}], "stream": true}'

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, and the
chat page at /. Generation runs in one worker thread (``worker.py``); ``<think>`` and
``<tool_call>`` parsing lives in ``reasoning.py``; request checking and response bodies in
``openai_schema.py``. The library shape follows mlx-lm: ``create_app`` (the library function),
``configure_parser`` + ``run`` (what ``minimind serve`` calls) and ``main``.
"""

import argparse
import asyncio
import hmac
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .commands.common import add_model_args, load_engine
from .openai_schema import (
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
from .params import SamplingParams, StreamChunk
from .reasoning import ReplyDelta, ReplyParser, prompt_opens_think
from .worker import GenerationWorker, Job, QueueFull

if TYPE_CHECKING:
    from fastapi import FastAPI, Request

    from .engine import Engine

__all__ = ["DEFAULT_SAMPLING", "configure_parser", "create_app", "main", "run", "serve",
           "serve_main"]

log = logging.getLogger("minimind_core.server")
WEB_DIR = Path(__file__).resolve().parent / "web"
MAX_BODY_BYTES = 16 * 1024 * 1024
# Upstream MiniMind's own server defaults; a request's temperature / top_p override them.
DEFAULT_SAMPLING = SamplingParams(max_new_tokens=512, temperature=0.7, top_p=0.92)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _is_engine(obj: Any) -> bool:
    from .engine import Engine

    return isinstance(obj, Engine)


@dataclass
class _State:
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


async def _collect(state: _State, job: Job, request: "Request") -> tuple[str, StreamChunk | None]:
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


async def chat_completions(state: _State, request: "Request"):
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


async def completions(state: _State, request: "Request"):
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


def _models(state: _State) -> dict[str, Any]:
    engine = state.ready()
    info = engine.describe()
    cards = [model_card(state.name, created=state.created, backend=engine.backend,
                        kind=info.get("kind"), context_window=engine.config.max_position_embeddings,
                        lora=engine.lora_path)]
    if state.lora_id():
        cards.append(model_card(state.lora_id(), created=state.created, parent=state.name,
                                root=str(engine.lora_path)))
    return {"object": "list", "data": cards}


# -- the app ---------------------------------------------------------------------------------


def create_app(engine_or_factory: "Engine | Callable[[], Engine]", *, model_name: str | None = None,
               api_key: str | None = None, cors: Sequence[str] | str | None = None,
               max_tokens_cap: int | None = None, max_queue: int = 64,
               defaults: SamplingParams | None = None) -> "FastAPI":
    """The FastAPI app serving one model (OpenAI API under /v1, the chat page at /).

    Args:
        engine_or_factory: a loaded Engine, or a callable returning one (called at startup).
        model_name: the id clients use in ``model`` (default: the engine's name).
        api_key: when set, /v1 routes need ``Authorization: Bearer <api_key>`` (else 401).
        cors: allowed browser origins (``"*"`` for any); None adds no CORS headers.
        max_tokens_cap: the most tokens one request may ask for (more is a 400).
        max_queue: requests that may wait while one generates; more get a 503.
        defaults: sampling used where a request is silent (``DEFAULT_SAMPLING``).
    """
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.exceptions import HTTPException as StarletteHTTPException

    given = _is_engine(engine_or_factory)
    base = defaults or DEFAULT_SAMPLING
    if max_tokens_cap is not None:
        if max_tokens_cap < 1:
            raise ValueError(f"max_tokens_cap must be >= 1, got {max_tokens_cap}")
        base = SamplingParams.from_kwargs(
            base, max_new_tokens=min(base.max_new_tokens, max_tokens_cap))
    state = _State(factory=None if given else engine_or_factory,
                   engine=engine_or_factory if given else None, model_name=model_name,
                   api_key=api_key, max_tokens_cap=max_tokens_cap, max_queue=max_queue,
                   defaults=base)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is None:
            state.engine = await asyncio.to_thread(state.factory)
        state.get_worker()
        try:
            yield
        finally:  # uvicorn got SIGTERM/SIGINT and the connections are closed (or timed out)
            if state.worker is not None:
                await asyncio.to_thread(state.worker.close, 10.0)

    app = FastAPI(title="minimind-core", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.minimind = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(str(e.detail), code=code), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(error_body(str(e.errors()), code="invalid_type"), status_code=422)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}",
                                       type="server_error"), status_code=500)

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise APIError(401, "You didn't provide an API key; send it as "
                                "'Authorization: Bearer <key>'", code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 state.api_key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    auth = [Depends(authorize)]

    @app.post("/v1/chat/completions", dependencies=auth)
    async def _chat(request: Request):
        return await chat_completions(state, request)

    @app.post("/v1/completions", dependencies=auth)
    async def _completions(request: Request):
        return await completions(state, request)

    @app.get("/v1/models", dependencies=auth)
    async def _list_models():
        return _models(state)

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def _get_model(model_id: str):
        state.check_model(model_id)
        return next(m for m in _models(state)["data"] if m["id"] == model_id)

    @app.get("/health")
    async def _health():
        worker = state.worker
        engine = state.engine
        return {"status": "ok" if engine is not None else "loading",
                "model": state.name, "auth": state.api_key is not None,
                "max_tokens": state.max_tokens_cap, "default_max_tokens":
                state.defaults.max_new_tokens, "context_window":
                engine.config.max_position_embeddings if engine is not None else None,
                "running": int(worker is not None and worker.running is not None),
                "waiting": worker.waiting if worker is not None else 0}

    @app.get("/", include_in_schema=False)
    async def _page():
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    if cors:
        from fastapi.middleware.cors import CORSMiddleware

        origins = [cors] if isinstance(cors, str) else list(cors)
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"],
                           allow_headers=["*"])
    return app


# -- command line ----------------------------------------------------------------------------


def _origins(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [o.strip() for v in values for o in v.split(",") if o.strip()]


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``serve`` options to ``parser`` (used by ``minimind serve`` and ``main``)."""
    model = parser.add_argument_group("model")
    model.add_argument("-m", "--model", default=None, metavar="PATH",
                       help="a .pth/.safetensors file or a transformers/MLX folder "
                            "(default: the embedded demo model)")
    model.add_argument("--backend", default="auto", help="torch, mlx or auto (default: auto)")
    model.add_argument("--device", default=None, help="cuda, mps or cpu (default: best found)")
    model.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")
    model.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder (default: found "
                                                         "beside the weights)")
    model.add_argument("--lora", default=None, metavar="PATH", help="an upstream LoRA file applied to every "
                                                    "request")
    model.add_argument("--served-model-name", default=None,
                       help="the model id clients send (default: the weights' file name)")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default: "
                                                            "127.0.0.1; 0.0.0.0 for all)")
    server.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    server.add_argument("--max-tokens", type=int, default=None,
                        help="the most tokens one request may generate; also the default")
    server.add_argument("--temperature", type=float, default=DEFAULT_SAMPLING.temperature,
                        help="temperature when a request gives none (default: %(default)s)")
    server.add_argument("--top-p", type=float, default=DEFAULT_SAMPLING.top_p,
                        help="top_p when a request gives none (default: %(default)s)")
    server.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer <key>' on /v1 routes")
    server.add_argument("--cors", action="append", default=None, metavar="ORIGINS",
                        help="allowed browser origins, comma-separated or repeated ('*' = any)")
    server.add_argument("--max-queue", type=int, default=64,
                        help="requests that may wait while one generates (default: 64)")
    server.add_argument("--shutdown-timeout", type=float, default=5.0,
                        help="seconds in-flight requests get to finish on SIGTERM (default: 5)")
    server.add_argument("--log-level", default="info", help="uvicorn log level (default: info)")
    return parser


def serve(app: "FastAPI", host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          shutdown_timeout: float = 5.0) -> None:
    """Run ``app`` with uvicorn until SIGINT/SIGTERM (in-flight requests get
    ``shutdown_timeout`` seconds, then their generations are cancelled)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout)
    uvicorn.Server(config).run()


# Upstream eval_llm.py's path flags; `minimind serve` resolves them into --model/--lora first.
_UPSTREAM_FLAGS = ("load_from", "save_dir", "weight", "lora_weight", "use_moe")


def _load_engine(args: argparse.Namespace) -> "Engine":
    if getattr(args, "model", None) and any(getattr(args, f, None) not in (None, "None")
                                            for f in _UPSTREAM_FLAGS):
        # Already resolved by `minimind serve`: load that path, not the flags a second time.
        args = argparse.Namespace(**{**vars(args), **dict.fromkeys(_UPSTREAM_FLAGS)})
    return load_engine(args)


def run(args: argparse.Namespace) -> int:
    """Load the model the flags name (see ``configure_parser``; with no model, the embedded
    demo) and serve it until SIGINT/SIGTERM. Raises ValueError/OSError/ImportError when the
    model cannot be loaded."""
    defaults = SamplingParams(max_new_tokens=DEFAULT_SAMPLING.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p)
    engine = _load_engine(args)
    app = create_app(engine, model_name=args.served_model_name, api_key=args.api_key,
                     cors=_origins(args.cors), max_tokens_cap=args.max_tokens,
                     max_queue=args.max_queue, defaults=defaults)
    name = args.served_model_name or engine.name
    print(f"Serving {name} ({engine.backend}) on http://{args.host}:{args.port} "
          f"— chat page at /, OpenAI API at /v1", file=sys.stderr, flush=True)
    serve(app, args.host, args.port, log_level=args.log_level,
          shutdown_timeout=args.shutdown_timeout)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m minimind_core.server``: the server's flags plus every model
    flag ``minimind serve`` takes (upstream's --save_dir/--weight, --q-bits, overrides)."""
    parser = configure_parser(argparse.ArgumentParser(
        prog="python -m minimind_core.server",
        description="Serve a MiniMind model over an OpenAI-compatible HTTP API with a web chat "
                    "page (the same as `minimind serve`)."))
    add_model_args(parser, skip=frozenset(parser._option_string_actions))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m minimind_core.server [options]``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError, ImportError) as e:
        print(f"minimind serve: error: {e}", file=sys.stderr)
        return 1


serve_main = main

if __name__ == "__main__":
    sys.exit(main())
