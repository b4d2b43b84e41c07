"""How many cores a model's steps should run on by default: the cores this process may use
that nothing else is keeping busy. Decode splits each matrix evenly over its threads, so one
thread on a core another program holds makes every step wait for it."""

from __future__ import annotations

import os
import time

BUSY_FRACTION = 0.5  # a core busier than this over the sample is left alone
SAMPLE_S = 0.1
REUSE_S = 5.0  # models loaded within this long of a sample share it: each look costs SAMPLE_S

_last: tuple[float, int] | None = None  # (when, idle cores) of the latest default look


def usable_cores() -> list[int]:
    """The CPUs this process may run on (its affinity: a container's or taskset's share)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _cpu_times(stat_path: str) -> dict[int, tuple[int, int]]:
    """cpu number -> (idle ticks, total ticks) from /proc/stat."""
    times = {}
    with open(stat_path) as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                ticks = [int(v) for v in fields[:8]]
                times[int(name[3:])] = (ticks[3] + ticks[4], sum(ticks))  # idle + iowait
    return times


def busy_fractions(sample_s: float = SAMPLE_S, stat_path: str = "/proc/stat") -> dict[int, float] | None:
    """Each CPU's busy share of the next `sample_s` seconds (this process sleeps meanwhile), or
    None where the kernel gives no per-CPU times (not Linux)."""
    try:
        before = _cpu_times(stat_path)
        time.sleep(sample_s)
        return busy_between(before, _cpu_times(stat_path))
    except (OSError, ValueError, IndexError):
        return None


def busy_between(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict[int, float]:
    """Each CPU's busy share between two readings of _cpu_times."""
    shares = {}
    for cpu, (idle, total) in after.items():
        if cpu in before and total > before[cpu][1]:
            shares[cpu] = 1.0 - (idle - before[cpu][0]) / (total - before[cpu][1])
    return shares


def idle_cores(sample_s: float = SAMPLE_S) -> int:
    """The usable cores that are not busy with other work (at least one). The default look is
    reused for REUSE_S seconds, so loading several models does not sample again each time."""
    global _last
    now = time.monotonic()
    if sample_s == SAMPLE_S and _last is not None and now - _last[0] < REUSE_S:
        return _last[1]
    cores = usable_cores()
    shares = busy_fractions(sample_s)
    idle = len(cores) if shares is None else max(1, sum(1 for cpu in cores if shares.get(cpu, 0.0) <= BUSY_FRACTION))
    if sample_s == SAMPLE_S:
        _last = (time.monotonic(), idle)
    return idle
