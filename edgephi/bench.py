"""Speed figures in llama-bench's convention: prefill of a P-token prompt in one go, then G
single-token decode steps from an empty context; tokenization and sampling excluded."""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np


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

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def run(path, *, threads=None, prompt_tokens=512, gen_tokens=128, repetitions=5) -> BenchResult:
    from . import load

    for name, value in (("prompt_tokens", prompt_tokens), ("gen_tokens", gen_tokens), ("repetitions", repetitions)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    started = time.perf_counter()
    model = load(path, threads=threads, context=max(prompt_tokens, gen_tokens) + 8)
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
    import numba

    return BenchResult(prompt_tokens, gen_tokens, numba.get_num_threads(), load_s, jit_s, statistics.median(prefill),
                       statistics.median(decode), statistics.median(ttft),
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
