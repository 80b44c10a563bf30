"""Slot bookkeeping for a decode cache: which rows are in use and how many positions each holds.

Both backends' KV caches are built on it (as llama.cpp's server slots): a request takes the lowest
free slot, its length grows with prefill and each decode step, and it gives the slot back when it
leaves. A slot given back with ``keep`` holds a prefix for reuse (the prefix cache): its token ids
are remembered, ``match`` finds the cached slot sharing the longest prefix with a new prompt, and
``alloc`` evicts the least recently used cached slot only when no empty one is left.
Backend-free (numpy only).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

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
        # slot -> the ids its keys hold (int64 array: one compare per slot), LRU first
        self.cached: OrderedDict[int, np.ndarray] = OrderedDict()

    nbytes = 0  # a cache with storage says how much (the scheduler sizes its prefix cache by it)

    def fits(self, slots: int, length: int) -> bool:
        """Whether ``slots`` free rows of ``length`` positions are available."""
        return int((~self.used).sum()) >= slots and length <= self.max_len

    def alloc(self) -> int:
        """The lowest free slot, emptied (lowest first keeps the rows of a batch together); a
        cached prefix is evicted (least recently used first) only when no empty slot is left."""
        free = [s for s in np.flatnonzero(~self.used).tolist() if s not in self.cached]
        if not free and self.cached:
            free = [next(iter(self.cached))]
        if not free:
            raise CacheFull(f"all {self.slots} cache slots are in use")
        slot = free[0]
        self.cached.pop(slot, None)
        self.used[slot] = True
        self.lengths[slot] = 0
        return slot

    def free(self, slot: int, keep: Sequence[int] | None = None, max_cached: int = 0) -> None:
        """Give a slot back. ``keep``: the ids whose keys fill it, kept as a reusable prefix
        (at most ``max_cached`` cached slots; the oldest is dropped past that)."""
        self.used[slot] = False
        self.cached.pop(slot, None)
        if keep and max_cached > 0:
            self.cached[slot] = np.asarray(keep, dtype=np.int64)
            self.lengths[slot] = len(keep)
            while len(self.cached) > max_cached:
                old, _ = self.cached.popitem(last=False)
                self.lengths[old] = 0
        else:
            self.lengths[slot] = 0

    def match(self, ids: Sequence[int]) -> tuple[int | None, int]:
        """The cached slot sharing the longest prefix with ``ids``, and that prefix's length."""
        best, best_n = None, 0
        query = np.asarray(ids, dtype=np.int64)
        for slot, cached in self.cached.items():
            n = _common_prefix(cached, query)
            if n > best_n:
                best, best_n = slot, n
        return best, best_n

    def take(self, slot: int, n: int) -> None:
        """Claim cached ``slot`` for a new row that reuses its first ``n`` positions."""
        del self.cached[slot]
        self.used[slot] = True
        self.lengths[slot] = n

    def check_room(self, slot: int, tokens: int) -> None:
        """Raise CacheFull unless ``tokens`` more positions fit in ``slot``."""
        if self.lengths[slot] + tokens > self.max_len:
            raise CacheFull(f"slot {slot} holds {self.lengths[slot]} of {self.max_len} positions; "
                            f"{tokens} more do not fit")


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n
