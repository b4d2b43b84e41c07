"""The KV rings of sequences that have ended, kept mapped for the next ones.

A fresh ring's pages are mapped by the kernel as they are first written: for a 1,000-token prompt
on Phi-3-mini that is 400 MB, 1.5 s on the VM the README measures (16 us a page where the guest
touches memory for the first time). A sequence that starts by writing into an ended one's ring
skips that: a second chat sharing a long system prompt copies it into memory already mapped, as
llama.cpp's server reuses its slots' contexts.
"""

from __future__ import annotations

import threading


class RingMemory:
    """A KV ring's arrays (k, v, k_scale, v_scale: (L, C, ...)) and how many of its first slots have
    been written, so their pages are mapped. A sequence's cache holds one, and on the cache's end
    it goes to its RingPool."""

    __slots__ = ("arrays", "written")

    def __init__(self, arrays: tuple):
        self.arrays = arrays
        self.written = 0

    @property
    def key(self) -> tuple:
        return tuple((a.shape, a.dtype.str) for a in self.arrays)

    @property
    def written_bytes(self) -> int:
        return sum(a.nbytes // a.shape[1] for a in self.arrays if a.shape[1]) * self.written


class RingPool:
    """Ended sequences' rings, newest last, within a byte budget of written slots (the oldest go
    first). Rings give themselves back from their caches' finalizers, in whatever thread collects
    them, hence the lock."""

    def __init__(self, budget: int):
        self.budget = budget
        self._rings: list[RingMemory] = []
        self._lock = threading.Lock()

    def give(self, memory: RingMemory) -> None:
        if memory.written == 0 or memory.written_bytes > self.budget:
            return
        with self._lock:
            self._rings.append(memory)
            while sum(m.written_bytes for m in self._rings) > self.budget:
                self._rings.pop(0)

    def take(self, key: tuple, more_than: int) -> RingMemory | None:
        """The held ring of this shape with the most written slots, if that is more than `more_than`."""
        with self._lock:
            fits = [m for m in self._rings if m.key == key]
            best = max(fits, key=lambda m: m.written, default=None)
            if best is None or best.written <= more_than:
                return None
            self._rings.remove(best)
            return best

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(m.written_bytes for m in self._rings)

    def clear(self) -> None:
        with self._lock:
            self._rings.clear()
