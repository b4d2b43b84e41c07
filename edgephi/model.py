"""A loaded model: config, mapped weights, tokenizer and a KV cache, stepping tokens through forward()."""

from __future__ import annotations

import time
from pathlib import Path

import numba
import numpy as np

from .api import LanguageModel, read_generation_config
from .errors import EdgephiError
from .format import ModelConfig, read_config
from .forward import ATTENTION_TOKENS, Workspace, forward
from .jit_memory import numba_without_scipy_linalg, release_compiler_pages
from .kv_cache import KVCache
from .tokenizer import Tokenizer
from .weights import load_weights

DEFAULT_KV_BUDGET = 512 << 20  # default context is capped so the KV cache fits in 512 MiB
PREFILL_CHUNK = 256  # most tokens per prefill step
# A prefill chunk's activations stay within this, so large models get shorter chunks (Phi-4-mini:
# 48 tokens, not 51 MB of scratch for 256), but never below 32 tokens: Phi-4-mini prefills as fast
# in chunks of 48, 80 or 256 tokens and 15% slower in chunks of 32 or 16.
PREFILL_SCRATCH_BYTES = 12 << 20
MIN_PREFILL_CHUNK = 32


def rope_inv_freq(cfg: ModelConfig, factors) -> np.ndarray:
    """Inverse frequencies (R/2,) in float32, computed as transformers does."""
    exponent = np.arange(0, cfg.rotary_dim, 2, dtype=np.float32) / np.float32(cfg.rotary_dim)
    base = np.float32(cfg.rope_theta) ** exponent
    if factors is not None:
        base = np.asarray(factors, dtype=np.float32) * base
    return (np.float32(1.0) / base).astype(np.float32)


class Model(LanguageModel):
    def __init__(self, folder: str | Path, *, threads: int | None = None, context: int | None = None,
                 kv_dtype: str = "float16"):
        folder = Path(folder)
        if not folder.exists():
            raise EdgephiError(f"{folder}: no such model folder")
        self.folder = folder
        self.config = cfg = read_config(folder)
        with numba_without_scipy_linalg():  # the typed lists of the weights are numba's first dispatch
            self.weights = load_weights(folder, cfg)
        self.tokenizer = Tokenizer.from_folder(folder)
        self.generation_config = read_generation_config(folder)
        if threads is not None:
            if not isinstance(threads, int) or threads < 1:
                raise ValueError(f"threads must be a positive integer, got {threads!r}")
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        if context is None:
            context = min(cfg.max_position_embeddings, max(256, DEFAULT_KV_BUDGET // cfg.kv_bytes_per_token))
        if not isinstance(context, int) or context < 2:
            raise ValueError(f"context must be an integer >= 2, got {context!r}")
        self.kv_dtype = kv_dtype
        self.cache = KVCache(cfg, context, dtype=kv_dtype)
        scaling = cfg.rope_scaling
        self._inv_freq_short = rope_inv_freq(cfg, scaling.short_factor if scaling else None)
        self._inv_freq_long = rope_inv_freq(cfg, scaling.long_factor) if scaling else self._inv_freq_short
        self._attention_factor = np.float32(scaling.attention_factor if scaling else 1.0)
        self._shape = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim)
        self._eps = np.float32(cfg.rms_norm_eps)
        self._window = cfg.sliding_window or 0
        self._decode_ws = Workspace(cfg, 1, context, 1)
        self._token1 = np.zeros(1, np.int64)
        self._chunk_ws: Workspace | None = None
        started = time.perf_counter()
        self._load_kernels()
        self.kernels_s = time.perf_counter() - started  # loading (or on a first run compiling) them

    def _load_kernels(self) -> None:
        """Load the forward pass's machine code from numba's cache (compiling it on the very first
        run) before any weight page is touched, then drop the compiler's code pages: the peak
        resident set is then weights plus what the run keeps, not weights plus LLVM."""
        one = np.zeros(1, np.int64)
        args = self._forward_args(self.cache, one, one, one, self._decode_ws, False)
        forward.compile(tuple(numba.typeof(a) for a in args))
        release_compiler_pages()

    # -- stepping -------------------------------------------------------------------------------

    def _uses_long_rope(self, last_position: int) -> bool:
        cfg = self.config
        return cfg.rope_scaling is not None and last_position + 1 > cfg.original_max_position_embeddings

    def _run(self, cache: KVCache, tokens: np.ndarray, ws: Workspace, all_logits: bool) -> np.ndarray:
        """One forward step of len(tokens) <= ws.T new tokens into `cache`."""
        positions, slots = cache.append(tokens)
        args = self._forward_args(cache, tokens, positions, slots, ws, all_logits)
        forward(*args)
        return args[-2]  # the logits rows forward() filled

    def _forward_args(self, cache: KVCache, tokens, positions, slots, ws: Workspace, all_logits: bool) -> tuple:
        n = len(tokens)
        w = self.weights
        inv_freq = self._inv_freq_long if cache.long_rope else self._inv_freq_short
        logits = ws.logits[:n] if all_logits else ws.logits[:1]
        return (tokens, positions, slots, cache.n_slots, self._shape, self._eps, inv_freq,
                self._attention_factor, self._window, w.embed, w.output, w.norm, w.attn_norms,
                w.ffn_norms, w.qkv, w.o, w.gate_up, w.down, cache.k, cache.v, cache.slot_pos,
                *ws.buffers(n), logits, all_logits)

    def _chunk_workspace(self, cache: KVCache, all_logits: bool) -> Workspace:
        by_scratch = PREFILL_SCRATCH_BYTES // Workspace.bytes_per_token(self.config)
        T = min(PREFILL_CHUNK, cache.max_chunk, max(MIN_PREFILL_CHUNK, by_scratch - by_scratch % ATTENTION_TOKENS))
        ws = self._chunk_ws
        if ws is None or ws.T != T or ws.scores.shape[1] != cache.capacity or (all_logits and ws.logits.shape[0] < T):
            ws = Workspace(self.config, T, cache.capacity, T if all_logits else 1)
            if cache is self.cache:
                self._chunk_ws = ws
        return ws

    def _switch_to_long_rope(self, cache: KVCache) -> None:
        """Crossing original_max_position_embeddings: keys cached with the short factors are
        recomputed with the long ones, as transformers does when it drops its cache there."""
        tokens, positions, _ = cache.cached_tokens()
        cache.long_rope = True
        end = cache.next_pos
        cache.slot_pos[:] = -1
        ws = self._chunk_workspace(cache, False)
        # replay runs of consecutive positions (the kept prefix, then the ring) into the same slots
        breaks = np.nonzero(np.diff(positions) != 1)[0] + 1
        for run_tokens, run_positions in zip(np.split(tokens, breaks), np.split(positions, breaks)):
            for start in range(0, len(run_tokens), ws.T):
                cache.next_pos = int(run_positions[start])
                self._run(cache, run_tokens[start:start + ws.T], ws, False)
        cache.next_pos = end

    def feed(self, tokens, *, cache: KVCache | None = None, all_logits: bool = False) -> np.ndarray:
        """Append tokens to the cache; returns logits (len(tokens), V) or (1, V) of the last one.
        The (1, V) result is a buffer reused by the next step (no allocation per token): copy it
        to keep it."""
        cache = self.cache if cache is None else cache
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1 or len(tokens) == 0:
            raise ValueError("tokens must be a non-empty list of token ids")
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        if not cache.long_rope and self._uses_long_rope(cache.next_pos + len(tokens) - 1):
            self._switch_to_long_rope(cache)
        if len(tokens) == 1 and not all_logits and cache is self.cache:
            return self._run(cache, tokens, self._decode_ws, False)  # the decode step allocates nothing
        ws = self._chunk_workspace(cache, all_logits)
        parts = []
        for start in range(0, len(tokens), ws.T):
            out = self._run(cache, tokens[start:start + ws.T], ws, all_logits)
            parts.append(out.copy() if all_logits else out)
        return np.concatenate(parts) if all_logits else parts[-1]

    def step(self, token: int) -> np.ndarray:
        """feed([token]) without the per-call conversions: the decode loop's hot path."""
        if not 0 <= token < self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        cache = self.cache
        if not cache.long_rope and self._uses_long_rope(cache.next_pos):
            self._switch_to_long_rope(cache)
        self._token1[0] = token
        return self._run(cache, self._token1, self._decode_ws, False)

    def logits(self, ids) -> np.ndarray:
        """float32 (len(ids), V) logits of `ids` in a fresh context (the model's cache is untouched)."""
        ids = list(ids)
        cache = KVCache(self.config, max(2, len(ids) + 1), sinks=0, dtype=self.kv_dtype)
        return self.feed(ids, cache=cache, all_logits=True)
