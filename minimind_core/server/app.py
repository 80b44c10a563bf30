"""``create_app``: the FastAPI app serving one model (OpenAI API under /v1, upstream's /chat,
the page at /), behind the request guards of ``guard.py``."""

import asyncio
import hmac
import logging
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..params import SamplingParams
from .completions import completions
from .guard import (
    DEFAULT_MAX_BODY_MB,
    WILDCARD_BINDS,
    BodyGuard,
    HostGuard,
    OriginGuard,
    check_origins,
    default_hosts,
)
from .metrics import CONTENT_TYPE, Metrics
from .routes import ServerState, chat_completions, compat_chat, list_models
from .schema import APIError, error_body
from .tokenization import detokenize, tokenize, tokenizer_info

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..engine import Engine

__all__ = ["DEFAULT_SAMPLING", "WEB_DIR", "create_app"]

log = logging.getLogger("minimind_core.server")
WEB_DIR = Path(__file__).resolve().parent / "web"
# Upstream MiniMind's own server defaults; a request's temperature / top_p override them.
DEFAULT_SAMPLING = SamplingParams(max_new_tokens=512, temperature=0.7, top_p=0.92)
ENDPOINTS = ("POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models",
             "POST /tokenize", "POST /detokenize", "GET /tokenizer_info", "GET /metrics",
             "GET /health", "POST /chat", "GET / (the chat page)")


# -- the app ---------------------------------------------------------------------------------


def _is_engine(obj: Any) -> bool:
    from ..engine import Engine

    return isinstance(obj, Engine)


def create_app(engine_or_factory: "Engine | Callable[[], Engine]", *, model_name: str | None = None,
               api_key: str | None = None, cors: Sequence[str] | str | None = None,
               max_tokens_cap: int | None = None, max_queue: int = 64,
               defaults: SamplingParams | None = None, host: str = "127.0.0.1",
               allowed_hosts: Sequence[str] | None = None,
               allowed_origins: Sequence[str] | str | None = None,
               max_body_mb: float = DEFAULT_MAX_BODY_MB, think: bool = False,
               max_num_seqs: int = 16, max_num_batched_tokens: int = 512,
               prefix_cache_mb: float = 512.0) -> "FastAPI":
    """The FastAPI app serving one model (OpenAI API under /v1, the chat page at /).

    Args:
        engine_or_factory: a loaded Engine, or a callable returning one (called at startup).
        model_name: the id clients use in ``model`` (default: the engine's name).
        api_key: when set, /v1 routes and /chat need ``Authorization: Bearer <api_key>``.
        cors: the old name of ``allowed_origins`` (both may be given; they add up).
        max_tokens_cap: the most tokens one request may ask for (more is a 400).
        max_queue: requests that may wait while ``max_num_seqs`` run; more get a 503.
        defaults: sampling used where a request is silent (``DEFAULT_SAMPLING``).
        host: the address the server is bound to; its Host header is answered.
        allowed_hosts: more Host names (``*.example.com`` patterns; ``"*"`` = any) beyond
            the bound address, localhost, 127.0.0.1 and [::1].
        allowed_origins: browser origins, besides the server's own page, that may call the
            server (``"*"`` = any); they also get CORS headers. Other origins get 403.
        max_body_mb: the largest request body in MiB (more is a 413).
        think: the page's "think first" switch starts on.
        max_num_seqs: requests generated together (continuous batching: they join and leave
            the running batch between decode steps).
        max_num_batched_tokens: prompt tokens prefilled per step (a long prompt is prefilled in
            chunks, so it does not stall the running streams).
        prefix_cache_mb: memory kept for finished requests' keys, reused for the longest shared
            prefix of a new prompt (each chat turn prefills only its new tokens); 0 = off.
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
    if not max_body_mb > 0:
        raise ValueError(f"max_body_mb must be > 0, got {max_body_mb}")
    state = ServerState(factory=None if given else engine_or_factory,
                        engine=engine_or_factory if given else None, model_name=model_name,
                        api_key=api_key, max_tokens_cap=max_tokens_cap, max_queue=max_queue,
                        defaults=base, think_default=think, max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=max_num_batched_tokens,
                        prefix_cache_mb=prefix_cache_mb)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is None:
            state.engine = await asyncio.to_thread(state.factory)
        state.get_worker()
        try:
            yield
        finally:  # uvicorn got SIGTERM/SIGINT and the connections are closed (or timed out)
            if state.worker is not None:  # by now nothing runs but, at most, one last step
                await asyncio.to_thread(state.worker.close, 2.0)

    metrics = _metrics(state)
    app = FastAPI(title="minimind-core", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.minimind = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = str(e.detail)
        if e.status_code in (404, 405):
            message = (f"{message}: {request.method} {request.url.path}; this server has "
                       f"{', '.join(ENDPOINTS)}")
        return JSONResponse(error_body(message, code=code), status_code=e.status_code,
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
                                "'Authorization: Bearer <key>' (on the chat page: the API key "
                                "field)", code="invalid_api_key")
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

    @app.post("/chat", dependencies=auth)
    async def _compat_chat(request: Request):
        return await compat_chat(state, request)

    @app.get("/v1/models", dependencies=auth)
    async def _list_models():
        return list_models(state)

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def _get_model(model_id: str):
        state.check_model(model_id)
        return next(m for m in list_models(state)["data"] if m["id"] == model_id)

    async def _tokenize(request: Request):
        return await tokenize(state, request)

    async def _detokenize(request: Request):
        return await detokenize(state, request)

    async def _tokenizer_info():
        return tokenizer_info(state)

    for prefix in ("", "/v1"):  # vLLM serves them at the root; some clients look under /v1
        app.add_api_route(f"{prefix}/tokenize", _tokenize, methods=["POST"], dependencies=auth)
        app.add_api_route(f"{prefix}/detokenize", _detokenize, methods=["POST"],
                          dependencies=auth)
        app.add_api_route(f"{prefix}/tokenizer_info", _tokenizer_info, methods=["GET"],
                          dependencies=auth)

    @app.get("/metrics")
    async def _metrics_page():
        from fastapi.responses import Response

        if metrics is None:
            raise APIError(501, "/metrics needs prometheus_client: pip install "
                                "'minimind-core[serve]' (or prometheus_client)",
                           code="not_available")
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/health")
    async def _health():
        worker = state.worker
        engine = state.engine
        return {"status": "ok" if engine is not None else "loading",
                "model": state.name, "auth": state.api_key is not None,
                "max_tokens": state.max_tokens_cap, "default_max_tokens":
                state.defaults.max_new_tokens, "context_window":
                engine.config.max_position_embeddings if engine is not None else None,
                "running": worker.running if worker is not None else 0,
                "waiting": worker.waiting if worker is not None else 0,
                "scheduler": worker.describe() if worker is not None else None,
                # what the chat page starts with (its sliders, max tokens, think switch)
                "defaults": {"temperature": state.defaults.temperature,
                             "top_p": state.defaults.top_p,
                             "max_tokens": state.defaults.max_new_tokens,
                             "think": state.think_default}}

    @app.get("/", include_in_schema=False)
    async def _page():
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def _favicon():
        return FileResponse(WEB_DIR / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    # Starlette runs the last added middleware first: Host, then Origin, then CORS (so that
    # allowed pages can read the body guard's errors), then the body guard.
    origins = check_origins([*_as_list(cors), *_as_list(allowed_origins)])
    hosts = default_hosts(host, _as_list(allowed_hosts))  # both raise ValueError now, not later
    app.add_middleware(BodyGuard, max_bytes=int(max_body_mb * 1024 * 1024))
    if origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(OriginGuard, allowed_origins=origins)
    app.add_middleware(HostGuard, allowed_hosts=hosts, any_ip=host in WILDCARD_BINDS)
    return app


def _metrics(state: ServerState) -> "Metrics | None":
    """The app's Prometheus registry, hooked into the scheduler (None without
    prometheus_client)."""
    try:
        metrics = Metrics(lambda: state.worker, lambda: state.name)
    except ImportError:
        log.warning("prometheus_client is not installed: /metrics is off")
        return None
    state.on_token = metrics.on_token
    return metrics


def _as_list(value: Sequence[str] | str | None) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)
