"""Where edgephi keeps files between runs: converted default models, compiled kernels.

EDGEPHI_CACHE moves everything; EDGEPHI_KERNEL_CACHE moves only the compiled kernels (the test
suite gives each run a fresh EDGEPHI_CACHE but keeps one kernel cache, which saves the compile).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """edgephi's per-user folder: $EDGEPHI_CACHE, else $XDG_CACHE_HOME/edgephi or ~/.cache/edgephi."""
    if os.environ.get("EDGEPHI_CACHE"):
        return Path(os.environ["EDGEPHI_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgephi"


def kernel_cache_root() -> Path:
    """Compiled kernels: $EDGEPHI_KERNEL_CACHE, else numba/ in cache_root() (one subfolder per
    hash of the kernel sources below it)."""
    if os.environ.get("EDGEPHI_KERNEL_CACHE"):
        return Path(os.environ["EDGEPHI_KERNEL_CACHE"])
    return cache_root() / "numba"
