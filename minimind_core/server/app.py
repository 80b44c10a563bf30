"""``create_app``: the FastAPI app serving one model (OpenAI API under /v1, the page at /)."""

import asyncio
import hmac
import logging
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..params import SamplingParams
from .routes import ServerState, chat_completions, completions, list_models
from .schema import APIError, error_body

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..engine import Engine

__all__ = ["DEFAULT_SAMPLING", "WEB_DIR", "create_app"]

log = logging.getLogger("minimind_core.server")
WEB_DIR = Path(__file__).resolve().parent / "web"
# Upstream MiniMind's own server defaults; a request's temperature / top_p override them.
DEFAULT_SAMPLING = SamplingParams(max_new_tokens=512, temperature=0.7, top_p=0.92)


# -- the app ---------------------------------------------------------------------------------


def _is_engine(obj: Any) -> bool:
    from ..engine import Engine

    return isinstance(obj, Engine)


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
    state = ServerState(factory=None if given else engine_or_factory,
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
        return list_models(state)

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def _get_model(model_id: str):
        state.check_model(model_id)
        return next(m for m in list_models(state)["data"] if m["id"] == model_id)

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
