"""The numba backend: a loaded model (config, mapped weights, tokenizer) that many threads may share.

Threads never corrupt each other: a sequence's cache (a KV ring of its own) holds everything a step
writes except the scratch arrays, and every forward() call runs under one process-wide lock, which
also holds the scratch.
numba runs one parallel region at a time anyway (its default workqueue layer aborts the process
when two threads launch one at once), so the lock costs no throughput on a single model; and
decode steps that several threads ask for at once run as one batched step (decode_batch.py).
"""

from __future__ import annotations

from collections.abc import Callable

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numba
import numpy as np
from numba.typed import List

from .backend import check_context, check_threads
from .cpu_cores import idle_cores
from .errors import ModelFormatError
from .format import GENERATION_FILE, WEIGHTS_FILE, ModelConfig
from .decode_batch import MAX_BATCH, StepBatcher
from .forward import forward, forward_batch, new_scratch, scratch_bytes_per_token
from .isa import choose_isa
from .jit_cache import compile_progress, is_cached, use_kernel_cache
from .jit_memory import drop_linking_modules, numba_without_scipy_linalg, release_library_pages
from .kernels import copy_first_rows
from .kv_cache import DEFAULT_SINKS, KV_DTYPES, KVCache, kv_slot_bytes
from .model_folder import ModelFolder, read_model_folder
from .records import KvArrays, Scratch
from .ring_pool import RingPool
from .weights import _append, _list_of, load_transformer

DEFAULT_KV_BUDGET = 512 << 20  # default context is capped so the KV cache fits in 512 MiB
PREFILL_CHUNK = 256  # most tokens per prefill step
# A prefill chunk's activations stay within this, so large models get shorter chunks (Phi-3-mini and
# Phi-4-mini: 72 tokens, not 40 MB of scratch for 256), but never below 32 tokens. Each chunk
# unpacks every weight panel once (matmul._matmul_panels): on the Phi-3-mini shape a 256-token
# prompt prefills at 21, 28, 28 and 33 tok/s in chunks of 32, 64, 128 and 256 tokens.
PREFILL_SCRATCH_BYTES = 12 << 20
MIN_PREFILL_CHUNK = 32
CHUNK_MULTIPLE = 8  # chunks of whole panel tiles (4 tokens on AVX-512, 2 elsewhere)

# one forward() (or other parallel kernel) at a time in the process (see the module docstring);
# forward() releases the GIL, so the app's other threads (a server's event loop, other
# generations' sampling) run while a step computes
KERNEL_LOCK = threading.Lock()


def kv_arrays(cache: KVCache) -> KvArrays:
    """The ring as the next forward step reads it."""
    return KvArrays(cache.k, cache.v, cache.k_scale, cache.v_scale, cache.slot_pos, cache.n_slots, cache.long_rope)


def compiled(kernel, args, on_compile: Callable[[int, float], None] | None):
    """The kernel's machine code for these arguments' types, loaded from numba's cache; on a first
    run compiled, telling on_compile(functions compiled, seconds) as it goes."""
    signature = tuple(numba.typeof(a) for a in args)
    if on_compile is not None and not is_cached(kernel, signature):
        with compile_progress(on_compile):
            return kernel.compile(signature)
    return kernel.compile(signature)


@contextmanager
def kernel_threads(threads: int):
    """Under KERNEL_LOCK, with numba's thread count set to `threads` for the calling thread and
    the calling app's own count given back afterwards (numba keeps it per calling thread)."""
    with KERNEL_LOCK:
        app_threads = numba.get_num_threads()
        if app_threads != threads:
            numba.set_num_threads(threads)
        try:
            yield
        finally:
            if app_threads != threads:
                numba.set_num_threads(app_threads)


def prefill_chunk_tokens(cfg: ModelConfig) -> int:
    """Tokens per prefill step: as many as PREFILL_SCRATCH_BYTES of activations hold, within bounds."""
    by_scratch = PREFILL_SCRATCH_BYTES // scratch_bytes_per_token(cfg)
    return min(PREFILL_CHUNK, max(MIN_PREFILL_CHUNK, by_scratch - by_scratch % CHUNK_MULTIPLE))


class NumbaBackend:
    """edgephi's own kernels over the mapped weights of a model folder (a Backend, see backend.py)."""

    name = "numba"

    def __init__(self, folder: str | Path | ModelFolder, *, threads: int | None = None, context: int | None = None,
                 kv_dtype: str = "float16", isa: str | None = None,
                 on_compile: Callable[[int, float], None] | None = None):
        files = folder if isinstance(folder, ModelFolder) else read_model_folder(folder)
        self.folder, self.config, self.tokenizer = files.path, files.config, files.tokenizer
        self.generation_config, self.generation_file = files.generation, files.path / GENERATION_FILE
        # default: the cores nothing else keeps busy (a thread on a busy core stalls every step)
        self.threads = min(check_threads(threads) or idle_cores(), numba.config.NUMBA_NUM_THREADS)
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
        self.kv_dtype = kv_dtype
        cfg = self.config
        if context is None:
            by_budget = max(256, DEFAULT_KV_BUDGET // cfg.kv_bytes_per_token)
            context = max(2, min(cfg.max_position_embeddings, by_budget))
        self.context = check_context(context)
        self.isa = choose_isa(isa)  # before any kernel compiles: a wrong EDGEPHI_ISA is one line, not a crash
        use_kernel_cache()
        with numba_without_scipy_linalg():  # the typed list of the layers is numba's first dispatch
            self.transformer = load_transformer(self.folder, cfg, self.isa)
        self.prefill_chunk = prefill_chunk_tokens(cfg)
        # ended sequences' rings, mapped, for the next ones: up to one full ring of the model's context
        self.ring_pool = RingPool(self.context * kv_slot_bytes(cfg, kv_dtype))
        self._scratch: dict[int, Scratch] = {}  # tokens per step -> scratch; used under KERNEL_LOCK
        # concurrent sequences' decode steps run as one (decode_batch.py); its kernel and buffers
        # come at first use (or prepare_batching)
        self.batcher = StepBatcher(self._step_one, self._step_many)
        self._batch_step = None
        self._batch_lock = threading.Lock()
        started = time.perf_counter()
        self._load_kernels(on_compile)
        self.kernels_s = time.perf_counter() - started  # loading (or on a first run compiling) them

    @property
    def weights_file_bytes(self) -> int:
        return (self.folder / WEIGHTS_FILE).stat().st_size

    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one decode step reads: all of every linear, the norms, one embedding row."""
        model = self.transformer

        def size(w):
            return sum(plane.nbytes for plane in w[1:])
        total = size(model.output) + model.norm.nbytes
        for layer in model.layers:
            total += sum(size(w) for w in (layer.qkv, layer.o, layer.gate_up, layer.down))
            total += layer.attn_norm.nbytes + layer.ffn_norm.nbytes
        embed = model.embed
        rows = max(1, embed.qs.shape[0], embed.f16.shape[0], embed.f32.shape[0])
        return total + size(embed) // rows

    def new_cache(self, capacity: int, sinks: int = DEFAULT_SINKS) -> SequenceCache:
        return SequenceCache(self.config, capacity, sinks, self.kv_dtype, self.ring_pool)

    def feed(self, cache: SequenceCache, tokens: np.ndarray, all_logits: bool, verify: bool = False) -> np.ndarray:
        """Append checked tokens (int64 (T,)) in chunks; logits (T, V), or cache.logits (1, V) of the last.
        verify: computed as decode steps are (prompt lookup's verify steps); else as a prompt, the
        same values however the prompt is split into calls."""
        if len(tokens) == 1 and not all_logits and verify:  # decodes as step() does, on the direct call
            return self.step(cache, int(tokens[0]))
        self.batcher.forget(cache)  # no decode step of it to wait for meanwhile
        self._switch_rope_if_needed(cache, cache.next_pos + len(tokens) - 1)
        step = min(self.prefill_chunk, cache.max_chunk)
        parts = []
        for start in range(0, len(tokens), step):
            chunk = tokens[start:start + step]
            out = np.empty((len(chunk), cache.logits.shape[1]), np.float32) if all_logits else cache.logits
            self._run(cache, chunk, out, not verify)
            parts.append(out)
        return np.concatenate(parts) if all_logits else cache.logits

    def step(self, cache: SequenceCache, token: int) -> np.ndarray:
        """One checked token through the model into the cache's own buffers: nothing is allocated.
        Steps that other threads' sequences take at the same time run with it as one forward
        step (decode_batch.py), each with the logits it would have alone, bit for bit."""
        return self.batcher.step(cache, token)

    def _step_one(self, cache: SequenceCache, token: int) -> None:
        self._switch_rope_if_needed(cache, cache.next_pos)
        cache.token[0] = token
        self._run(cache, cache.token, cache.logits, False)

    def _step_many(self, caches: list[SequenceCache], tokens: list[int]) -> None:
        """One forward_batch step: tokens[b] into caches[b], its logits into caches[b].logits."""
        B = len(caches)
        run = self._batch_kernel()
        for cache in caches:
            self._switch_rope_if_needed(cache, cache.next_pos)
        with kernel_threads(self.threads):  # which also guards the shared scratch
            ids, positions, slots = self._batch_ids[:B], self._batch_positions[:B], self._batch_slots[:B]
            rings = List.empty_list(self._kv_type)
            for b, cache in enumerate(caches):
                cache.token[0] = ids[b] = tokens[b]
                pos, slot = cache.append(cache.token)
                positions[b], slots[b] = pos[0], slot[0]
                rings.append(kv_arrays(cache))
            scratch = self._scratch_for(self.prefill_chunk, max(c.capacity for c in caches))
            logits = self._batch_logits[:B]
            nonfinite = run(ids, positions, slots, self.transformer, rings, scratch, logits)
            for b, cache in enumerate(caches):
                cache.logits[0] = logits[b]
        if nonfinite:
            raise ModelFormatError(f"{self.folder / WEIGHTS_FILE}: the model computed {nonfinite} non-finite "
                                   f"values (NaN or Inf) in a decode step of {B} sequences: its weights hold values "
                                   "that overflow float32")

    def prepare_batching(self, on_compile: Callable[[int, float], None] | None = None) -> None:
        """Load (on a first run: compile, telling on_compile as load() does) the batched decode step
        now rather than at the first moment two sequences decode together: for servers, and
        `edgephi warmup`."""
        self._batch_kernel(on_compile)

    def _batch_kernel(self, on_compile: Callable[[int, float], None] | None = None):
        with self._batch_lock:
            if self._batch_step is None:
                cfg = self.config
                probe = KVCache(cfg, 2, sinks=0, dtype=self.kv_dtype)
                self._kv_type = numba.typeof(kv_arrays(probe))
                rings = List.empty_list(self._kv_type)
                rings.append(kv_arrays(probe))
                self._batch_ids = np.zeros(MAX_BATCH, np.int64)
                self._batch_positions = np.zeros(MAX_BATCH, np.int64)
                self._batch_slots = np.zeros(MAX_BATCH, np.int64)
                self._batch_logits = np.zeros((MAX_BATCH, cfg.vocab_size), np.float32)
                args = (self._batch_ids, self._batch_positions, self._batch_slots, self.transformer, rings,
                        self._scratch_for(self.prefill_chunk, 2), self._batch_logits)
                self._batch_step = compiled(forward_batch, args, on_compile)
                drop_linking_modules(forward_batch)
                release_library_pages()
            return self._batch_step

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """float32 (len(ids), V) logits of checked ids in a fresh cache."""
        return self.feed(self.new_cache(max(2, len(ids) + 1), sinks=0), ids, True)

    def _switch_rope_if_needed(self, cache: SequenceCache, last_position: int) -> None:
        """Crossing original_max_position_embeddings: keys cached with the short LongRoPE factors
        are recomputed with the long ones, as transformers does when it drops its cache there."""
        cfg = self.config
        if cache.long_rope or cfg.rope_scaling is None or last_position + 1 <= cfg.original_max_position_embeddings:
            return
        tokens, positions, _ = cache.cached_tokens()
        cache.long_rope = True
        end = cache.next_pos
        cache.slot_pos[:] = -1
        cache.exact_end = 0  # the replay's prompt steps set it again
        step = min(self.prefill_chunk, cache.max_chunk)
        # replay runs of consecutive positions (the kept prefix, then the ring) into the same slots
        breaks = np.nonzero(np.diff(positions) != 1)[0] + 1
        for run_tokens, run_positions in zip(np.split(tokens, breaks), np.split(positions, breaks)):
            for start in range(0, len(run_tokens), step):
                cache.next_pos = int(run_positions[start])
                self._run(cache, run_tokens[start:start + step], cache.logits, True)
        cache.next_pos = end

    # -- one forward step ------------------------------------------------------------------------

    def _load_kernels(self, on_compile: Callable[[int, float], None] | None = None) -> None:
        """Load the forward pass's machine code from numba's cache (compiling it on the very first
        run, and then telling on_compile(functions compiled, seconds) as it goes) before any weight
        page is touched, then let go of what only start-up used (jit_memory.py): the IR numba keeps
        for linking, and the code pages LLVM's set-up and the other libraries' touched. The peak
        resident set is then weights plus what the run keeps, not weights plus LLVM."""
        cache = KVCache(self.config, 2, sinks=0, dtype=self.kv_dtype)
        one = np.zeros(1, np.int64)
        logits = np.zeros((1, self.config.vocab_size), np.float32)
        args = (one, one, one, self.transformer, kv_arrays(cache), self._scratch_for(1, 2), logits, False)
        # A decode step's arguments are the cache's own buffers, of exactly these types: calling the
        # compiled code directly skips numba's type resolution of the records (0.5-1 ms a token).
        self._decode_step = compiled(forward, args, on_compile)
        for rows in (cache.k, cache.k_scale):  # loaded now, not at a second session's first token
            copy_first_rows(rows, np.empty_like(rows), 1)
        drop_linking_modules(forward, copy_first_rows, _list_of, _append)  # the last two built the layers' list
        release_library_pages()

    def _scratch_for(self, tokens: int, capacity: int) -> Scratch:
        """Scratch for steps of up to `tokens` tokens over a ring of `capacity` slots; a larger
        ring (a session or logits() beyond the model's context) replaces it for good."""
        scratch = self._scratch.get(tokens)
        if scratch is None or scratch.scores.shape[1] < capacity:
            scratch = self._scratch[tokens] = new_scratch(self.config, tokens, max(capacity, self.context))
        return scratch

    def _run(self, cache: KVCache, tokens: np.ndarray, logits: np.ndarray, prompt: bool) -> None:
        """One forward step of len(tokens) <= prefill_chunk new tokens into `cache`, writing the
        logits of every token (logits (T, V)) or of the last one (logits (1, V)). prompt: a prompt
        step (forward's `prompt`), else a decode or verify step."""
        with kernel_threads(self.threads):  # which also guards the shared scratch
            positions, slots = cache.append(tokens)
            one = len(tokens) == 1 and not prompt  # a one-token prompt step needs the lanes of a longer step
            scratch = self._scratch_for(1 if one else self.prefill_chunk, cache.capacity)
            run_forward = self._decode_step if tokens is cache.token else forward
            nonfinite = run_forward(tokens, positions, slots, self.transformer, kv_arrays(cache), scratch, logits,
                                    prompt)
            if prompt:
                cache.note_prompt_step(int(positions[0]))
        if nonfinite:
            raise ModelFormatError(f"{self.folder / WEIGHTS_FILE}: the model computed {nonfinite} non-finite "
                                   f"values (NaN or Inf) at position {int(positions[-1])}: its weights hold "
                                   "values that overflow float32")


class SequenceCache(KVCache):
    """A sequence's KV ring and the two rows its steps reuse, so decoding a token allocates nothing."""

    @staticmethod
    def _copy_first_rows(source, target, n: int) -> None:
        # the kernel threads copy it; forward() runs without the GIL, so another thread's step
        # could otherwise launch a parallel region at the same time (see KERNEL_LOCK)
        with KERNEL_LOCK:
            copy_first_rows(source, target, n)

    def __init__(self, cfg: ModelConfig, capacity: int, sinks: int, dtype: str, pool: RingPool | None = None):
        super().__init__(cfg, capacity, sinks=sinks, dtype=dtype, pool=pool)
        self.logits = np.zeros((1, cfg.vocab_size), np.float32)  # (1, V): the result of every step
        self.token = np.zeros(1, np.int64)  # (1,): the token a decode step feeds
