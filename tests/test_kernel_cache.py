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


RUN_RMSNORM = """
import os, sys
import numpy as np
from edgephi import jit_cache, kernels

jit_cache.use_kernel_cache()
x = np.ones((2, 8), np.float32)
kernels.rmsnorm(x, np.ones(8, np.float32), np.float32(1e-5), np.empty_like(x))
stats = kernels.rmsnorm.stats
print(kernels.__file__, stats.cache_hits.get(kernels.rmsnorm.signatures[0], 0), len(stats.cache_misses))
"""


def test_a_copy_of_the_same_sources_loads_the_kernels_another_compiled(tmp_path):
    """A fresh clone (CI) or a reinstall gives the sources new file times; the kernels compiled from
    the same bytes still load from the cache (numba stamps an index with its source file's hash, and
    the folder is keyed by every kernel source), so nothing compiles again."""
    import os
    import shutil
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "edgephi"
    env = {**os.environ, "EDGEPHI_KERNEL_CACHE": str(tmp_path / "kernels")}
    seen = []
    for copy, when in (("first", 1_600_000_000), ("second", 1_700_000_000)):
        target = tmp_path / copy / "edgephi"
        shutil.copytree(package, target, ignore=shutil.ignore_patterns("__pycache__"))
        for path in target.rglob("*.py"):
            os.utime(path, (when, when))
        done = subprocess.run([sys.executable, "-c", RUN_RMSNORM], capture_output=True, text=True, timeout=300,
                              env={**env, "PYTHONPATH": str(tmp_path / copy)}, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        where, hits, misses = done.stdout.split()
        assert where.startswith(str(target)), where  # the copy ran, not the checkout
        seen.append((int(hits), int(misses)))
    assert seen == [(0, 1), (1, 0)], seen  # compiled by the first copy, loaded by the second
