"""Time of `edgephi.load` in fresh processes, and what the load-time checks cost within it.

    python benchmarks/load_time.py MODEL [MODEL ...] [--repetitions 7] [--against OTHER_CHECKOUT]

Each repetition loads every model in a process of its own (kernels already compiled, the files
in the page cache after a first warm-up load) and prints the median. The checks' share is timed
in the same processes: reading and checking the config, tokenizer and generation files, and the
finite scan of every scale, minimum, float weight and norm (the one check that reads weight
pages). With --against, the same loads run alternately from another checkout of edgephi (say the
commit before the checks), and the ratio is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
started = time.perf_counter()
import edgephi
model = edgephi.load(sys.argv[1])
total = time.perf_counter() - started
checks = None
if sys.argv[2] == "checks":
    from edgephi.model_folder import read_model_folder
    from edgephi.quant import check_finite
    from edgephi.safetensors_io import SafetensorsFile
    from edgephi.weights import read_planes
    t0 = time.perf_counter()
    files = read_model_folder(sys.argv[1])
    t1 = time.perf_counter()
    st = SafetensorsFile(files.path / "weights.safetensors")
    # the scan runs on pages the load already touched; the load's own scan touched them first
    for name in files.config.tensor_names():
        check_finite(st.path, name, read_planes(st, files.config, name)[1])
    t2 = time.perf_counter()
    checks = {"small_files_s": t1 - t0, "finite_scan_s": t2 - t1}
print(json.dumps({"load_s": total, "checks": checks}))
"""


def load_once(tree: Path, model: str, checks: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", CHILD, model, "checks" if checks else "plain"], env=env,
                          capture_output=True, text=True, cwd=tree, timeout=600)
    if done.returncode != 0:
        sys.exit(f"load failed ({tree}): {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--repetitions", type=int, default=7)
    ap.add_argument("--against", type=Path, default=None, help="another checkout of edgephi to compare with")
    args = ap.parse_args()
    trees = {"this": ROOT} | ({"other": args.against.resolve()} if args.against else {})
    for model in args.models:
        for tree in trees.values():  # compile or load the kernels, warm the page cache
            load_once(tree, model, False)
        runs = {name: [] for name in trees}
        checks = []
        for _ in range(args.repetitions):
            for name, tree in trees.items():
                result = load_once(tree, model, name == "this")
                runs[name].append(result["load_s"])
                if result["checks"]:
                    checks.append(result["checks"])
        this = statistics.median(runs["this"])
        small = statistics.median(c["small_files_s"] for c in checks)
        scan = statistics.median(c["finite_scan_s"] for c in checks)
        print(f"{model}: load {this:.3f} s (median of {args.repetitions}); reading and checking config, tokenizer "
              f"and generation files {small:.3f} s; finite scan of scales and norms {scan:.3f} s")
        if args.against:
            other = statistics.median(runs["other"])
            print(f"  {args.against}: load {other:.3f} s; this / other = {this / other:.3f}")


if __name__ == "__main__":
    main()
