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

KERNEL_SOURCES = ("kernels.py", "forward.py")


def configure() -> Path:
    digest = hashlib.sha256(numba.__version__.encode())
    here = Path(__file__).parent
    for name in KERNEL_SOURCES:
        digest.update((here / name).read_bytes())
    base = Path(os.environ.get("EDGEPHI_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "edgephi")
    folder = base / "numba" / digest.hexdigest()[:16]
    numba.config.CACHE_DIR = str(folder)
    return folder


configure()
