"""What the runtime's dependencies alone keep resident, beside what `edgephi bench` reports beyond
weights + KV (#16's bound is 150 MB = 143 MiB beyond them):

    python benchmarks/rss_floor.py MODEL [--prompt-tokens 512]

A child process imports numpy, then numba with one cached kernel loaded (LLVM's clean code pages
dropped, as edgephi does after loading its kernels), then builds tiktoken's Encoding of the
model's vocabulary; it prints its resident set after each. Another child runs `edgephi bench` on
the model. The difference is what edgephi itself adds: kernels, scratch, model records.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

KERNEL = """
import numba


@numba.njit(cache=True)
def total(x):
    s = 0.0
    for v in x:
        s += v
    return s
"""

FLOOR = r"""
import gc, json, sys
sys.path[:0] = [sys.argv[1], sys.argv[3]]

def resident():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

steps = [("python", resident())]
import numpy
steps.append(("+ numpy", resident()))
import numba
from edgephi.jit_memory import numba_without_scipy_linalg, release_library_pages
with numba_without_scipy_linalg():
    from floor_kernel import total
    total(numpy.ones(4))
release_library_pages()
steps.append(("+ numba, one cached kernel", resident()))
from edgephi.tokenizer import Tokenizer
tokenizer = Tokenizer.from_folder(sys.argv[2])  # tiktoken's Encoding, built as load() builds it
gc.collect()
n_vocab = tokenizer.n_vocab
steps.append((f"+ tiktoken Encoding ({n_vocab} tokens)", resident()))
print(json.dumps(steps))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as where:  # the floor's kernel caches in a folder of its own
        script = Path(where) / "floor.py"
        script.write_text(FLOOR)
        (Path(where) / "floor_kernel.py").write_text(KERNEL)
        for _ in range(2):  # the first run compiles the kernel; the second loads it, as a warm start does
            done = subprocess.run([sys.executable, str(script), str(ROOT), args.model, where], capture_output=True,
                                  text=True, check=True, cwd=where)
    steps = json.loads(done.stdout)
    bench = subprocess.run([sys.executable, "-c", "from edgephi.cli import main; main()", "bench", "-m", args.model,
                            "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", "8", "--repetitions", "1",
                            "--json"],
                           capture_output=True, text=True, check=True, cwd=ROOT)
    figures = json.loads(bench.stdout.strip().splitlines()[-1])
    print(f"{'dependencies alone':40} {'resident MiB':>12}")
    for name, mib in steps:
        print(f"  {name:38} {mib:12.1f}")
    floor = steps[-1][1]
    rest = figures["rss_beyond_model_mb"]
    print(f"edgephi bench pp{args.prompt_tokens}: peak {figures['peak_rss_mb']:.0f} MiB = weights file "
          f"{figures['weights_file_mb']:.0f} + KV {figures['kv_cache_mb']:.0f} + rest {rest:.1f}")
    print(f"  rest - dependencies' floor = {rest - floor:.1f} MiB of edgephi's own (kernels, scratch, records)")
    print(f"  #16's bound: rest <= 143.1 MiB (150 MB); the floor leaves edgephi {143.1 - floor:.1f} MiB")


if __name__ == "__main__":
    main()
