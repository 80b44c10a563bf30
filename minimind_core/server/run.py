"""Running the app: ``serve`` (uvicorn until SIGTERM), ``BackgroundServer`` (a thread, for tests
and notebooks), and ``configure_parser`` + ``run``, what ``minimind serve`` and
``python -m minimind_core.server`` call.

Shutdown (SIGTERM, Ctrl-C, ``BackgroundServer.stop``) is graceful within ``shutdown_timeout``
seconds: the listening socket closes at once, queued requests get 503, the running generation
may finish until about two seconds before the deadline and is then cancelled — its stream ends
with an error event and ``data: [DONE]`` — and the process exits.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..demo import DEMO_TEMPERATURE, is_demo
from ..params import SamplingParams
from .app import DEFAULT_SAMPLING, create_app
from .guard import DEFAULT_MAX_BODY_MB, check_hosts, check_origins

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..engine import Engine

__all__ = ["DEFAULT_SHUTDOWN_TIMEOUT", "BackgroundServer", "bind_socket", "configure_parser",
           "run", "serve"]

DEFAULT_SHUTDOWN_TIMEOUT = 30.0


def _split(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated flag values as one list."""
    return [o.strip() for v in values or () for o in v.split(",") if o.strip()]


def _checked(check: Callable[[list[str]], list[str]]) -> Callable[[str], str]:
    """An argparse type that checks each comma-separated part of a flag's value."""
    def parse(text: str) -> str:
        try:
            check(_split([text]))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).split(" ", 1)[1]) from None  # no flag name
        return text

    return parse


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535; 0 = any free "
                                         "port)")
    return port


def _number(text: str, *, zero_ok: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 if zero_ok else value > 0) or value == float("inf"):
        what = "a number >= 0" if zero_ok else "a positive number"
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def _positive(text: str) -> float:
    return _number(text, zero_ok=False)


def _seconds(text: str) -> float:
    return _number(text, zero_ok=True)


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
    server.add_argument("--port", type=_port, default=8000,
                        help="port (default: 8000; 0 = any free port)")
    server.add_argument("--max-tokens", type=int, default=None,
                        help="the most tokens one request may generate; also the default")
    server.add_argument("--temperature", type=float, default=None,
                        help=f"temperature when a request gives none (default: "
                             f"{DEFAULT_SAMPLING.temperature}; {DEMO_TEMPERATURE:g} = greedy for the "
                             f"demo model, which learned one right answer per question)")
    server.add_argument("--top-p", type=float, default=DEFAULT_SAMPLING.top_p,
                        help="top_p when a request gives none (default: %(default)s)")
    server.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer <key>' on /v1 routes and /chat")
    server.add_argument("--allowed-origins", "--cors", dest="allowed_origins", action="append",
                        type=_checked(check_origins), default=None, metavar="ORIGINS",
                        help="browser origins besides the server's own page that may use it, "
                             "comma-separated or repeated ('*' = any); they get CORS headers, "
                             "other origins 403 (default: none)")
    server.add_argument("--allowed-hosts", action="append", type=_checked(check_hosts),
                        default=None, metavar="HOSTS",
                        help="Host names to answer besides the bound address, localhost, "
                             "127.0.0.1 and [::1] ('*.example.com' patterns, '*' = any); "
                             "others get 400 (default: none)")
    server.add_argument("--max-body-mb", type=_positive, default=DEFAULT_MAX_BODY_MB,
                        metavar="MB", help="largest request body in MiB; more is a 413 "
                                           "(default: %(default)s)")
    server.add_argument("--max-queue", type=int, default=64,
                        help="requests that may wait while --max-num-seqs run; more get a 503 "
                             "(default: 64)")
    server.add_argument("--max-num-seqs", type=int, default=16, metavar="N",
                        help="requests generated together, joining and leaving the running "
                             "batch between decode steps (default: 16)")
    server.add_argument("--max-num-batched-tokens", type=int, default=512, metavar="N",
                        help="prompt tokens prefilled per step; longer prompts go in chunks so "
                             "running streams never stall (default: 512)")
    server.add_argument("--prefix-cache-mb", type=float, default=512.0, metavar="MB",
                        help="memory for finished requests' keys, reused for a new prompt's "
                             "longest shared prefix (default: 512)")
    server.add_argument("--no-prefix-cache", action="store_true",
                        help="turn the prefix cache off (replies are the same either way)")
    server.add_argument("--shutdown-timeout", type=_seconds,
                        default=DEFAULT_SHUTDOWN_TIMEOUT, metavar="S",
                        help="on SIGTERM/Ctrl-C: seconds until the server has exited; the "
                             "running reply may finish until shortly before (default: "
                             "%(default)s)")
    server.add_argument("--think", action="store_true",
                        help="start the chat page's 'Think first' switch on")
    server.add_argument("--log-level", default="info", help="uvicorn log level (default: info)")
    return parser


def _timings(shutdown_timeout: float) -> tuple[float, float]:
    """(seconds the running generation may go on, uvicorn's wait for open connections), so
    that a stream is ended by us, in one piece, before uvicorn would cut it, and the whole
    shutdown fits in ``shutdown_timeout``."""
    return max(shutdown_timeout - 2.0, 0.0), max(shutdown_timeout - 1.0, 0.1)


def _uvicorn_server(app: FastAPI, config: Any, grace: float) -> Any:
    """A uvicorn.Server that tells the app it is stopping before it waits for connections."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            state = getattr(app.state, "minimind", None)
            if state is not None:
                state.begin_shutdown(grace)
            await super().shutdown(sockets=sockets)

    return Server(config)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; OSError saying what to change when the
    address is taken or cannot be used (checked before the server says it is serving)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e}; check --host") from e
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        hint = "choose another --port" if port else "check --host"
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; {hint}") from e
    sock.set_inheritable(True)
    return sock


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
          sock: socket.socket | None = None) -> None:
    """Run ``app`` with uvicorn until SIGINT/SIGTERM, then shut down gracefully within
    ``shutdown_timeout`` seconds (see the module docstring). ``sock``: an already bound socket
    (``bind_socket``); otherwise ``host:port`` is bound here."""
    import uvicorn

    grace, wait = _timings(shutdown_timeout)
    sock = sock or bind_socket(host, port)
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=wait)
    _uvicorn_server(app, config, grace).run(sockets=[sock])


class BackgroundServer:
    """``with BackgroundServer(app) as s:`` — uvicorn on ``host`` at a free port in a daemon
    thread (for notebooks, tests and benchmarks); ``s.url`` is its address, ``stop()`` (or leaving
    the block) shuts it down as SIGTERM would."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", *, log_level: str = "warning",
                 shutdown_timeout: float = 2.0) -> None:
        import threading

        import uvicorn

        grace, wait = _timings(shutdown_timeout)
        config = uvicorn.Config(app, host=host, port=0, log_level=log_level,
                                timeout_graceful_shutdown=wait)
        self.server = _uvicorn_server(app, config, grace)
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
    with no model, the embedded demo), bind the port and serve until SIGINT/SIGTERM. Raises
    ValueError/OSError/ImportError when the model cannot be loaded or the port not bound."""
    temperature = DEFAULT_SAMPLING.temperature if args.temperature is None else args.temperature
    defaults = SamplingParams(max_new_tokens=DEFAULT_SAMPLING.max_new_tokens,
                              temperature=temperature, top_p=args.top_p)  # checked before loading
    engine = load_engine(args)
    if args.temperature is None and is_demo(engine.info.get("path")):
        defaults = replace(defaults, temperature=DEMO_TEMPERATURE)
    app = create_app(engine, model_name=args.served_model_name, api_key=args.api_key,
                     allowed_origins=_split(args.allowed_origins),
                     max_tokens_cap=args.max_tokens, max_queue=args.max_queue,
                     defaults=defaults, host=args.host,
                     allowed_hosts=_split(args.allowed_hosts), max_body_mb=args.max_body_mb,
                     think=args.think, max_num_seqs=args.max_num_seqs,
                     max_num_batched_tokens=args.max_num_batched_tokens,
                     prefix_cache_mb=0.0 if args.no_prefix_cache else args.prefix_cache_mb)
    sock = bind_socket(args.host, args.port)  # a taken port fails here, before "Serving"
    port = sock.getsockname()[1]
    name = args.served_model_name or engine.name
    lora = f", LoRA {Path(engine.lora_path).name}" if engine.lora_path else ""
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Serving {name} ({engine.backend}{lora}) on http://{shown}:{port} "
          f"— chat page at /, OpenAI API at /v1", file=sys.stderr, flush=True)
    serve(app, args.host, port, log_level=args.log_level,
          shutdown_timeout=args.shutdown_timeout, sock=sock)
    return 0
