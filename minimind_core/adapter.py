"""The LoRA adapter object and upstream's one formula, ``W' = W + B @ A`` (no alpha, no scaling).

Kept apart from ``lora.py`` (which reads and validates LoRA files through ``checkpoint.py``) so that
``checkpoint.py`` can fold LoRA layers saved inside a state dict without importing ``lora.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


class LoraError(ValueError):
    """A LoRA file that cannot be read, or that does not fit the base model."""


@dataclass
class LoRA:
    """A LoRA adapter: ``modules[name] = (A [rank, in], B [out, rank])`` as float32 numpy arrays.

    ``name`` is the base model's module name (``model.layers.0.self_attn.q_proj``); the update of
    that module is ``y = W x + B (A x)``.
    """

    modules: dict[str, tuple[np.ndarray, np.ndarray]]
    path: Path | None = None
    file_dtype: str = "float32"
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ranks(self) -> dict[str, int]:
        """Rank of each module (ranks may differ per module)."""
        return {name: a.shape[0] for name, (a, _) in self.modules.items()}

    @property
    def rank(self) -> int:
        """The largest rank (the single rank of every upstream file)."""
        return max(self.ranks.values())

    def __len__(self) -> int:
        return len(self.modules)

    def __repr__(self) -> str:
        ranks = sorted(set(self.ranks.values()))
        return (f"LoRA({self.path!s}, {len(self)} modules, rank {'/'.join(map(str, ranks))}, "
                f"{self.file_dtype})")


# --- the formula --------------------------------------------------------------------------------

def lora_delta(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``B @ A`` in float32: what upstream's LoRA adds to a weight ``W`` [out, in]."""
    return np.asarray(b, dtype=np.float32) @ np.asarray(a, dtype=np.float32)


def merge_into(weights: Mapping[str, np.ndarray], lora: LoRA) -> dict[str, np.ndarray]:
    """Return a copy of ``weights`` (checkpoint names) with ``W' = W + B @ A`` for each LoRA module.

    Computed in float32; untouched tensors are shared with the input, which is never modified.
    Validate the LoRA first (``load_lora``) — this function only checks that the keys exist.
    """
    out = dict(weights)
    for name, (a, b) in lora.modules.items():
        key = name + ".weight"
        if key not in out:
            raise LoraError(f"cannot merge LoRA module {name}: the weights have no {key!r}")
        out[key] = np.asarray(out[key], dtype=np.float32) + lora_delta(a, b)
    return out
