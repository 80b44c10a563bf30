"""The dtype names every backend and converter accepts, and their aliases.

Each backend / converter maps the canonical name to its framework's dtype; the aliases and the
error message live only here.
"""

from __future__ import annotations

DTYPE_NAMES = ("float32", "float16", "bfloat16")
_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def canonical_dtype(name: str) -> str:
    """``"fp16"`` / ``"half"`` / ``"BF16"`` … → ``"float32"``, ``"float16"`` or ``"bfloat16"``.

    Anything else raises ValueError naming the value and the choices.
    """
    canonical = _ALIASES.get(name.lower()) if isinstance(name, str) else None
    if canonical is None:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(DTYPE_NAMES)}")
    return canonical
