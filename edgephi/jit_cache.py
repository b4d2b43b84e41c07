"""Where numba keeps compiled kernels: a per-user folder keyed by a hash of the kernel sources.

numba's own cache sits beside each source file and is invalidated only when that file changes,
so a kernel that calls an edited kernel in another file would load stale machine code; keying
the folder on every kernel source (and the numba version) rules that out.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba

KERNEL_SOURCES = ("simd.py", "kernels.py", "forward.py")


def cache_root() -> Path:
    """edgephi's per-user folder: $EDGEPHI_CACHE, else $XDG_CACHE_HOME/edgephi or ~/.cache/edgephi."""
    if os.environ.get("EDGEPHI_CACHE"):
        return Path(os.environ["EDGEPHI_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgephi"


def configure() -> Path:
    digest = hashlib.sha256(numba.__version__.encode())
    here = Path(__file__).parent
    for name in KERNEL_SOURCES:
        digest.update((here / name).read_bytes())
    folder = cache_root() / "numba" / digest.hexdigest()[:16]
    numba.config.CACHE_DIR = str(folder)
    return folder


configure()
