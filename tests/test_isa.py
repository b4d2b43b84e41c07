"""Choosing the kernels' instruction set at load: the fastest the CPU runs, EDGEPHI_ISA to force
one, and a clear refusal where the forced one (or any) cannot run. The CPU is simulated through
numba's own target override (NUMBA_CPU_NAME/FEATURES), which is what the kernels compile for."""

from __future__ import annotations

import subprocess
import sys

import pytest
from numba.core import config

from edgephi.errors import EdgephiError
from edgephi.isa import ISA_ENV, ISAS, choose_isa, host_machine, runnable_isas


@pytest.fixture
def cpu(monkeypatch):
    """cpu(name, features): make numba (and so edgephi) target that x86 CPU in this test."""
    if host_machine() != "x86_64":
        pytest.skip("the simulated CPUs are x86 ones: numba's target override cannot make this host one")

    def use(name, features):
        monkeypatch.setattr(config, "CPU_NAME", name)
        monkeypatch.setattr(config, "CPU_FEATURES", features)
    monkeypatch.delenv(ISA_ENV, raising=False)
    return use




def test_the_fastest_runnable_isa_is_the_default(cpu):
    cpu("haswell", "+avx,+avx2,+fma,+f16c")
    assert [isa.name for isa in runnable_isas()] == ["avx2", "generic"]
    assert choose_isa().name == "avx2"
    cpu("icelake-server", "+avx2,+f16c,+avx512f,+avx512bw,+avx512vnni")
    assert choose_isa().name == "avx512-vnni"


def test_env_forces_a_slower_isa(cpu, monkeypatch):
    cpu("icelake-server", "+avx2,+f16c,+avx512f,+avx512bw,+avx512vnni")
    monkeypatch.setenv(ISA_ENV, "avx2")
    assert choose_isa().name == "avx2"
    assert choose_isa("generic").name == "generic"  # load(isa=...) wins over the environment


def refusal(monkeypatch, forced: str) -> str:
    """The one-line message choose_isa gives when EDGEPHI_ISA forces `forced`."""
    monkeypatch.setenv(ISA_ENV, forced)
    with pytest.raises(EdgephiError) as info:
        choose_isa()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_an_isa_the_cpu_lacks_is_refused_in_one_line(cpu, monkeypatch):
    cpu("haswell", "+avx,+avx2,+fma,+f16c")
    message = refusal(monkeypatch, "avx512-vnni")
    assert "avx512-vnni" in message and "avx512f, avx512bw, avx512vnni" in message and "avx2, generic" in message


def test_an_isa_of_another_architecture_is_refused(cpu):
    cpu("haswell", "+avx,+avx2,+fma,+f16c")
    with pytest.raises(EdgephiError, match="for aarch64 CPUs"):
        choose_isa("generic-arm")


def test_an_unknown_isa_names_the_known_ones(cpu):
    cpu("haswell", "+avx2,+f16c")
    with pytest.raises(EdgephiError) as info:
        choose_isa("neon-dotprod-typo")
    assert all(name in str(info.value) for name in ISAS)


def test_a_cpu_without_f16c_is_refused(cpu):
    cpu("x86-64", "")
    with pytest.raises(EdgephiError, match="F16C"):
        choose_isa()


def test_importing_the_kernels_changes_no_process_wide_setting():
    """Importing edgephi's kernels leaves numba's cache folder, thread count and CPU target as they
    were: load() chooses the cache folder (for edgephi's kernels only) and the ISA."""
    code = ("import numba\nfrom numba.core import config\n"
            "before = (config.CACHE_DIR, numba.get_num_threads(), config.CPU_NAME)\n"
            "import edgephi, edgephi.forward, edgephi.kernels, edgephi.matmul, edgephi.weights\n"
            "assert (config.CACHE_DIR, numba.get_num_threads(), config.CPU_NAME) == before\n"
            "print('unchanged')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "unchanged" in done.stdout, done.stderr[-2000:]


# --- Arm: the kernels' dot products are chosen from the CPU's HWCAP (what qemu-user emulates)

CORTEX_A72_HWCAP = 0x1FB  # fp asimd evtstrm aes pmull sha1 sha2 crc32 (no asimddp)
CORTEX_A76_HWCAP = 0x119FFB  # ... and asimddp (bit 20), as qemu-user reports with QEMU_CPU=cortex-a76


@pytest.fixture
def arm(monkeypatch):
    """arm(hwcap): make edgephi.isa see a 64-bit Arm Linux host with that AT_HWCAP."""
    from edgephi import isa as isa_module

    def use(hwcap):
        monkeypatch.setattr(isa_module, "host_machine", lambda: "aarch64")
        monkeypatch.setattr(isa_module, "read_hwcap", lambda path="/proc/self/auxv": hwcap)
        monkeypatch.setattr(config, "CPU_NAME", None)
    monkeypatch.delenv(ISA_ENV, raising=False)
    return use


def test_arm_isa_follows_hwcap(arm):
    arm(CORTEX_A76_HWCAP)
    assert [isa.name for isa in runnable_isas()] == ["neon-dotprod", "neon", "generic-arm"]
    arm(CORTEX_A72_HWCAP)
    assert choose_isa().name == "neon"


def test_arm_dot_product_on_a_cpu_without_it_is_refused_in_one_line(arm, monkeypatch):
    arm(CORTEX_A72_HWCAP)
    message = refusal(monkeypatch, "neon-dotprod")
    assert "neon-dotprod" in message and "lacks dotprod" in message and "neon, generic-arm" in message


def test_hwcap_is_read_from_the_auxiliary_vector(tmp_path):
    from edgephi.isa import arm_hwcap_features, read_hwcap

    auxv = tmp_path / "auxv"
    entries = [(6, 4096), (16, CORTEX_A76_HWCAP), (26, 0), (0, 0)]  # AT_PAGESZ, AT_HWCAP, AT_HWCAP2, AT_NULL
    auxv.write_bytes(b"".join(k.to_bytes(8, "little") + v.to_bytes(8, "little") for k, v in entries))
    assert read_hwcap(str(auxv)) == CORTEX_A76_HWCAP
    assert arm_hwcap_features(CORTEX_A76_HWCAP) == {"neon": True, "dotprod": True}
    assert read_hwcap(str(tmp_path / "missing")) is None
