"""Speed figures in llama-bench's convention: prefill of a P-token prompt in one go, then G
single-token decode steps from an empty context; tokenization and sampling excluded."""

from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
from numba import njit, prange

from . import jit_cache  # noqa: F401  (numba's cache folder)


@dataclass
class BenchResult:
    prompt_tokens: int
    gen_tokens: int
    threads: int
    load_s: float  # edgephi.load: config, mapped weights, tokenizer
    jit_s: float  # first step: compiling the kernels, or loading them from numba's cache
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

    def as_dict(self) -> dict:
        def rounded(v):
            return round(v, 4) if isinstance(v, float) else [rounded(x) for x in v] if isinstance(v, list) else v
        return {k: rounded(v) for k, v in asdict(self).items()}


@njit(cache=True, parallel=True)
def _sum_words(words):
    total = 0
    for i in prange(words.shape[0]):
        total += words[i]
    return total


PROBE_BYTES = 1 << 30  # far larger than the caches


def read_bandwidth(words: np.ndarray, repetitions: int) -> float:
    """GB/s of a parallel sum over `words` (best of several runs)."""
    _sum_words(words)
    best = 0.0
    for _ in range(repetitions):
        t0 = time.perf_counter()
        _sum_words(words)
        best = max(best, words.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def decode_bytes(weights) -> int:
    """Bytes of weights one decode step reads: all of every linear, the norms, one embedding row."""
    def size(w):
        return sum(a.nbytes for a in w[1:])
    total = size(weights.output) + weights.norm.nbytes
    for layer in range(len(weights.qkv)):
        total += sum(size(ws[layer]) for ws in (weights.qkv, weights.o, weights.gate_up, weights.down))
        total += weights.attn_norms[layer].nbytes + weights.ffn_norms[layer].nbytes
    embed_rows = max(1, weights.embed[1].shape[0], weights.embed[4].shape[0])
    return total + size(weights.embed) // embed_rows


def run(path, *, threads=None, prompt_tokens=512, gen_tokens=128, repetitions=5, backend=None) -> BenchResult:
    from . import load

    for name, value in (("prompt_tokens", prompt_tokens), ("gen_tokens", gen_tokens), ("repetitions", repetitions)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    started = time.perf_counter()
    model = load(path, threads=threads, context=max(prompt_tokens, gen_tokens) + 8, backend=backend)
    load_s = time.perf_counter() - started
    rng = np.random.default_rng(0)
    vocab = model.tokenizer.n_vocab
    prompt = [int(t) for t in rng.integers(0, vocab, prompt_tokens)]
    gen = [int(t) for t in rng.integers(0, vocab, gen_tokens)]
    started = time.perf_counter()
    model.feed(prompt[:2])
    model.step(gen[0])
    jit_s = time.perf_counter() - started
    prefill, decode, ttft = [], [], []
    for _ in range(repetitions):
        model.cache.reset()
        t0 = time.perf_counter()
        model.feed(prompt)
        t1 = time.perf_counter()
        model.cache.reset()
        t2 = time.perf_counter()
        for tok in gen:
            model.step(tok)
        t3 = time.perf_counter()
        prefill.append(prompt_tokens / (t1 - t0))
        ttft.append(t1 - t0)
        decode.append(gen_tokens / (t3 - t2))
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the bandwidth probe's buffer
    decode_tok_s = statistics.median(decode)
    result = BenchResult(prompt_tokens, gen_tokens, threads or os.cpu_count(), load_s, jit_s,
                         statistics.median(prefill), decode_tok_s, statistics.median(ttft), peak_rss_mb,
                         getattr(model, "backend", "numba"))
    if result.backend == "numba":
        import numba

        result.threads = numba.get_num_threads()
        result.weight_bytes_per_token = decode_bytes(model.weights)
        result.bandwidth_rounds = _paired_bandwidth_rounds(model, gen, repetitions)
        result.read_gb_s = statistics.median(gb_s for gb_s, _ in result.bandwidth_rounds)
        result.bandwidth_fraction = statistics.median(
            tok_s * result.weight_bytes_per_token / (gb_s * 1e9) for gb_s, tok_s in result.bandwidth_rounds)
    return result


def _paired_bandwidth_rounds(model, gen, rounds):
    """[GB/s, decode tok/s] of rounds that each probe the bandwidth right before decoding `gen`.
    Runs after peak RSS is taken: the probe's buffer is not the model's."""
    words = np.ones(PROBE_BYTES // 8, np.uint64)
    pairs = []
    for _ in range(rounds):
        gb_s = read_bandwidth(words, repetitions=2)
        model.cache.reset()
        t0 = time.perf_counter()
        for tok in gen:
            model.step(tok)
        pairs.append([gb_s, len(gen) / (time.perf_counter() - t0)])
    return pairs
