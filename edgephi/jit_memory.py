"""Giving back start-up's code pages once the kernels are loaded, letting go of the IR numba keeps
for linking, and keeping numba from importing scipy.linalg.

numba runs LLVM inside our process. Initialising it and loading the cached kernels executes code
spread over tens of MB of libllvmlite, and Linux maps every page it touches (64 KiB around each
fault) into the process, where it stays in the resident set for the rest of the run although the
compiler is not used again: about 65 MB, a third of everything but the weights. Other libraries
do the same on a smaller scale: OpenSSL's hashing (the model's identity), BLAS and tiktoken's
set-up, start-up paths of Python itself, about 15 MiB more. Those pages are clean copies of the
library files, so dropping them from the process (madvise MADV_DONTNEED, what the kernel does to
them under memory pressure) loses nothing: they stay in the page cache, and the ones a step runs
fault back in at its first use. What stays resident is then what the run uses.

numba also keeps, for every function it has loaded, the function's LLVM IR as a module in memory,
so that a function compiled later which calls it can inline it: 4 MB of IR text for the forward
pass, about 13 MiB resident with its copy kernel and the typed-list helpers of the weights. The
kernels edgephi calls from Python are never called from jitted code, so their modules are let go.

numba's first compile or cache load imports scipy.linalg where scipy is installed, only to decide
whether np.correlate and np.convolve may call BLAS: 0.3 s of start-up and 17 MB that our kernels,
which use neither, do not need.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import sys

MADV_DONTNEED = 4  # the same number on every Linux architecture
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \d+\s*(.*)$")
_SHARED_LIBRARY = re.compile(r"\.so(\.[0-9]+)*$")  # libLLVM-20.so.1, _tiktoken.cpython-311-x86_64-linux-gnu.so


def library_mappings(smaps: str) -> list[tuple[int, int, int]]:
    """(start, end, resident bytes) of the shared-library mappings in /proc/<pid>/smaps text that
    nothing can have written to: read-only, and no dirty or anonymous (copied-on-write) page. A
    relocated part of a library is dirty and is never listed: dropping it would lose data. Data
    files (the weights) and anonymous memory are never listed either."""
    found, current = [], None
    for line in smaps.splitlines():
        header = _HEADER.match(line)
        if header:
            start, end, perms, path = header.groups()
            current = None
            if "w" not in perms and _SHARED_LIBRARY.search(path):
                current = {"start": int(start, 16), "end": int(end, 16)}
                found.append(current)
        elif current is not None:
            key, _, value = line.partition(":")
            if key in ("Rss", "Private_Dirty", "Shared_Dirty", "Anonymous"):
                current[key] = int(value.split()[0]) * 1024
    return [(m["start"], m["end"], m["Rss"]) for m in found
            if m.get("Rss", 0) > 0 and m.get("Private_Dirty") == 0 and m.get("Shared_Dirty") == 0
            and m.get("Anonymous") == 0]


def release_library_pages() -> int:
    """Drop the shared libraries' clean resident pages from this process; returns the bytes dropped
    (0 where there is no /proc, i.e. off Linux, or nothing to drop)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
            mappings = library_mappings(f.read())
    except OSError:
        return 0
    if not mappings:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    dropped = 0
    for start, end, resident in mappings:
        if libc.madvise(start, end - start, MADV_DONTNEED) == 0:
            dropped += resident
    return dropped


def drop_linking_modules(*dispatchers) -> int:
    """Let go of the IR numba keeps of these dispatchers' loaded functions for linking them into
    functions compiled later; returns how many it dropped. Only for functions no jitted code calls:
    a later compile that did call one would fail ("library unfit for linking"), not run stale code.
    Freed heap pages go back to the system (glibc's malloc_trim, where there is one)."""
    dropped = 0
    for dispatcher in dispatchers:
        for result in list(getattr(dispatcher, "overloads", {}).values()):
            library = getattr(result, "library", None)
            if getattr(library, "_shared_module", None) is not None:
                library._shared_module = None  # numba's own field; None is its state before linking
                dropped += 1
    if dropped:
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (AttributeError, OSError):
            pass  # not glibc: the freed memory is reused by later allocations instead
    return dropped


@contextlib.contextmanager
def numba_without_scipy_linalg():
    """While numba initialises (its first dispatch in this process), `import scipy.linalg` fails, so
    numba takes its own loops for np.correlate/np.convolve. np.dot and np.linalg in jitted code still
    work: numba imports scipy for them when they compile, after this block. Nothing is hidden if
    scipy.linalg is already imported or numba has already initialised."""
    hide = "scipy.linalg" not in sys.modules and "numba.np.arraymath" not in sys.modules
    if hide:
        sys.modules["scipy.linalg"] = None  # makes the import raise ImportError
    try:
        yield
    finally:
        if hide and sys.modules.get("scipy.linalg", 0) is None:
            del sys.modules["scipy.linalg"]
