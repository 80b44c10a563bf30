"""Backend registry: a backend's module is imported only when it is asked for.

So a Linux user never imports mlx, and a Mac user without torch can still use the MLX backend.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from minimind_core.engine import Engine

# name -> (module, class, the package that must be importable, the extra that installs it)
_REGISTRY = {
    "torch": ("backends.torch.engine", "TorchEngine", "torch", "torch"),
    "mlx": ("backends.mlx.engine", "MlxEngine", "mlx", "mlx"),
}


def names() -> list[str]:
    """Every backend name the registry knows."""
    return list(_REGISTRY)


def is_installed(name: str) -> bool:
    """Whether the backend's framework can be imported here (without importing it)."""
    return importlib.util.find_spec(_REGISTRY[name][2]) is not None


def auto() -> str:
    """MLX on Apple silicon when installed, else torch."""
    apple = sys.platform == "darwin" and platform.machine() == "arm64"
    if apple and is_installed("mlx"):
        return "mlx"
    if is_installed("torch"):
        return "torch"
    if is_installed("mlx"):
        return "mlx"
    raise ImportError("no backend is installed: pip install 'minimind-core[torch]' "
                      "(or 'minimind-core[mlx]' on a Mac)")


def get(name: str) -> type[Engine]:
    """The Engine class of backend ``name`` ("torch", "mlx" or "auto")."""
    if name == "auto":
        name = auto()
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose from {names() + ['auto']}")
    module, cls, package, extra = _REGISTRY[name]
    if not is_installed(name):
        raise ImportError(f"the {name} backend needs {package}: pip install 'minimind-core[{extra}]'")
    return getattr(importlib.import_module(module), cls)
