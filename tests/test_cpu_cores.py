"""The default thread count leaves busy cores alone, and the bench's bandwidth probe fits the
machine's free memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from edgephi.bench import MIN_PROBE_BYTES, PROBE_BYTES, available_memory_bytes, probe_bytes
from edgephi.cpu_cores import _cpu_times, busy_between, idle_cores, usable_cores

STAT_BEFORE = """cpu  200 0 100 1000 0 0 0 0 0 0
cpu0 100 0 50 500 0 0 0 0 0 0
cpu1 100 0 50 500 0 0 0 0 0 0
intr 12345
"""
STAT_AFTER = """cpu  400 0 100 1100 0 0 0 0 0 0
cpu0 190 0 60 500 0 0 0 0 0 0
cpu1 100 0 50 590 10 0 0 0 0 0
intr 12400
"""


def test_busy_shares_from_proc_stat(tmp_path):
    before, after = tmp_path / "before", tmp_path / "after"
    before.write_text(STAT_BEFORE)
    after.write_text(STAT_AFTER)
    shares = busy_between(_cpu_times(str(before)), _cpu_times(str(after)))
    assert shares[0] == pytest.approx(1.0)  # 100 ticks of user and system, none idle
    assert shares[1] == pytest.approx(0.0)  # idle and iowait only


@pytest.mark.skipif(not sys.platform.startswith("linux") or len(usable_cores()) < 2,
                    reason="needs Linux's per-CPU times and two cores to keep one busy")
def test_a_core_kept_busy_is_left_out():
    cores = usable_cores()
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            preexec_fn=lambda: os.sched_setaffinity(0, {cores[0]}))
    try:
        time.sleep(0.3)
        assert idle_cores(sample_s=0.3) <= len(cores) - 1
    finally:
        spin.kill()
        spin.wait()


def test_bandwidth_probe_fits_free_memory(tmp_path):
    assert probe_bytes(None) == PROBE_BYTES  # no /proc/meminfo: the full probe
    assert probe_bytes(64 << 30) == PROBE_BYTES
    assert probe_bytes(1 << 30) == 256 << 20  # a board with 1 GiB free: a quarter of it
    assert probe_bytes(MIN_PROBE_BYTES) == 0  # too little to probe honestly
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        4000000 kB\nMemFree:          100000 kB\nMemAvailable:    1048576 kB\n")
    assert available_memory_bytes(str(meminfo)) == 1 << 30
    assert available_memory_bytes(str(tmp_path / "missing")) is None
