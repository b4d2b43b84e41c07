"""The batched decode step against solo steps (#18), in one process, alternating so that the
machine's drift hits both alike:

    python benchmarks/batch_decode.py MODEL [--batches 2,3,4,6,8] [--steps 20] [--repetitions 3]

For each batch size B: the time of one forward_batch step of B sequences and of B solo decode
steps of the same sequences, and their ratio (the batch's throughput gain). Each sequence holds
a different prompt of 30-60 tokens. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import edgephi  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--batches", default="2,3,4,6,8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    model = edgephi.load(args.model, context=1024, prefix_cache=0, threads=args.threads)
    backend = model.backend
    backend.prepare_batching()
    sizes = [int(b) for b in args.batches.split(",")]
    sequences = [model.sequence() for _ in range(max(sizes))]
    for i, sequence in enumerate(sequences):
        sequence.feed([(97 * i + 13 * j) % 1000 + 10 for j in range(30 + 4 * i)])
    caches = [s.cache for s in sequences]

    def solo(b):
        started = time.perf_counter()
        for _ in range(args.steps):
            for cache in caches[:b]:
                backend._step_one(cache, 42)
        return (time.perf_counter() - started) / args.steps

    def batched(b):
        started = time.perf_counter()
        for _ in range(args.steps):
            backend._step_many(caches[:b], [42] * b)
        return (time.perf_counter() - started) / args.steps

    solo(1), batched(2)  # warm
    print(f"{model.folder.name}, {backend.threads} threads, {backend.isa.name}")
    print(f"{'B':>3} {'B solo steps ms':>16} {'one batch ms':>13} {'gain':>6}")
    for b in sizes:
        alone, together = [], []
        for _ in range(args.repetitions):
            alone.append(solo(b))
            together.append(batched(b))
        a, t = statistics.median(alone), statistics.median(together)
        print(f"{b:>3} {a * 1e3:>16.1f} {t * 1e3:>13.1f} {a / t:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
