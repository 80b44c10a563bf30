"""The ``minimind`` command (also ``python -m minimind_core``).

    minimind chat                                # talk to the embedded demo model, offline
    minimind generate -m out/full_sft_512.pth "你好"
    minimind chat --save_dir out --weight full_sft --hidden_size 512   # upstream eval_llm.py flags
    minimind info out/full_sft_512.pth
    minimind bench -m out/full_sft_512.pth --batch 8
    minimind convert --to mlx out/full_sft_512.pth minimind-mlx --q-bits 4
    minimind serve -m out/full_sft_512.pth --port 8000

Each subcommand lives in ``minimind_core/cli/<name>.py`` as a library function plus
``configure_parser`` and ``main``. Errors end with one line on stderr (``minimind: error: ...``)
and a non-zero exit; set ``MINIMIND_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from ..version import __version__
from . import bench, chat, common, convert, generate, info, serve

COMMANDS = {
    "generate": (generate, "generate a reply to one prompt (argument or stdin)"),
    "chat": (chat, "chat in the terminal, with multi-turn history"),
    "info": (info, "show what was detected from a checkpoint"),
    "bench": (bench, "measure prefill and decode speed"),
    "convert": (convert, "convert a checkpoint to an MLX or transformers folder"),
    "serve": (serve, "serve an OpenAI-compatible API and a web chat page"),
}


def build_parser(argv: Sequence[str] = ()) -> common.ArgumentParser:
    """The parser with every subcommand; the server's flags only when ``serve`` is the command."""
    parser = common.ArgumentParser(
        prog=common.PROG, description="Run MiniMind models (MiniMind2, MiniMind-3; dense and MoE) "
        "on PyTorch and Apple MLX.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=(module.__doc__ or "").strip(),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
        if module is serve:
            serve.configure_parser(sub, with_server=bool(argv) and argv[0] == "serve")
        else:
            module.configure_parser(sub)
        sub.set_defaults(func=module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 error, 2 bad flags, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():  # restores the caller's warning settings afterwards
        warnings.showwarning = _show_warning
        return _run(argv)


def _run(argv: list[str]) -> int:
    debug = bool(os.environ.get("MINIMIND_DEBUG"))
    try:
        try:
            args = build_parser(argv).parse_args(argv)
        except SystemExit as e:  # --help, --version and bad flags
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        if args.command is None:
            build_parser().print_help(sys.stderr)
            return 2
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\n{common.PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`minimind generate ... | head`): stop quietly.
        _silence_stdout()
        return 0
    except Exception as e:
        if debug:
            raise
        print(f"{common.PROG}: error: {_message(e)}", file=sys.stderr)
        return 1


def _message(e: BaseException) -> str:
    """The error's own text; its type too when the text alone would not say what went wrong."""
    text = str(e).strip() or type(e).__name__
    if isinstance(e, (ValueError, OSError, ImportError)):
        return text
    return f"{type(e).__name__}: {text} (set MINIMIND_DEBUG=1 to see the traceback)"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library warning (e.g. a one-time note) as one line, without the source location."""
    print(f"{common.PROG}: warning: {message}", file=sys.stderr)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
