"""Where minimind-core keeps what it builds for itself (converted MLX folders, compiled kernels),
and the file hash that keys such entries and converters' provenance."""

from __future__ import annotations

import hashlib
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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
