"""``minimind serve``: the OpenAI-compatible server of ``minimind_core.server``.

The server module (FastAPI + uvicorn, the ``serve`` extra) is imported only when this command
runs, so the rest of the CLI works without it. Its ``configure_parser`` adds the server's own
flags (--host, --port, ...); the model flags shared with every command are added here unless the
server already defines them, and the server builds its engine with ``common.load_engine``, so
every model flag (upstream's path flags included) works as in the other commands.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType

from . import common

INSTALL = "pip install 'minimind-core[serve]'"


def server_module() -> ModuleType:
    """``minimind_core.server``, or an ImportError that says how to install it."""
    try:
        module = importlib.import_module("minimind_core.server")
    except ImportError as e:
        raise ImportError(f"minimind serve needs the serve extra ({e}); {INSTALL}") from e
    if not (hasattr(module, "configure_parser") and hasattr(module, "run")):
        raise ImportError("minimind_core.server has no configure_parser/run; this install is "
                          "incomplete")
    return module


def configure_parser(parser: argparse.ArgumentParser, *, with_server: bool = False) -> None:
    """The serve flags; the server's own ones only when ``with_server`` (i.e. serve is running)."""
    if with_server:
        server_module().configure_parser(parser)
    common.add_model_args(parser, skip=frozenset(parser._option_string_actions))


def main(args: argparse.Namespace) -> int:
    """Run the server; it loads the model with ``common.load_engine`` like every command."""
    result = server_module().run(args, common.load_engine)
    return result if isinstance(result, int) else 0
