"""Dropping start-up's library code pages once the kernels are loaded (edgephi/jit_memory.py), and
the kernel loading that happens at edgephi.load so the drop comes before the weights are touched."""

import json
import subprocess
import sys

import numba
import pytest

import edgephi
import edgephi.model
from edgephi.convert import convert
from edgephi.jit_memory import library_mappings

SMAPS = """\
7f0000000000-7f0000300000 r--p 00000000 08:01 42    /site-packages/llvmlite/binding/libllvmlite.so
Size:               3072 kB
Rss:                3000 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0000300000-7f0005300000 r-xp 00300000 08:01 42    /site-packages/llvmlite/binding/libllvmlite.so
Size:              81920 kB
Rss:               50000 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0005300000-7f0005400000 r--p 05300000 08:01 42    /site-packages/llvmlite/binding/libllvmlite.so
Size:               1024 kB
Rss:                1024 kB
Shared_Dirty:          0 kB
Private_Dirty:      1024 kB
Anonymous:          1024 kB
7f0005400000-7f0005500000 rw-p 05400000 08:01 42    /site-packages/llvmlite/binding/libllvmlite.so
Size:               1024 kB
Rss:                   0 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0006000000-7f0006100000 r-xp 00000000 08:01 43    /usr/lib/libLLVM-20.so.1
Size:               1024 kB
Rss:                 512 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0007000000-7f0007100000 r-xp 00000000 08:01 44    /usr/lib/libpython3.11.so.1.0
Size:               1024 kB
Rss:                 800 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0009000000-7f0009100000 r--p 00000000 08:01 45    /models/phi/weights.safetensors
Size:               1024 kB
Rss:                1024 kB
Shared_Dirty:          0 kB
Private_Dirty:         0 kB
Anonymous:             0 kB
7f0008000000-7f0008100000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                1024 kB
Shared_Dirty:          0 kB
Private_Dirty:      1024 kB
Anonymous:          1024 kB
VmFlags: rd wr mr mw me ac
"""


def test_only_clean_read_only_library_mappings_are_listed():
    # the relocated (dirty) read-only part, the writable data and anonymous memory are never
    # candidates: dropping their pages would lose what they hold; nor are data files (the weights)
    assert library_mappings(SMAPS) == [
        (0x7F0000000000, 0x7F0000300000, 3000 * 1024),
        (0x7F0000300000, 0x7F0005300000, 50000 * 1024),
        (0x7F0006000000, 0x7F0006100000, 512 * 1024),
        (0x7F0007000000, 0x7F0007100000, 800 * 1024),
    ]


CHILD = """
import json
import numpy as np
from numba import njit
from edgephi.jit_memory import library_mappings, release_library_pages

def resident():
    with open("/proc/self/smaps") as f:
        return sum(rss for _, _, rss in library_mappings(f.read()))

@njit
def first(x):
    return x * 2 + 1

first(3)
before = resident()
dropped = release_library_pages()
after = resident()

@njit
def sum_of_squares(a):  # compiled after the drop: LLVM runs again from pages faulted back in
    total = 0.0
    for v in a:
        total += v * v
    return total

a = np.arange(1000.0)
print(json.dumps([before, dropped, after, sum_of_squares(a), float(np.dot(a, a)), first(20)]))
"""


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps is Linux's")
def test_release_drops_library_pages_and_the_jit_still_compiles():
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    before, dropped, after, squares, expected, again = json.loads(done.stdout.strip().splitlines()[-1])
    assert before > 10 << 20  # compiling one function touched tens of MB of LLVM
    assert dropped >= before * 0.9
    assert after < before / 4
    assert squares == expected and again == 41


@pytest.fixture(scope="module")
def model_dir(checkpoint_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("jit-memory") / "phi3-q4_0"
    convert(checkpoint_factory("phi3_basic"), out, quant="q4_0")
    return out


@pytest.mark.parametrize("kv_dtype", ["float16", "float32"])
def test_load_compiles_the_signature_every_step_calls(model_dir, monkeypatch, kv_dtype):
    """edgephi.load loads the forward pass's code for the argument types it computes; a call with
    other types would compile a second version mid-run, LLVM and all, after the weights are in."""
    real = edgephi.model.forward
    compiled, called = [], []

    class Recorder:
        def compile(self, sig):
            compiled.append(tuple(sig))
            entry = real.compile(sig)

            def decode_step(*args):  # decode steps call the compiled code load() gets back
                called.append(tuple(numba.typeof(a) for a in args))
                return entry(*args)
            return decode_step

        def __call__(self, *args):
            called.append(tuple(numba.typeof(a) for a in args))
            return real(*args)

    monkeypatch.setattr(edgephi.model, "forward", Recorder())
    model = edgephi.load(model_dir, context=64, kv_dtype=kv_dtype)
    sequence = model.sequence()
    sequence.feed([1, 2, 3, 4, 5])
    sequence.step(6)
    model.logits([7, 8, 9])  # all_logits, in a cache of its own
    assert len(compiled) == 1 and len(called) == 3
    assert all(sig == compiled[0] for sig in called)


CHILD_SCIPY = """
import json, sys
import numpy as np
import edgephi
model = edgephi.load(sys.argv[1], context=32)
model.sequence().feed([1, 2, 3])
hidden = "scipy.linalg" in sys.modules
import scipy.linalg  # the app can still import it
from numba import njit

@njit
def dot(a, b):  # numba's BLAS path, compiled after edgephi's load
    return np.dot(a, b)

a = np.arange(5.0)
print(json.dumps([hidden, dot(a, a), float(scipy.linalg.norm(a) ** 2)]))
"""


@pytest.mark.integration
def test_numba_initialises_without_scipy_linalg_and_the_app_keeps_it(model_dir):
    pytest.importorskip("scipy")  # only where scipy is installed does numba import it
    done = subprocess.run([sys.executable, "-c", CHILD_SCIPY, str(model_dir)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    imported_by_load, dot, norm_squared = json.loads(done.stdout.strip().splitlines()[-1])
    assert not imported_by_load
    assert dot == 30.0 and norm_squared == pytest.approx(30.0)


CHILD_LINKING = """
import json, sys
import numpy as np
from numba import njit
import edgephi
import edgephi.model
from edgephi import jit_memory

def anonymous_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("RssAnon:"))

seen = []
real = jit_memory.drop_linking_modules

def measured(*dispatchers):
    before = anonymous_mib()
    dropped = real(*dispatchers)
    seen.append([dropped, before - anonymous_mib()])
    return dropped

edgephi.model.drop_linking_modules = measured
model = edgephi.load(sys.argv[1], context=64)
first = list(model.generate_tokens([1, 2, 3], max_new_tokens=6))
again = list(edgephi.load(sys.argv[1], context=64).generate_tokens([1, 2, 3], max_new_tokens=6))

@njit
def later(a):  # the JIT still compiles after the drop
    return (a * a).sum()

print(json.dumps([seen, first == again, len(first), later(np.arange(4.0))]))
"""


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RssAnon is Linux's")
def test_load_lets_go_of_the_kernels_linking_ir_and_still_runs(model_dir):
    """numba keeps every loaded function's IR for linking it into later compiles; the kernels edgephi
    calls from Python are never linked, and letting theirs go frees megabytes (4 MB of IR text for
    the forward pass alone) without changing what runs."""
    done = subprocess.run([sys.executable, "-c", CHILD_LINKING, str(model_dir)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen, same, generated, later = json.loads(done.stdout.strip().splitlines()[-1])
    (dropped, freed_mib), (dropped_again, _) = seen
    assert dropped == 4 and dropped_again == 0  # forward, the prefix copy, the layers' list helpers; once
    assert freed_mib > 5, seen
    assert same and generated == 6 and later == 14.0
