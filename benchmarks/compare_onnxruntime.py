"""edgephi's numba kernels vs onnxruntime on the same model and threads, alternating runs.

    python benchmarks/compare_onnxruntime.py MODEL_FOLDER ONNX_FOLDER [--threads 2] [--prompt-tokens 128]
        [--gen-tokens 32] [--repetitions 3]

ONNX_FOLDER is `edgephi export-onnx MODEL_FOLDER ONNX_FOLDER`'s output. Each run is a fresh
`edgephi bench --json` process, so start-up and peak memory are each backend's own.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

KEYS = ("prefill_tok_s", "decode_tok_s", "ttft_s", "load_s", "peak_rss_mb")


def bench(folder, backend, args) -> dict:
    cmd = [sys.executable, "-c", "from edgephi.cli import main; main()", "bench", "-m", str(folder),
           "--backend", backend, "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
           "--repetitions", "1", "--json"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("onnx")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repetitions", type=int, default=3)
    args = ap.parse_args()
    runs = {"numba": [], "onnxruntime": []}
    for _ in range(args.repetitions):
        runs["numba"].append(bench(args.model, "numba", args))
        runs["onnxruntime"].append(bench(args.onnx, "onnxruntime", args))
    medians = {b: {k: statistics.median(r[k] for r in rs) for k in KEYS} for b, rs in runs.items()}
    print(f"{args.threads} threads, median of {args.repetitions} alternating runs")
    print(f"{'':14s}" + "".join(f"{k:>15s}" for k in KEYS))
    for backend, m in medians.items():
        print(f"{'edgephi' if backend == 'numba' else 'onnxruntime':14s}" + "".join(f"{m[k]:15.2f}" for k in KEYS))
    ratio = {k: medians["numba"][k] / medians["onnxruntime"][k] for k in KEYS}
    print(f"{'ratio':14s}" + "".join(f"{ratio[k]:14.2f}x" for k in KEYS))


if __name__ == "__main__":
    main()
