"""Slot bookkeeping for a decode cache: which rows are in use and how many positions each holds.

Both backends' KV caches are built on it (as llama.cpp's server slots): a request takes the lowest
free slot, its length grows with prefill and each decode step, and it gives the slot back when it
leaves. Backend-free (numpy only).
"""

from __future__ import annotations

import numpy as np


class CacheFull(RuntimeError):
    """No free slot, or a row would run past the cache's length."""


class Slots:
    """``slots`` rows of ``max_len`` positions: ``alloc`` / ``free`` / ``fits`` and per-row
    ``lengths`` (positions filled)."""

    def __init__(self, slots: int, max_len: int) -> None:
        self.slots, self.max_len = slots, max_len
        self.lengths = np.zeros(slots, dtype=np.int64)
        self.used = np.zeros(slots, dtype=bool)

    def fits(self, slots: int, length: int) -> bool:
        """Whether ``slots`` free rows of ``length`` positions are available."""
        return int((~self.used).sum()) >= slots and length <= self.max_len

    def alloc(self) -> int:
        """The lowest free slot, emptied (lowest first keeps the rows of a batch together)."""
        free = np.flatnonzero(~self.used)
        if not len(free):
            raise CacheFull(f"all {self.slots} cache slots are in use")
        slot = int(free[0])
        self.used[slot] = True
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        """Give a slot back; its contents stay until overwritten (never read unfilled)."""
        self.used[slot] = False
        self.lengths[slot] = 0

    def check_room(self, slot: int, tokens: int) -> None:
        """Raise CacheFull unless ``tokens`` more positions fit in ``slot``."""
        if self.lengths[slot] + tokens > self.max_len:
            raise CacheFull(f"slot {slot} holds {self.lengths[slot]} of {self.max_len} positions; "
                            f"{tokens} more do not fit")
