"""``python -m minimind_core.server [options]``: the same as ``minimind serve``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..cli.common import add_model_args, load_engine
from .run import configure_parser, run


def build_parser() -> argparse.ArgumentParser:
    """The server's flags plus every model flag ``minimind serve`` takes (upstream's
    --save_dir/--weight, --q-bits, overrides)."""
    parser = configure_parser(argparse.ArgumentParser(
        prog="python -m minimind_core.server",
        description="Serve a MiniMind model over an OpenAI-compatible HTTP API with a web chat "
                    "page (the same as `minimind serve`)."))
    add_model_args(parser, skip=frozenset(parser._option_string_actions))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, load the model and serve; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return run(args, load_engine)
    except (ValueError, OSError, ImportError) as e:
        print(f"minimind serve: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
