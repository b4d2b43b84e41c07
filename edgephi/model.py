"""A loaded model (config, mapped weights, tokenizer) that many threads may share, and the
sequences decoded through it, each with a KV ring of its own.

Threads never corrupt each other: a Sequence owns everything a step writes except the scratch
arrays, and every forward() call runs under one process-wide lock, which also holds the scratch.
numba runs one parallel region at a time anyway (its default workqueue layer aborts the process
when two threads launch one at once), so the lock costs no throughput on a single model.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numba
import numpy as np

from .api import LanguageModel, check_context, check_threads
from .errors import EdgephiError, ModelFormatError
from .format import GENERATION_FILE, WEIGHTS_FILE, ModelConfig
from .forward import ATTENTION_TOKENS, Workspace, forward
from .jit_memory import numba_without_scipy_linalg, release_compiler_pages
from .kv_cache import DEFAULT_SINKS, KV_DTYPES, KVCache
from .model_folder import ModelFolder, read_model_folder
from .weights import load_weights

DEFAULT_KV_BUDGET = 512 << 20  # default context is capped so the KV cache fits in 512 MiB
PREFILL_CHUNK = 256  # most tokens per prefill step
# A prefill chunk's activations stay within this, so large models get shorter chunks (Phi-4-mini:
# 48 tokens, not 51 MB of scratch for 256), but never below 32 tokens: Phi-4-mini prefills as fast
# in chunks of 48, 80 or 256 tokens and 15% slower in chunks of 32 or 16.
PREFILL_SCRATCH_BYTES = 12 << 20
MIN_PREFILL_CHUNK = 32

KERNEL_LOCK = threading.Lock()  # one forward() at a time in the process (see the module docstring)


def rope_inv_freq(cfg: ModelConfig, factors) -> np.ndarray:
    """Inverse frequencies (R/2,) in float32, computed as transformers does."""
    exponent = np.arange(0, cfg.rotary_dim, 2, dtype=np.float32) / np.float32(cfg.rotary_dim)
    base = np.float32(cfg.rope_theta) ** exponent
    if factors is not None:
        base = np.asarray(factors, dtype=np.float32) * base
    return (np.float32(1.0) / base).astype(np.float32)


def prefill_chunk_tokens(cfg: ModelConfig) -> int:
    """Tokens per prefill step: as many as PREFILL_SCRATCH_BYTES of activations hold, within bounds."""
    by_scratch = PREFILL_SCRATCH_BYTES // Workspace.bytes_per_token(cfg)
    return min(PREFILL_CHUNK, max(MIN_PREFILL_CHUNK, by_scratch - by_scratch % ATTENTION_TOKENS))


class Model(LanguageModel):
    backend = "numba"

    def __init__(self, folder: str | Path | ModelFolder, *, threads: int | None = None, context: int | None = None,
                 kv_dtype: str = "float16"):
        files = folder if isinstance(folder, ModelFolder) else read_model_folder(folder)
        self.folder, self.config, self.tokenizer = files.path, files.config, files.tokenizer
        self.generation_config, self.generation_file = files.generation, files.path / GENERATION_FILE
        self.threads = min(check_threads(threads) or numba.config.NUMBA_NUM_THREADS,  # default: every core
                           numba.config.NUMBA_NUM_THREADS)
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
        self.kv_dtype = kv_dtype
        cfg = self.config
        if context is None:
            by_budget = max(256, DEFAULT_KV_BUDGET // cfg.kv_bytes_per_token)
            context = max(2, min(cfg.max_position_embeddings, by_budget))
        self.context = check_context(context)
        with numba_without_scipy_linalg():  # the typed lists of the weights are numba's first dispatch
            self.weights = load_weights(self.folder, cfg)
        scaling = cfg.rope_scaling
        self._inv_freq_short = rope_inv_freq(cfg, scaling.short_factor if scaling else None)
        self._inv_freq_long = rope_inv_freq(cfg, scaling.long_factor) if scaling else self._inv_freq_short
        self._attention_factor = np.float32(scaling.attention_factor if scaling else 1.0)
        self._shape = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rotary_dim)
        self._eps = np.float32(cfg.rms_norm_eps)
        self._window = cfg.sliding_window or 0
        self.prefill_chunk = prefill_chunk_tokens(cfg)
        self._workspaces: dict[int, Workspace] = {}  # tokens per step -> scratch; used under KERNEL_LOCK
        started = time.perf_counter()
        self._load_kernels()
        self.kernels_s = time.perf_counter() - started  # loading (or on a first run compiling) them

    def sequence(self, context: int | None = None, *, sinks: int = DEFAULT_SINKS) -> "Sequence":
        """A new token sequence with a KV ring of its own (`context` slots, default the model's)."""
        if not isinstance(sinks, int) or isinstance(sinks, bool) or sinks < 0:
            raise ValueError(f"sinks must be an integer >= 0, got {sinks!r}")
        return Sequence(self, self.context if context is None else check_context(context), sinks)

    def logits(self, ids) -> np.ndarray:
        """float32 (len(ids), V) logits of `ids` in a fresh context."""
        ids = list(ids)
        return self.sequence(max(2, len(ids) + 1), sinks=0).feed(ids, all_logits=True)

    # -- stepping (Sequence calls these) ---------------------------------------------------------

    def _load_kernels(self) -> None:
        """Load the forward pass's machine code from numba's cache (compiling it on the very first
        run) before any weight page is touched, then drop the compiler's code pages: the peak
        resident set is then weights plus what the run keeps, not weights plus LLVM."""
        cache = KVCache(self.config, 2, sinks=0, dtype=self.kv_dtype)
        one = np.zeros(1, np.int64)
        logits = np.zeros((1, self.config.vocab_size), np.float32)
        args = self._forward_args(cache, one, one, one, self._workspace(1, 2), logits, False)
        forward.compile(tuple(numba.typeof(a) for a in args))
        release_compiler_pages()

    def _workspace(self, tokens: int, capacity: int) -> Workspace:
        """Scratch for steps of up to `tokens` tokens over a ring of `capacity` slots; a larger
        ring (a session or logits() beyond the model's context) replaces it for good."""
        ws = self._workspaces.get(tokens)
        if ws is None or ws.scores.shape[1] < capacity:
            ws = self._workspaces[tokens] = Workspace(self.config, tokens, max(capacity, self.context))
        return ws

    def _forward_args(self, cache: KVCache, tokens, positions, slots, ws: Workspace, logits, all_logits: bool):
        w = self.weights
        inv_freq = self._inv_freq_long if cache.long_rope else self._inv_freq_short
        return (tokens, positions, slots, cache.n_slots, self._shape, self._eps, inv_freq,
                self._attention_factor, self._window, w.embed, w.output, w.norm, w.attn_norms,
                w.ffn_norms, w.qkv, w.o, w.gate_up, w.down, cache.k, cache.v, cache.slot_pos,
                *ws.buffers(len(tokens)), logits, all_logits)

    def _run(self, cache: KVCache, tokens: np.ndarray, logits: np.ndarray, all_logits: bool) -> None:
        """One forward step of len(tokens) <= prefill_chunk new tokens into `cache`, writing the
        logits of every token (all_logits) or of the last one into `logits`."""
        with KERNEL_LOCK:  # which also guards the shared scratch
            app_threads = numba.get_num_threads()  # numba keeps the count per calling thread
            if app_threads != self.threads:
                numba.set_num_threads(self.threads)
            try:
                positions, slots = cache.append(tokens)
                ws = self._workspace(1 if len(tokens) == 1 else self.prefill_chunk, cache.capacity)
                nonfinite = forward(*self._forward_args(cache, tokens, positions, slots, ws, logits, all_logits))
            finally:
                if app_threads != self.threads:  # the calling app's own numba code keeps its count
                    numba.set_num_threads(app_threads)
        if nonfinite:
            raise ModelFormatError(f"{self.folder / WEIGHTS_FILE}: the model computed {nonfinite} non-finite "
                                   f"values (NaN or Inf) at position {int(positions[-1])}: its weights hold "
                                   "values that overflow float32")


class Sequence:
    """One token sequence decoded through a shared Model: its KV ring and its logits row. Use a
    sequence from one thread at a time; different sequences may step in different threads."""

    def __init__(self, model: Model, capacity: int, sinks: int = DEFAULT_SINKS):
        self.model = model
        self.cache = KVCache(model.config, capacity, sinks=sinks, dtype=model.kv_dtype)
        self._logits = np.zeros((1, model.config.vocab_size), np.float32)  # (1, V), reused by every step
        self._token1 = np.zeros(1, np.int64)
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

    def feed(self, tokens, *, all_logits: bool = False) -> np.ndarray:
        """Append tokens; returns logits (len(tokens), V), or (1, V) of the last one. The (1, V)
        result is a buffer the next step reuses (no allocation per token): copy it to keep it."""
        tokens = self.model.check_tokens(tokens)
        self._claim()
        try:
            self._switch_rope_if_needed(self.cache.next_pos + len(tokens) - 1)
            step = min(self.model.prefill_chunk, self.cache.max_chunk)
            parts = []
            for start in range(0, len(tokens), step):
                chunk = tokens[start:start + step]
                out = np.empty((len(chunk), self._logits.shape[1]), np.float32) if all_logits else self._logits
                self.model._run(self.cache, chunk, out, all_logits)
                parts.append(out)
        finally:
            self._busy.release()
        return np.concatenate(parts) if all_logits else self._logits

    def step(self, token: int) -> np.ndarray:
        """feed([token]) without the per-call conversions: the decode loop's hot path."""
        if not 0 <= token < self.model.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.model.config.vocab_size})")
        self._claim()
        try:
            self._switch_rope_if_needed(self.cache.next_pos)
            self._token1[0] = token
            self.model._run(self.cache, self._token1, self._logits, False)
        finally:
            self._busy.release()
        return self._logits

    def _claim(self) -> None:
        if not self._busy.acquire(blocking=False):
            raise EdgephiError("this sequence (or chat session) is already stepping in another thread; "
                               "give each thread a sequence or chat session of its own")

    def _switch_rope_if_needed(self, last_position: int) -> None:
        """Crossing original_max_position_embeddings: keys cached with the short LongRoPE factors
        are recomputed with the long ones, as transformers does when it drops its cache there."""
        cfg, cache = self.model.config, self.cache
        if cache.long_rope or cfg.rope_scaling is None or last_position + 1 <= cfg.original_max_position_embeddings:
            return
        tokens, positions, _ = cache.cached_tokens()
        cache.long_rope = True
        end = cache.next_pos
        cache.slot_pos[:] = -1
        step = min(self.model.prefill_chunk, cache.max_chunk)
        # replay runs of consecutive positions (the kept prefix, then the ring) into the same slots
        breaks = np.nonzero(np.diff(positions) != 1)[0] + 1
        for run_tokens, run_positions in zip(np.split(tokens, breaks), np.split(positions, breaks)):
            for start in range(0, len(run_tokens), step):
                cache.next_pos = int(run_positions[start])
                self.model._run(cache, run_tokens[start:start + step], self._logits, False)
        cache.next_pos = end

