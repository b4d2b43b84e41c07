"""The row-dot kernels as assembly for a CPU this host need not be, and their inner loops: what
the instruction-count test and benchmarks/arm_kernels.py read. LLVM's own backends (llvmlite
carries them all) compile the same IR the JIT compiles (row_dot.standalone_row_dot)."""

from __future__ import annotations

from dataclasses import dataclass

# (triple, cpu, features) of the CPUs the Arm instruction sets are for
ARM_CPUS = {
    "neon": ("aarch64-unknown-linux-gnu", "cortex-a72", "+neon"),  # Raspberry Pi 4
    "neon-dotprod": ("aarch64-unknown-linux-gnu", "cortex-a76", "+neon,+dotprod"),  # Raspberry Pi 5
}


def row_dot_assembly(isa: str, name: str, triple: str, cpu: str, features: str) -> str:
    import llvmlite.binding as llvm
    from llvmlite import ir

    from edgephi.row_dot import standalone_row_dot

    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    module = ir.Module()
    module.triple = triple
    standalone_row_dot(module, isa, name)
    parsed = llvm.parse_assembly(str(module))
    parsed.verify()
    machine = llvm.Target.from_triple(triple).create_target_machine(cpu=cpu, features=features, opt=3)
    builder = llvm.create_pass_builder(machine, llvm.create_pipeline_tuning_options(speed_level=3))
    builder.getModulePassManager().run(parsed, builder)
    return machine.emit_assembly(parsed)


@dataclass
class Loop:
    label: str
    instructions: list[str]


def loops(assembly: str) -> list[Loop]:
    """Every loop of an AArch64 listing: a label that a later branch jumps back to, with the
    instructions from it through the last such branch (directives and labels left out)."""
    lines = [line.split("//")[0].strip() for line in assembly.splitlines()]
    found = []
    for i, line in enumerate(lines):
        if not (line.startswith(".LBB") and line.endswith(":")):
            continue
        label = line[:-1]
        back = [j for j in range(i + 1, len(lines)) if lines[j].startswith("b") and lines[j].split()[-1] == label]
        if back:
            body = [s for s in lines[i + 1:back[-1] + 1] if s and not s.endswith(":") and not s.startswith(".")]
            found.append(Loop(label, body))
    return found


def main_loop(isa: str, name: str) -> Loop:
    """The row dot's longest loop on the ISA's own CPU: the one over groups of blocks."""
    return max(loops(row_dot_assembly(isa, name, *ARM_CPUS[isa])), key=lambda loop: len(loop.instructions))


def per_block(isa: str, name: str) -> float:
    """Instructions per block of 32 weights in the row dot's main loop."""
    from edgephi.isa_ops import OP_SETS
    from edgephi.row_dot import blocks_per_iteration

    from edgephi.block_codecs import CODECS
    return len(main_loop(isa, name).instructions) / blocks_per_iteration(OP_SETS[isa], CODECS[name])
