"""Prefill matrix speed of every quantized format: the panels (gemm_tile.py) against the row tiles
they replaced, as multiply-adds per second on the machine's threads, for steps of several sizes.

    python benchmarks/prefill_gemm.py [--rows 16384] [--cols 3072] [--tokens 4,8,16,48,128] [--repeat 5]

16384 x 3072 is a Phi-3-mini layer's gate_up. Both paths compute the same exact integer work on the
same int16 activations (the activations are quantized once, outside the timing), so the ratio is
the kernels' alone. The step size where panels start to win is PANEL_MIN_TOKENS in matmul.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernel_formats import NAMES, median_seconds, planes_of
from edgephi import matmul
from edgephi.isa import choose_isa
from edgephi.records import activations, linear_from_planes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=3072)
    ap.add_argument("--tokens", default="4,8,16,48,128")
    ap.add_argument("--formats", default=",".join(NAMES))
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    isa = choose_isa()
    steps = [int(t) for t in args.tokens.split(",")]
    print(f"{args.rows} x {args.cols}, ISA {isa.name}, {numba.get_num_threads()} threads: GMAC/s, "
          f"panels / row tiles (median of {args.repeat})")
    print(f"{'format':8}" + "".join(f"{'T=' + str(t):>22}" for t in steps))
    for name in args.formats.split(","):
        w = linear_from_planes(name, planes_of(name, args.rows, args.cols))
        cells = []
        for T in steps:
            x = np.random.default_rng(1).standard_normal((T, args.cols)).astype(np.float32)
            act, out = activations(T, args.cols), np.empty((T, args.rows), np.float32)
            matmul._quantize_rows(isa, x, act)
            macs = T * args.rows * args.cols / 1e9
            panels = macs / median_seconds(lambda w=w, act=act, out=out: matmul._matmul_panels(isa, w, act, out), args.repeat)
            tiles = macs / median_seconds(lambda w=w, act=act, out=out: matmul._matmul_row_tiles(isa, w, act, out),
                                           args.repeat)
            cells.append(f"{panels:6.1f} / {tiles:5.1f} {panels / tiles:4.2f}x")
        print(f"{name:8}" + "".join(f"{c:>22}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
