"""Decode (one token) matrix-vector speed of every quantized format, as weight bytes streamed per
second, on 1 and 2 threads: how close each format's block kernel comes to the memory's pace.

    python benchmarks/kernel_formats.py [--rows 8192] [--cols 3072] [--repeat 30]

The matrix is larger than the caches (8192 x 3072 is 13-26 MB per format), like a Phi-3-mini
layer's gate_up; weights are random GGUF blocks split as the converter splits them. Alongside,
a plain numpy sum over an array of the same bytes gives the machine's streaming pace right now.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgephi import matmul
from edgephi.convert.gguf_blocks import planes_from_gguf_blocks
from edgephi.convert.quantize import quantize
from edgephi.isa import choose_isa
from edgephi.quant import FORMATS
from edgephi.records import activations, linear_from_planes
from tests.test_quant import random_gguf_blocks

NAMES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k"]


def planes_of(name: str, rows: int, cols: int) -> dict:
    fmt = FORMATS[name]
    if fmt.quantizable:
        x = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
        return quantize(x, fmt)
    return planes_from_gguf_blocks(random_gguf_blocks(name, rows, cols), fmt, rows)


def median_seconds(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=3072)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    isa = choose_isa()
    x = np.random.default_rng(1).standard_normal((1, args.cols)).astype(np.float32)
    out = np.empty((1, args.rows), np.float32)
    act = activations(1, args.cols)
    print(f"isa {isa.name}, matrix {args.rows} x {args.cols}, median of {args.repeat}")
    print(f"{'format':8s} {'bits/w':>7s} {'MB':>6s}  " + "  ".join(f"{t} thread{'s' * (t > 1)}: GB/s (per core)"
                                                            for t in (1, 2)))
    for name in NAMES:
        planes = planes_of(name, args.rows, args.cols)
        w = linear_from_planes(name, planes)
        nbytes = sum(a.nbytes for a in planes.values())
        cells = []
        for threads in (1, 2):
            numba.set_num_threads(threads)
            seconds = median_seconds(lambda: matmul.linear(isa, w, x, out, act), args.repeat)
            cells.append(f"{nbytes / seconds / 1e9:6.2f} ({nbytes / seconds / 1e9 / threads:5.2f})")
        copy = np.frombuffer(np.random.default_rng(2).bytes(nbytes), np.uint64)
        stream = nbytes / median_seconds(lambda: copy.sum(), args.repeat) / 1e9
        print(f"{name:8s} {8 * nbytes / (args.rows * args.cols):7.3f} {nbytes / 1e6:6.1f}  "
              + "  ".join(cells) + f"   numpy sum 1 thread {stream:5.2f} GB/s")


if __name__ == "__main__":
    main()
