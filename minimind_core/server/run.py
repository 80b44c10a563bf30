"""Running the app: ``serve`` (uvicorn until SIGTERM), ``BackgroundServer`` (a thread, for tests
and notebooks), and ``configure_parser`` + ``run``, what ``minimind serve`` and
``python -m minimind_core.server`` call."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..demo import DEMO_TEMPERATURE, is_demo
from ..params import SamplingParams
from .app import DEFAULT_SAMPLING, create_app

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..engine import Engine

__all__ = ["BackgroundServer", "configure_parser", "run", "serve"]





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
    server.add_argument("--temperature", type=float, default=None,
                        help=f"temperature when a request gives none (default: "
                             f"{DEFAULT_SAMPLING.temperature}; {DEMO_TEMPERATURE:g} = greedy for the "
                             f"demo model, which learned one right answer per question)")
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


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
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

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", *, log_level: str = "warning",
                 shutdown_timeout: float = 2.0) -> None:
        import threading

        import uvicorn

        config = uvicorn.Config(app, host=host, port=0, log_level=log_level,
                                timeout_graceful_shutdown=shutdown_timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.host, self.url = host, ""

    def start(self, timeout: float = 30.0) -> BackgroundServer:
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

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run(args: argparse.Namespace, load_engine: Callable[[argparse.Namespace], Engine]) -> int:
    """Load the model the flags name with ``load_engine`` (the CLI's, so every model flag works;
    with no model, the embedded demo) and serve it until SIGINT/SIGTERM. Raises ValueError/OSError/ImportError when the
    model cannot be loaded."""
    temperature = DEFAULT_SAMPLING.temperature if args.temperature is None else args.temperature
    defaults = SamplingParams(max_new_tokens=DEFAULT_SAMPLING.max_new_tokens,
                              temperature=temperature, top_p=args.top_p)  # checked before loading
    engine = load_engine(args)
    if args.temperature is None and is_demo(engine.info.get("path")):
        defaults = replace(defaults, temperature=DEMO_TEMPERATURE)
    app = create_app(engine, model_name=args.served_model_name, api_key=args.api_key,
                     cors=_origins(args.cors), max_tokens_cap=args.max_tokens,
                     max_queue=args.max_queue, defaults=defaults)
    name = args.served_model_name or engine.name
    lora = f", LoRA {Path(engine.lora_path).name}" if engine.lora_path else ""
    print(f"Serving {name} ({engine.backend}{lora}) on http://{args.host}:{args.port} "
          f"— chat page at /, OpenAI API at /v1", file=sys.stderr, flush=True)
    serve(app, args.host, args.port, log_level=args.log_level,
          shutdown_timeout=args.shutdown_timeout)
    return 0
