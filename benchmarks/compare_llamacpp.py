"""edgephi vs llama.cpp on the same GGUF weights and threads, alternating runs; prints medians and ratios.

    python benchmarks/compare_llamacpp.py GGUF [--threads 2] [--prompt-tokens 512] [--gen-tokens 128]

llama-bench's convention: prefill of a P-token prompt in one go, then G single-token decode steps;
tokenization and sampling are excluded. The GGUF is converted losslessly into a temporary
edgephi folder first. Needs llama-cpp-python (a test dependency).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def edgephi_run(model, prompt, gen):
    model.cache.reset()
    t0 = time.perf_counter()
    model.feed(prompt)
    t1 = time.perf_counter()
    for tok in gen:
        model.feed([tok])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), len(gen) / (t2 - t1)


def llamacpp_run(llm, prompt, gen):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for tok in gen:
        llm.eval([tok])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), len(gen) / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repetitions", type=int, default=5)
    args = ap.parse_args()

    import llama_cpp

    import edgephi
    from convert import convert

    with tempfile.TemporaryDirectory() as tmp:
        convert(args.gguf, Path(tmp) / "m", quant=None)
        model = edgephi.load(Path(tmp) / "m", threads=args.threads, context=args.prompt_tokens + args.gen_tokens + 8)
        llm = llama_cpp.Llama(str(args.gguf), n_threads=args.threads, n_threads_batch=args.threads,
                              n_ctx=args.prompt_tokens + args.gen_tokens + 8, n_batch=args.prompt_tokens,
                              verbose=False)
        rng = np.random.default_rng(0)
        vocab = min(model.config.vocab_size, llm.n_vocab())
        prompt = [int(t) for t in rng.integers(100, vocab, args.prompt_tokens)]
        gen = [int(t) for t in rng.integers(100, vocab, args.gen_tokens)]
        edgephi_run(model, prompt[:64], gen[:8])  # compile / warm up both
        llamacpp_run(llm, prompt[:64], gen[:8])
        results = {"edgephi": [], "llama.cpp": []}
        for _ in range(args.repetitions):
            results["edgephi"].append(edgephi_run(model, prompt, gen))
            results["llama.cpp"].append(llamacpp_run(llm, prompt, gen))
    med = {k: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v)) for k, v in results.items()}
    print(f"{args.gguf.name}, {args.threads} threads, pp{args.prompt_tokens} / tg{args.gen_tokens}, "
          f"median of {args.repetitions} alternating runs")
    print(f"{'':12} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for k, (p, d) in med.items():
        print(f"{k:12} {p:14.1f} {d:13.1f}")
    (pe, de), (pl, dl) = med["edgephi"], med["llama.cpp"]
    print(f"{'ratio':12} {pe / pl:13.2f}x {de / dl:12.2f}x")


if __name__ == "__main__":
    main()
