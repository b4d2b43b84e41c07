"""One token sequence decoded through a shared backend: its cache, and a guard against two threads stepping it."""

from __future__ import annotations

import threading

import numpy as np

from .backend import Backend, Cache, check_tokens
from .errors import EdgephiError


class Sequence:
    """A token sequence with a KV cache of its own. Use a sequence from one thread at a time;
    different sequences may step in different threads."""

    def __init__(self, backend: Backend, cache: Cache):
        self.backend = backend
        self.cache = cache
        self._vocab_size = backend.config.vocab_size
        self._busy = threading.Lock()

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    @property
    def next_pos(self) -> int:
        return self.cache.next_pos

    def reset(self) -> None:
        self.cache.reset()

    def truncate(self, n: int) -> bool:
        return self.cache.truncate(n)

    def keep_prefix(self, n: int) -> None:
        self.cache.keep_prefix(n)

    def feed(self, tokens, *, all_logits: bool = False, verify: bool = False) -> np.ndarray:
        """Append tokens; returns logits (len(tokens), V), or (1, V) of the last one. The (1, V)
        result may be a buffer the next step reuses (no allocation per token): copy it to keep it.
        The tokens are a prompt: each one's values are the same however a prompt is split into
        feeds. verify: they are computed as decode steps are instead (prompt lookup's drafts,
        whose logits must equal plain decoding's)."""
        tokens = check_tokens(tokens, self._vocab_size)
        self._claim()
        try:
            return self.backend.feed(self.cache, tokens, all_logits, verify)
        finally:
            self._busy.release()

    def step(self, token: int) -> np.ndarray:
        """One decode step, without feed()'s per-call conversions: the decode loop's hot path."""
        if not 0 <= token < self._vocab_size:
            raise ValueError(f"token ids must be in [0, {self._vocab_size})")
        self._claim()
        try:
            return self.backend.step(self.cache, token)
        finally:
            self._busy.release()

    def _claim(self) -> None:
        if not self._busy.acquire(blocking=False):
            raise EdgephiError("this sequence (or chat session) is already stepping in another thread; "
                               "give each thread a sequence or chat session of its own")
