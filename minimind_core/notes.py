"""One-time notes: a UserWarning shown once per process for an accepted input that changes
nothing or falls back silently otherwise (``flash_attn``, ``use_cache=False``, a tokenizer
without a chat template). The CLI prints them as one ``minimind: warning: ...`` line."""

from __future__ import annotations

import warnings

_SHOWN: set[str] = set()


def note_once(message: str, stacklevel: int = 3) -> None:
    """Warn with ``message`` unless this process already did (the caller's caller is blamed)."""
    if message in _SHOWN:
        return
    _SHOWN.add(message)
    warnings.warn(message, UserWarning, stacklevel=stacklevel)
