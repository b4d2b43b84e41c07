"""Speed figures in llama-bench's convention: prefill of a P-token prompt in one go, then G
single-token decode steps from an empty context; tokenization and sampling excluded."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
from numba import njit, prange

from .rss import peak_rss_mib


@dataclass
class BenchResult:
    prompt_tokens: int
    gen_tokens: int
    threads: int
    load_s: float  # edgephi.load: config, mapped weights, tokenizer (without jit_s)
    jit_s: float  # loading the kernels from numba's cache, or compiling them on a first run
    prefill_tok_s: float  # median over repetitions
    decode_tok_s: float
    ttft_s: float  # prefill of the prompt until the first token's logits (median)
    peak_rss_mb: float
    backend: str = "numba"
    # numba backend only (None on onnxruntime, whose weights onnxruntime lays out itself):
    weight_bytes_per_token: int | None = None  # every linear's planes, the norms and one embedding row
    read_gb_s: float | None = None  # memory read bandwidth with the same threads (median of the probes)
    # decode speed over the bandwidth bound, median of rounds that each probe the bandwidth and then
    # decode: the host's bandwidth drifts by tens of percent from one second to the next here
    bandwidth_fraction: float | None = None
    bandwidth_rounds: list | None = None  # [probed GB/s, decode tok/s] of each round
    weights_file_mb: float | None = None  # MiB, like peak_rss_mb
    kv_cache_mb: float | None = None  # the KV arrays at the bench's context (their pages as tokens fill them)

    @property
    def rss_beyond_model_mb(self) -> float | None:
        """Peak RSS less the weights file and the KV cache: what the runtime itself costs."""
        if self.weights_file_mb is None:
            return None
        return self.peak_rss_mb - self.weights_file_mb - self.kv_cache_mb

    def as_dict(self) -> dict:
        def rounded(v):  # six significant digits: a small figure (a fraction on a busy machine) keeps its precision
            if isinstance(v, float):
                return float(f"{v:.6g}")
            return [rounded(x) for x in v] if isinstance(v, (list, tuple)) else v
        fields = {k: rounded(v) for k, v in asdict(self).items()}
        fields["rss_beyond_model_mb"] = rounded(self.rss_beyond_model_mb)
        return fields


@njit(cache=True, parallel=True)
def _sum_words(words):
    total = 0
    for i in prange(words.shape[0]):
        total += words[i]
    return total


PROBE_BYTES = 1 << 30  # far larger than the caches
MIN_PROBE_BYTES = 64 << 20  # still far larger than a small board's caches (a Pi 5's L3 is 2 MB)


def available_memory_bytes(meminfo_path: str = "/proc/meminfo") -> int | None:
    """What the kernel says can be allocated without swapping (MemAvailable), or None."""
    try:
        with open(meminfo_path) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def probe_bytes(available: int | None) -> int:
    """The bandwidth probe's buffer: 1 GiB, or a quarter of the available memory on a smaller
    machine (a 2 GB board with a model loaded has a few hundred MB to spare); 0: no probe."""
    if available is None:
        return PROBE_BYTES
    size = min(PROBE_BYTES, available // 4) // 8 * 8
    return size if size >= MIN_PROBE_BYTES else 0


def read_bandwidth(words: np.ndarray, repetitions: int) -> float:
    """GB/s of a parallel sum over `words` (best of several runs)."""
    _sum_words(words)
    best = 0.0
    for _ in range(repetitions):
        t0 = time.perf_counter()
        _sum_words(words)
        best = max(best, words.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def run(path, *, threads=None, prompt_tokens=512, gen_tokens=128, repetitions=5, backend=None,
        kv_dtype="float16") -> BenchResult:
    from . import load

    for name, value in (("prompt_tokens", prompt_tokens), ("gen_tokens", gen_tokens), ("repetitions", repetitions)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    started = time.perf_counter()
    model = load(path, threads=threads, context=max(prompt_tokens, gen_tokens) + 8, backend=backend, kv_dtype=kv_dtype)
    load_s = time.perf_counter() - started
    runtime = model.backend
    kernels_s = runtime.kernels_s  # numba: inside load; onnxruntime: None, at the first step
    rng = np.random.default_rng(0)
    vocab = model.tokenizer.n_vocab
    prompt = [int(t) for t in rng.integers(0, vocab, prompt_tokens)]
    gen = [int(t) for t in rng.integers(0, vocab, gen_tokens)]
    sequence = model.sequence()
    started = time.perf_counter()
    sequence.feed(prompt[:2])
    sequence.step(gen[0])
    if kernels_s is None:
        jit_s = time.perf_counter() - started
    else:
        jit_s, load_s = kernels_s, load_s - kernels_s
    prefill, decode, ttft = [], [], []
    for _ in range(repetitions):
        sequence.reset()
        t0 = time.perf_counter()
        sequence.feed(prompt)
        t1 = time.perf_counter()
        sequence.reset()
        t2 = time.perf_counter()
        for tok in gen:
            sequence.step(tok)
        t3 = time.perf_counter()
        prefill.append(prompt_tokens / (t1 - t0))
        ttft.append(t1 - t0)
        decode.append(gen_tokens / (t3 - t2))
    peak_rss_mb = peak_rss_mib()  # before the bandwidth probe's buffer
    decode_tok_s = statistics.median(decode)
    result = BenchResult(prompt_tokens, gen_tokens, runtime.threads or os.cpu_count(), load_s, jit_s,
                         statistics.median(prefill), decode_tok_s, statistics.median(ttft), peak_rss_mb,
                         runtime.name)
    per_token = runtime.weight_bytes_per_token
    if per_token is not None:  # a backend that knows what its weights cost
        result.weights_file_mb = runtime.weights_file_bytes / 2**20
        result.kv_cache_mb = model.kv_bytes(sequence.capacity) / 2**20
        result.weight_bytes_per_token = per_token
        probe = probe_bytes(available_memory_bytes())
        if probe:
            result.bandwidth_rounds = _paired_bandwidth_rounds(sequence, gen, repetitions, probe)
            result.read_gb_s = statistics.median(gb_s for gb_s, _ in result.bandwidth_rounds)
            result.bandwidth_fraction = statistics.median(
                tok_s * result.weight_bytes_per_token / (gb_s * 1e9) for gb_s, tok_s in result.bandwidth_rounds)
    return result


def _paired_bandwidth_rounds(sequence, gen, rounds, probe):
    """[GB/s, decode tok/s] of rounds that each probe the bandwidth (over `probe` bytes) right
    before decoding `gen`. Runs after peak RSS is taken: the probe's buffer is not the model's."""
    words = np.ones(probe // 8, np.uint64)
    pairs = []
    for _ in range(rounds):
        gb_s = read_bandwidth(words, repetitions=2)
        sequence.reset()
        t0 = time.perf_counter()
        for tok in gen:
            sequence.step(tok)
        pairs.append([gb_s, len(gen) / (time.perf_counter() - t0)])
    return pairs
