"""Where compiled kernels are kept: chosen by load() for edgephi's own kernels only, one folder per
process (numba keeps the folder per kernel), keyed by every kernel source."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import os, sys
from numba.core import config
from edgephi import jit_cache, kernels
from edgephi.errors import EdgephiError

first, second = sys.argv[1], sys.argv[2]
os.environ["EDGEPHI_KERNEL_CACHE"] = first
folder = jit_cache.use_kernel_cache()
assert str(folder).startswith(first), folder
assert kernels.rmsnorm._cache.cache_path == str(folder), kernels.rmsnorm._cache.cache_path
assert config.CACHE_DIR == "" or config.CACHE_DIR is None or not str(config.CACHE_DIR).startswith(first)
assert jit_cache.use_kernel_cache() == folder  # again: nothing changes
os.environ["EDGEPHI_KERNEL_CACHE"] = second
try:
    jit_cache.use_kernel_cache()
except EdgephiError as e:
    print("refused:", e)
"""


def test_kernel_cache_is_chosen_once_and_a_second_folder_is_refused(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    done = subprocess.run([sys.executable, "-c", CHILD, str(first), str(second)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip()
    assert line.startswith("refused:") and str(first) in line and str(second) in line, line
    assert len(line.splitlines()) == 1
    assert (first / line.split(str(first) + "/")[1].split()[0].rstrip(";")).is_dir()


def test_the_cache_key_covers_every_kernel_source():
    """A module that holds jitted kernels or emits their IR is in the cache folder's key: an edit
    to it (gemm_tile.py was once left out) must not load stale machine code. bench.py's probe is
    the one jitted function outside the model's kernels (numba's own cache keys it by its file)."""
    import re
    from pathlib import Path

    from edgephi.jit_cache import KERNEL_MODULES

    package = Path(__file__).resolve().parent.parent / "edgephi"
    emitting = {path.stem for path in package.glob("*.py")
                if re.search(r"@njit|@intrinsic|from llvmlite", path.read_text())}
    assert emitting - {"bench"} <= set(KERNEL_MODULES), emitting - set(KERNEL_MODULES)


def test_the_cache_key_covers_the_versions(monkeypatch):
    """A new edgephi (or numba, llvmlite, Python) compiles into a folder of its own."""
    import edgephi
    from edgephi import jit_cache

    before = jit_cache.kernel_folder()
    monkeypatch.setattr(edgephi, "__version__", edgephi.__version__ + ".post1")
    assert jit_cache.kernel_folder() != before
