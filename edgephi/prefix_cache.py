"""Prompt prefixes' KV shared between sequences of one model: a sequence whose prompt starts with
tokens another one already prefilled copies their K and V instead of computing them again.

Only a cache's exact prefix is shared (KVCache.exact_prefix: positions that prompt steps computed,
which do not depend on how the prompt was split), so a prompt that reuses one gets the logits of
a cold prefill bit for bit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .kv_cache import KVCache

PREFIX_MIN_TOKENS = 32  # shorter prompts prefill in about a decode step's time: not worth a copy


@dataclass(frozen=True)
class PrefixEntry:
    """The KV of the first len(tokens) positions of some cache, copied out of it."""

    tokens: np.ndarray  # int64 (n,)
    k: np.ndarray  # (L, n, Hk Dh), the cache's element type
    v: np.ndarray
    k_scale: np.ndarray  # uint16 (L, n, Hk ceil(Dh / 16)): float16 bits; (L, n, 0) for float caches
    v_scale: np.ndarray
    long_rope: bool  # which LongRoPE factors its keys were rotated with

    @property
    def nbytes(self) -> int:
        return self.tokens.nbytes + self.k.nbytes + self.v.nbytes + self.k_scale.nbytes + self.v_scale.nbytes


def common_length(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two id arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PrefixCache:
    """Prefixes of prompts, keyed by their token ids, within a byte budget: the least recently
    used go first. Thread-safe; entries are never modified once stored.

    long_rope_after: LongRoPE's original_max_position_embeddings (None without LongRoPE): a prompt
    longer than that is prefilled with the long factors, so it may only take such keys, and a
    shorter one only keys rotated with the short ones."""

    def __init__(self, budget_bytes: int, long_rope_after: int | None = None, min_tokens: int = PREFIX_MIN_TOKENS):
        if not isinstance(budget_bytes, int) or isinstance(budget_bytes, bool) or budget_bytes < 0:
            raise ValueError(f"the prefix cache's budget must be a number of bytes >= 0, got {budget_bytes!r}")
        self.budget_bytes = budget_bytes
        self.long_rope_after = long_rope_after
        self.min_tokens = min_tokens
        self._entries: OrderedDict[int, PrefixEntry] = OrderedDict()  # oldest use first
        self._next_key = 0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(entry.nbytes for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def offer(self, cache: KVCache) -> bool:
        """Keep a copy of the cache's exact prefix unless one already held covers it; True if stored.
        Call it from the thread that steps the cache, between steps."""
        n = cache.exact_prefix
        if n < self.min_tokens or not self._fits(n, cache):
            return False
        tokens = cache.slot_token[:n].copy()  # below exact_prefix, slot p holds position p
        with self._lock:  # checked before copying: a chat offers the same prompt after every turn
            if self._touch_holder(tokens, cache.long_rope):
                return False
        entry = PrefixEntry(tokens, *(a[:, :n].copy() for a in (cache.k, cache.v, cache.k_scale, cache.v_scale)),
                            cache.long_rope)
        with self._lock:
            if self._touch_holder(tokens, cache.long_rope):  # another thread stored it meanwhile
                return False
            for key, held in list(self._entries.items()):
                if held.long_rope == entry.long_rope and common_length(held.tokens, tokens) == len(held.tokens):
                    del self._entries[key]  # the new one extends it
            self._entries[self._next_key] = entry
            self._next_key += 1
            total = sum(e.nbytes for e in self._entries.values())
            while total > self.budget_bytes:
                _, dropped = self._entries.popitem(last=False)
                total -= dropped.nbytes
        return True

    def _touch_holder(self, tokens: np.ndarray, long_rope: bool) -> bool:
        """Under the lock: whether an entry starts with `tokens`; it becomes the most recently used."""
        for key, held in self._entries.items():
            if held.long_rope == long_rope and common_length(held.tokens, tokens) == len(tokens):
                self._entries.move_to_end(key)
                return True
        return False

    def _fits(self, n: int, cache: KVCache) -> bool:
        per_token = (cache.k.nbytes + cache.v.nbytes + cache.k_scale.nbytes + cache.v_scale.nbytes) // cache.capacity
        return n * (per_token + 8) <= self.budget_bytes

    def restore(self, cache: KVCache, prompt: np.ndarray) -> int:
        """Into an empty cache about to prefill `prompt` (int64 (T,)), copy the longest held prefix
        of it, leaving at least its last token to feed (its logits are the step's result); returns
        how many positions it copied: none when the prompt would wrap the ring: a cold prefill
        then overwrites slots mid-prompt, which a different split would not reproduce."""
        if cache.next_pos != 0 or len(prompt) > cache.capacity or len(prompt) < 2:
            return 0
        long_rope = self.long_rope_after is not None and len(prompt) > self.long_rope_after
        with self._lock:
            best_key, best = None, 0
            for key, held in self._entries.items():
                if held.long_rope == long_rope:
                    common = min(common_length(held.tokens, prompt), len(prompt) - 1)
                    if common > best:
                        best_key, best = key, common
            if best_key is None or best < self.min_tokens:
                return 0
            self._entries.move_to_end(best_key)
            entry = self._entries[best_key]
        cache.adopt_prefix(prompt[:best], *(a[:, :best] for a in (entry.k, entry.v, entry.k_scale, entry.v_scale)),
                           entry.long_rope)
        return best
