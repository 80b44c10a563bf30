"""``minimind serve``: the OpenAI-compatible server of ``minimind_core.server``.

The server module (FastAPI + uvicorn, the ``serve`` extra) is imported only when this command
runs, so the rest of the CLI works without it. Its ``configure_parser`` adds the server's own
flags (--host, --port, ...); the model flags shared with every command are added here unless the
server already defines them. A server module that imports ``load_engine`` (from
``minimind_core.commands.common``) and builds its engine with ``load_engine(args)`` gets every
model flag; otherwise upstream's path flags are resolved here and the rest are refused.
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
    server = server_module()
    if not hasattr(server, "load_engine"):
        # This server loads with load(model, backend, device, dtype, tokenizer, lora) only;
        # refuse the flags it would silently ignore.
        # hidden size and layers only confirm what the weights say (and name upstream's file).
        extra = [f for f in common.arch_overrides(args) if f not in ("hidden_size", "num_hidden_layers")]
        extra += [f for f in ("q_bits", "q_group_size", "merge_lora") if getattr(args, f, None)]
        if extra:
            names = ", ".join("--" + f.replace("_", "-") for f in extra)
            raise ValueError(f"minimind serve does not take {names} yet; convert the model first "
                             "(minimind convert) or drop them")
    # Upstream's --save_dir/--weight/--lora_weight become the paths the server loads.
    model, lora, tokenizer = common.model_location(args)
    args.model = str(model) if model is not None else None
    args.lora = str(lora) if lora is not None else None
    args.tokenizer = str(tokenizer) if tokenizer is not None else None
    result = server.run(args)
    return result if isinstance(result, int) else 0
