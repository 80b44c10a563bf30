"""Where minimind-core keeps what it builds for itself (converted MLX folders, compiled kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$MINIMIND_CACHE``, else ``$XDG_CACHE_HOME/minimind-core``, else ``~/.cache/minimind-core``.

    Raises RuntimeError when none is set and the home directory cannot be found.
    """
    if os.environ.get("MINIMIND_CACHE"):
        return Path(os.environ["MINIMIND_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "minimind-core"
