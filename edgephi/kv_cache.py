"""A ring-buffer KV cache: fixed capacity, absolute positions, a kept prefix (attention sinks or a
chat's system prompt) that is never overwritten."""

from __future__ import annotations

import mmap
import weakref

import numpy as np

from .format import ModelConfig
from .ring_pool import RingMemory, RingPool

DEFAULT_SINKS = 4
KV_DTYPES = ("float16", "float32", "int8")
# an int8 cache's values per scale: half of llama.cpp's q8_0 block, with a float16 scale where q8_0's
# float32 would do, so the bytes are the same (0.56 of float16's) and the rounding errs 20-30% less
KV_BLOCK = 16
KV_SCALE_TRIES = 16  # candidate scales per block, largest magnitude / 127.5 .. / 120 (store_kv)


def kv_slot_bytes(cfg: ModelConfig, dtype: str) -> int:
    """Bytes of one slot of a ring over every layer: K and V, and an int8 cache's float16 scales."""
    per_head = {"float16": 2 * cfg.head_dim, "float32": 4 * cfg.head_dim,
                "int8": cfg.head_dim + 2 * -(-cfg.head_dim // KV_BLOCK)}[dtype]
    return cfg.num_layers * 2 * cfg.num_kv_heads * per_head


def lazy_zeros(shape, dtype) -> np.ndarray:
    """Zeros whose pages are mapped only when written, 4 KiB at a time. np.zeros asks the kernel
    for transparent huge pages on large arrays, so writing one token into each layer's K and V
    maps 2 MiB apiece: with an 8192-token SmolLM2 cache that was 120 MB for a 5-token prompt."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype)
    region = mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        region.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(region, dtype).reshape(shape)


class KVCache:
    """K and V of every layer for up to `capacity` tokens, as float16 bits, float32, or int8 with
    a float16 scale (its bits) per KV_BLOCK values of a head's row (0.56 of float16's memory)."""

    def __init__(self, cfg: ModelConfig, capacity: int, sinks: int = DEFAULT_SINKS, dtype: str = "float16",
                 pool: RingPool | None = None):
        """pool: where this ring goes when the cache ends, and where a first write into it looks for
        an ended sequence's ring whose pages are already mapped (ring_pool.py)."""
        if capacity < 2:
            raise ValueError(f"context must be at least 2 tokens, got {capacity}")
        self.capacity = capacity
        self.sinks = min(sinks, capacity - 1)
        width = cfg.num_kv_heads * cfg.head_dim
        if dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {dtype!r}")
        # (L, C, Hk * Dh): float16 travels as uint16 bits (numba cannot load float16)
        element = {"float16": np.uint16, "float32": np.float32, "int8": np.int8}[dtype]
        self.k = lazy_zeros((cfg.num_layers, capacity, width), element)
        self.v = lazy_zeros(self.k.shape, self.k.dtype)
        # (L, C, Hk * ceil(Dh / KV_BLOCK)) float16 bits: an int8 cache's block scales; (L, C, 0) for float caches
        blocks = cfg.num_kv_heads * -(-cfg.head_dim // KV_BLOCK) if dtype == "int8" else 0
        self.k_scale = lazy_zeros((cfg.num_layers, capacity, blocks), np.uint16)
        self.v_scale = lazy_zeros(self.k_scale.shape, np.uint16)
        self._memory = RingMemory((self.k, self.v, self.k_scale, self.v_scale))
        self._pool = pool
        if pool is not None:  # the finalizer holds the memory, not the cache
            weakref.finalize(self, pool.give, self._memory)
        self.slot_pos = np.full(capacity, -1, np.int64)  # absolute position held by each slot
        self.slot_token = np.full(capacity, -1, np.int64)  # its token id (to recompute, e.g. LongRoPE)
        self._one_pos = np.zeros(1, np.int64)
        self._one_slot = np.zeros(1, np.int64)
        self.reset()

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes + self.k_scale.nbytes + self.v_scale.nbytes

    def reset(self) -> None:
        self.slot_pos[:] = -1
        self.slot_token[:] = -1
        self.next_pos = 0  # absolute position of the next token
        self.keep = self.sinks  # positions [0, keep) are never overwritten
        self.lost_below = 0  # positions in [keep, lost_below) were overwritten by the ring
        self.long_rope = False  # which LongRoPE factors the cached keys were rotated with
        # positions [0, exact_end) came from prompt steps in one unbroken run from 0: their K and V
        # equal a cold prefill's of the same tokens bit for bit, so other sequences may copy them
        self.exact_end = 0

    def keep_prefix(self, n: int) -> None:
        """Pin the first n positions (a chat's system prompt) so the ring never overwrites them."""
        if n >= self.capacity:
            raise ValueError(f"a kept prefix of {n} tokens does not fit a context of {self.capacity}")
        if self.next_pos > self.capacity or self.lost_below > self.keep:
            raise ValueError("the kept prefix must be set before the cache wraps around")
        self.keep = max(self.sinks, n)

    @property
    def n_slots(self) -> int:
        """Slots in use: they fill in order until the ring wraps."""
        return min(self.next_pos, self.capacity)

    @property
    def max_chunk(self) -> int:
        """Most tokens one step may add without overwriting slots written by the same step."""
        return self.capacity - self.keep

    def slot_of(self, positions: np.ndarray) -> np.ndarray:
        ring = self.capacity - self.keep
        return np.where(positions < self.keep, positions, self.keep + (positions - self.keep) % ring)

    def append(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Claim slots for the next len(tokens) positions: returns (positions, slots).
        A single token (the decode step) reuses two preallocated arrays."""
        if len(tokens) == 1:
            pos = self.next_pos
            slot = pos if pos < self.keep else self.keep + (pos - self.keep) % (self.capacity - self.keep)
            if slot >= self._memory.written:
                self._note_written(slot + 1)
            self._one_pos[0], self._one_slot[0] = pos, slot
            self.slot_pos[slot], self.slot_token[slot] = pos, tokens[0]
            self.next_pos += 1
            self._note_overwritten()
            return self._one_pos, self._one_slot
        positions = np.arange(self.next_pos, self.next_pos + len(tokens), dtype=np.int64)
        slots = self.slot_of(positions).astype(np.int64)
        self._note_written(int(slots.max()) + 1)
        self.slot_pos[slots] = positions
        self.slot_token[slots] = tokens
        self.next_pos += len(tokens)
        self._note_overwritten()
        return positions, slots

    def _note_written(self, slots: int) -> None:
        """Slots below `slots` are about to be written. Where this ring's own pages there are not
        mapped yet and the pool holds an ended ring of this shape with more of them mapped, take
        that ring instead (its stale rows are never read: a row is read only once its slot holds a
        position, and every slot is written before it is given one)."""
        memory = self._memory
        if slots <= memory.written:
            return
        if self._pool is not None and memory.written == 0:
            pooled = self._pool.take(memory.key, 0)
            if pooled is not None:  # swapped into the memory the finalizer holds; ours was never written
                memory.arrays, memory.written = pooled.arrays, pooled.written
                self.k, self.v, self.k_scale, self.v_scale = memory.arrays
        memory.written = max(memory.written, min(slots, self.capacity))

    def adopt_prefix(self, tokens: np.ndarray, k, v, k_scale, v_scale, long_rope: bool) -> None:
        """Into an empty cache, the first n = len(tokens) positions as another cache computed them
        (k, v, k_scale, v_scale: (L, n, ...) as this cache's arrays): an exact prefix, if it was one there."""
        n = len(tokens)
        if self.next_pos != 0 or n > self.capacity:
            raise ValueError("a prefix goes into an empty cache large enough for it")
        self._note_written(n)
        for target, source in zip((self.k, self.v, self.k_scale, self.v_scale), (k, v, k_scale, v_scale)):
            if target.shape[2]:
                self._copy_first_rows(source, target, n)
        self.slot_pos[:n] = np.arange(n)
        self.slot_token[:n] = tokens
        self.next_pos = self.exact_end = n
        self.long_rope = long_rope

    @staticmethod
    def _copy_first_rows(source, target, n: int) -> None:
        # numpy here: this module is numba-free, as the ONNX backend reads its constants
        # (SequenceCache copies with the kernel threads)
        target[:, :n] = source[:, :n]

    def note_prompt_step(self, first: int) -> None:
        """A prompt step wrote positions [first, next_pos): it extends the exact run if it continues
        it. Other steps (decode, verify) never need noting: they write at or past exact_end, and
        the next prompt step then starts past it."""
        if first == self.exact_end:
            self.exact_end = self.next_pos

    def restore(self, slots, positions, tokens, arrays: dict, *, next_pos: int, keep: int, lost_below: int,
                exact_end: int, long_rope: bool) -> None:
        """Into a fresh cache of a saved one's capacity and sinks, its used slots (arrays: k, v,
        k_scale, v_scale rows (L, n, ...) of those slots) and its counters (session_file)."""
        if len(slots):
            self._note_written(int(np.max(slots)) + 1)
        for name, rows in arrays.items():
            getattr(self, name)[:, slots] = rows
        self.slot_pos[slots], self.slot_token[slots] = positions, tokens
        self.next_pos, self.keep, self.lost_below, self.exact_end = next_pos, keep, lost_below, exact_end
        self.long_rope = long_rope

    @property
    def exact_prefix(self) -> int:
        """How many first positions are still held and equal a cold prefill's (see exact_end)."""
        return self.exact_end if self.lost_below == 0 else min(self.exact_end, self.keep)

    def _note_overwritten(self) -> None:
        oldest_held = self.next_pos - (self.capacity - self.keep)  # the ring holds its last positions
        if oldest_held > self.lost_below:
            self.lost_below = oldest_held

    def truncate(self, n: int) -> bool:
        """Forget positions >= n. False (and nothing changed) when n is past the end, or when the
        ring has overwritten every position between the kept prefix and n (keep < n <=
        lost_below). Cutting back into a wrapped ring otherwise leaves the next tokens a shorter
        window until it refills (the positions the cut ones overwrote are gone); that is how a
        chat turn re-renders its last reply without re-feeding the whole conversation. Cutting to
        n <= keep leaves exactly the first n."""
        if n > self.next_pos or self.keep < n <= self.lost_below:
            return False
        self.slot_pos[self.slot_pos >= n] = -1
        self.next_pos = n
        self.exact_end = min(self.exact_end, n)
        if n <= self.keep:
            self.lost_below = 0
        return True

    def cached_tokens(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, positions, slots) of everything cached, in position order."""
        used = np.nonzero(self.slot_pos >= 0)[0]
        order = used[np.argsort(self.slot_pos[used])]
        return self.slot_token[order], self.slot_pos[order], order.astype(np.int64)
