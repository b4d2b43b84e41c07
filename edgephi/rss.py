"""A process's peak resident set, read the same way by `edgephi bench` and by the benchmark scripts'
child processes (this module imports nothing heavy, so a llama.cpp child can use it too)."""

from __future__ import annotations

import resource
import sys


def peak_rss_mib() -> float:
    """This process's peak resident set, MiB. On Linux VmHWM, which starts afresh when a process
    execs: getrusage's ru_maxrss carries the peak of the process that spawned it into the child
    (a bench run from pytest, with torch loaded, reported 340 MiB for a 210 MiB run)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, KiB elsewhere
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
