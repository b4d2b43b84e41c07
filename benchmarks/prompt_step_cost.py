"""What short prompt steps cost now that every prompt step goes through the prefill panels (so that a
prompt split anywhere gives a cold prefill's logits): a step of T tokens after a 64-token prompt,
as a prompt step (panels) and as a verify step (below 8 tokens the row tiles, which prompt steps
used before; from 8 on the panels too).

    python benchmarks/prompt_step_cost.py MODEL_FOLDER [--threads 2] [--repetitions 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repetitions", type=int, default=5)
    args = ap.parse_args()
    import edgephi

    model = edgephi.load(args.model, threads=args.threads, prefix_cache=0)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size
    start = rng.integers(0, vocab, 64).tolist()
    print(f"{args.model.name}, {args.threads} threads, min of {args.repetitions}: ms per step of T tokens")
    print(f"{'T':>3} {'prompt step (panels)':>21} {'verify step':>12} {'ratio':>7}")
    for T in (1, 2, 3, 5, 7, 8):
        best = {}
        for verify in (False, True):
            times = []
            for _ in range(args.repetitions):
                sequence = model.sequence()
                sequence.feed(start)
                ids = rng.integers(0, vocab, T).tolist()
                started = time.perf_counter()
                sequence.feed(ids, verify=verify)
                times.append(time.perf_counter() - started)
            best[verify] = min(times) * 1000
        print(f"{T:3d} {best[False]:21.1f} {best[True]:12.1f} {best[False] / best[True]:6.2f}x")


if __name__ == "__main__":
    main()
