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
    """cpu(name, features): make numba (and so edgephi) target that CPU in this test."""
    def use(name, features):
        monkeypatch.setattr(config, "CPU_NAME", name)
        monkeypatch.setattr(config, "CPU_FEATURES", features)
    monkeypatch.delenv(ISA_ENV, raising=False)
    return use


pytestmark = pytest.mark.skipif(host_machine() != "x86_64", reason="the simulated CPUs are x86 ones")


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


def test_an_isa_the_cpu_lacks_is_refused_in_one_line(cpu, monkeypatch):
    cpu("haswell", "+avx,+avx2,+fma,+f16c")
    monkeypatch.setenv(ISA_ENV, "avx512-vnni")
    with pytest.raises(EdgephiError) as info:
        choose_isa()
    message = str(info.value)
    assert "avx512-vnni" in message and "avx512f, avx512bw, avx512vnni" in message and "avx2, generic" in message
    assert "\n" not in message


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
