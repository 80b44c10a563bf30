"""An OpenAI-compatible HTTP server and a web chat page for one loaded model.

    minimind serve --model out/full_sft_768.pth          # or: python -m minimind_core.server
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "你好"}], "stream": true}'

Endpoints: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, and the
chat page at /. What each endpoint does is in ``routes.py``; generation runs in one worker
thread (``worker.py``); ``<think>`` and ``<tool_call>`` parsing lives in ``reasoning.py``;
request checking and response bodies in ``openai_schema.py``. The library shape follows mlx-lm: ``create_app`` (the library function),
``configure_parser`` + ``run`` (what ``minimind serve`` calls) and ``main``.
"""

import argparse
import asyncio
import hmac
import logging
import sys
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .commands.common import add_model_args, load_engine
from .openai_schema import APIError, error_body
from .params import SamplingParams
from .routes import ServerState, chat_completions, completions, list_models

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .engine import Engine

__all__ = ["DEFAULT_SAMPLING", "configure_parser", "create_app", "main", "run", "serve",
           "serve_main"]

log = logging.getLogger("minimind_core.server")
WEB_DIR = Path(__file__).resolve().parent / "web"
# Upstream MiniMind's own server defaults; a request's temperature / top_p override them.
DEFAULT_SAMPLING = SamplingParams(max_new_tokens=512, temperature=0.7, top_p=0.92)


# -- the app ---------------------------------------------------------------------------------


def _is_engine(obj: Any) -> bool:
    from .engine import Engine

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


class BackgroundServer:
    """``with BackgroundServer(app) as s:`` — uvicorn on ``host`` at a free port in a daemon
    thread (for notebooks, tests and benchmarks); ``s.url`` is its address, ``stop()`` (or leaving
    the block) runs the app's shutdown."""

    def __init__(self, app: "FastAPI", host: str = "127.0.0.1", *, log_level: str = "warning",
                 shutdown_timeout: float = 2.0) -> None:
        import threading

        import uvicorn

        config = uvicorn.Config(app, host=host, port=0, log_level=log_level,
                                timeout_graceful_shutdown=shutdown_timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.host, self.url = host, ""

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        import time

        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run(args: argparse.Namespace) -> int:
    """Load the model the flags name (see ``configure_parser``; with no model, the embedded
    demo) and serve it until SIGINT/SIGTERM. Raises ValueError/OSError/ImportError when the
    model cannot be loaded."""
    defaults = SamplingParams(max_new_tokens=DEFAULT_SAMPLING.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p)
    engine = load_engine(args)
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
