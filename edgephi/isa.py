"""Which vector instructions the kernels use: the instruction sets (ISAs) edgephi has code for,
the host's, and the choice load() makes (EDGEPHI_ISA overrides it).

The ISA reaches the kernels as an argument of its own numba type, one type per ISA, so every
ISA compiles to its own machine code and cache entry in one process: nothing is read from
globals at import, and tests run every ISA the host can execute side by side.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from numba import types
from numba.core import config
from numba.extending import NativeValue, models, register_model, typeof_impl, unbox

from .errors import EdgephiError

ISA_ENV = "EDGEPHI_ISA"


@dataclass(frozen=True)
class Isa:
    """An instruction set the block-dot kernels have an operation set for (see isa_ops.py)."""

    name: str
    machine: str  # "x86_64" or "aarch64": where it can run
    features: tuple[str, ...]  # LLVM feature names the host must have
    rank: int  # the fastest runnable one is the default

    def __repr__(self) -> str:
        return f"Isa({self.name})"


ISAS = {isa.name: isa for isa in (
    # Plain LLVM IR: vectorised for whatever the target has. On x86 the kernels' float16
    # conversions need F16C: without it LLVM calls a helper numba does not link.
    Isa("generic", "x86_64", ("f16c",), 0),
    Isa("avx2", "x86_64", ("f16c", "avx2"), 1),
    Isa("avx512", "x86_64", ("f16c", "avx512f", "avx512bw"), 2),
    Isa("avx512-vnni", "x86_64", ("f16c", "avx512f", "avx512bw", "avx512vnni"), 3),
    Isa("generic-arm", "aarch64", (), 0),
    Isa("neon", "aarch64", ("neon",), 1),  # Cortex-A72 (Raspberry Pi 4) and every 64-bit Arm board
    Isa("neon-dotprod", "aarch64", ("neon", "dotprod"), 2),  # Armv8.2+: Cortex-A76 (Pi 5), A55, phones
)}

# Linux's AT_HWCAP bits for the Arm features the kernels use (asm/hwcap.h)
AT_HWCAP = 16
ARM_HWCAP_BITS = {"neon": 1 << 1, "dotprod": 1 << 20}


def host_machine() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def arm_hwcap_features(hwcap: int) -> dict[str, bool]:
    """The kernels' Arm features from the kernel's AT_HWCAP word."""
    return {name: bool(hwcap & bit) for name, bit in ARM_HWCAP_BITS.items()}


def read_hwcap(auxv_path: str = "/proc/self/auxv") -> int | None:
    """AT_HWCAP of this process (Linux), or None where there is no auxiliary vector to read."""
    try:
        with open(auxv_path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    for at in range(0, len(data) - 15, 16):
        key, value = int.from_bytes(data[at:at + 8], "little"), int.from_bytes(data[at + 8:at + 16], "little")
        if key == AT_HWCAP:
            return value
    return None


def target_features() -> dict[str, bool]:
    """The features of the CPU the kernels run on. x86: what numba compiles for (the host's, or
    NUMBA_CPU_NAME/FEATURES' when set), since the kernels use LLVM's intrinsics. Arm: the
    kernel's HWCAP flags where Linux gives them, since the dot-product instructions are inline
    assembly that needs no LLVM feature, and emulators (qemu-user) report a generic CPU to LLVM
    but the emulated CPU's HWCAP; elsewhere (macOS) LLVM's host features."""
    if host_machine() == "aarch64" and not config.CPU_NAME:
        hwcap = read_hwcap()
        if hwcap is not None:
            return arm_hwcap_features(hwcap)
    if config.CPU_NAME:
        return {f[1:]: f[0] == "+" for f in (config.CPU_FEATURES or "").split(",") if f[:1] in "+-" and f[1:]}
    import llvmlite.binding as llvm

    return dict(llvm.get_host_cpu_features())


def runnable(isa: Isa, features: dict[str, bool] | None = None, machine: str | None = None) -> bool:
    features = target_features() if features is None else features
    return isa.machine == (machine or host_machine()) and all(features.get(f, False) for f in isa.features)


def runnable_isas() -> list[Isa]:
    """Every ISA this host (or numba's forced target CPU) can execute, fastest first."""
    features = target_features()
    return sorted((isa for isa in ISAS.values() if runnable(isa, features)), key=lambda isa: -isa.rank)


def choose_isa(requested: str | None = None) -> Isa:
    """The ISA to compile for: `requested`, else $EDGEPHI_ISA, else the fastest the host runs.
    An ISA the host cannot execute is refused here, where it would otherwise be an illegal
    instruction in the middle of a reply."""
    requested = requested or os.environ.get(ISA_ENV) or None
    options = runnable_isas()
    if requested is None:
        if not options:
            if host_machine() == "x86_64":
                raise EdgephiError("this CPU (or NUMBA_CPU_NAME/NUMBA_CPU_FEATURES) has no F16C float16 "
                                   "instructions, which edgephi's numba kernels need (x86-64 CPUs from about "
                                   "2012 on); an ONNX export runs on onnxruntime without them")
            raise EdgephiError(f"edgephi's numba kernels have no code for {platform.machine()} CPUs; an ONNX "
                               "export runs on onnxruntime")
        return options[0]
    isa = ISAS.get(requested)
    if isa is None:
        raise EdgephiError(f"{ISA_ENV}={requested!r} is not an instruction set edgephi knows "
                           f"({', '.join(ISAS)})")
    if isa not in options:
        missing = [f for f in isa.features if not target_features().get(f, False)]
        why = (f"it is for {isa.machine} CPUs" if isa.machine != host_machine()
               else f"this CPU lacks {', '.join(missing)}")
        raise EdgephiError(f"instruction set {requested!r} cannot run here: {why}; "
                           f"this CPU runs {', '.join(i.name for i in options) or 'none of them'}")
    return isa


class IsaType(types.Type):
    """numba's type of an Isa: carries the ISA into typing, so intrinsics pick their operation set."""

    def __init__(self, isa: Isa):
        self.isa = isa
        super().__init__(name=f"Isa[{isa.name}]")

    @property
    def key(self):
        return self.isa.name


@typeof_impl.register(Isa)
def _typeof_isa(value, context):
    return IsaType(value)


register_model(IsaType)(models.OpaqueModel)  # no runtime data: everything is in the type


@unbox(IsaType)
def _unbox_isa(typ, obj, c):
    return NativeValue(c.context.get_constant_null(typ))
