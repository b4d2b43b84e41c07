"""The Arm row dots without an Arm board: instructions per block of 32 weights in each kernel's
main loop, compiled by LLVM for the ISA's own CPU (neon: Cortex-A72, Raspberry Pi 4; neon-dotprod:
Cortex-A76, Pi 5), and llvm-mca's estimate of its cycles per block where llvm-mca is installed
(Debian: apt install llvm), beside the cycles per block the board's memory allows.

    python benchmarks/arm_kernels.py [--llvm-mca PATH] [--formats q4_0,q8_0]

The budget is the time a core may spend on a block while all cores stream weights at the board's
memory bandwidth: block bytes * cores * clock / bandwidth. The boards' figures are assumptions
(printed), not measurements: Pi 5 4 x 2.4 GHz at 17 GB/s, Pi 4 4 x 1.8 GHz at 6 GB/s.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.kernel_assembly import ARM_CPUS, main_loop  # noqa: E402

from edgephi.block_codecs import CODECS  # noqa: E402
from edgephi.isa_ops import OP_SETS  # noqa: E402
from edgephi.quant import FORMATS  # noqa: E402
from edgephi.row_dot import blocks_per_iteration  # noqa: E402

BOARDS = {"neon": ("Pi 4", 4, 1.8, 6.0), "neon-dotprod": ("Pi 5", 4, 2.4, 17.0)}  # name, cores, GHz, GB/s
ITERATIONS = 200


def block_bytes(name: str) -> float:
    """Bytes of weights per 32 values (GGUF's size: edgephi's planes hold the same bytes)."""
    fmt = FORMATS[name]
    return fmt.gguf_block_bytes * 32 / fmt.row_multiple


def mca_cycles(llvm_mca: str, cpu: str, instructions: list[str]) -> float | None:
    """llvm-mca's cycles for one iteration of the loop (its branch left out)."""
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
        f.write("\n".join(i for i in instructions if not i.startswith("b")) + "\n")
    done = subprocess.run([llvm_mca, "-mtriple=aarch64-linux-gnu", f"-mcpu={cpu}", f"-iterations={ITERATIONS}", f.name],
                          capture_output=True, text=True)
    Path(f.name).unlink()
    found = re.search(r"Total Cycles:\s+(\d+)", done.stdout)
    return int(found.group(1)) / ITERATIONS if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llvm-mca", default=shutil.which("llvm-mca"))
    parser.add_argument("--formats", default=",".join(CODECS))
    args = parser.parse_args()
    names = args.formats.split(",")
    if not args.llvm_mca:
        print("llvm-mca not found (Debian: apt install llvm): instruction counts only")
    print(f"{'isa':13} {'cpu':11} {'format':7} {'instr/block':>11} {'mca cyc/block':>13} {'budget':>7}")
    for isa, (_, cpu, _) in ARM_CPUS.items():
        board, cores, ghz, gbps = BOARDS[isa]
        for name in names:
            loop = main_loop(isa, name)
            blocks = blocks_per_iteration(OP_SETS[isa], CODECS[name])
            cycles = mca_cycles(args.llvm_mca, cpu, loop.instructions) if args.llvm_mca else None
            budget = block_bytes(name) * cores * ghz / gbps
            mca = f"{cycles / blocks:13.1f}" if cycles else f"{'-':>13}"
            print(f"{isa:13} {cpu:11} {name:7} {len(loop.instructions) / blocks:11.1f} {mca} {budget:7.1f}")
        print(f"  budget: {board}, {cores} cores at {ghz} GHz sharing {gbps} GB/s (assumed)")


if __name__ == "__main__":
    main()
