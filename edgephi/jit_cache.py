"""Where numba keeps edgephi's compiled kernels: a folder keyed by a hash of every kernel source,
chosen when a model loads (use_kernel_cache), not at import.

numba's own cache sits beside each source file and is keyed by that file alone, so a kernel that
calls an edited kernel in another file would load stale machine code; keying the folder on all
of them (and the numba version) rules that out. The folder is numba's per-function state, so it
is one per process: a second, different folder is refused rather than silently ignored. Other
numba code in the process keeps numba's own cache settings.
"""

from __future__ import annotations

import hashlib
import importlib
import platform
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numba
from numba.core.caching import (
    CompileResultCacheImpl,
    FunctionCache,
    NullCache,
    _CacheLocator,
    _SourceFileBackedLocatorMixin,
)
from numba.core import event
from numba.core.dispatcher import Dispatcher

from .errors import EdgephiError
from .user_cache import kernel_cache_root

# Every module whose source shapes compiled kernel code: jitted functions, IR emitters, records.
KERNEL_MODULES = ("isa", "isa_ops", "llvm_ir", "block_codecs", "row_dot", "gemm_tile", "attention_rows", "attention_lanes", "float16",
                  "records", "quant", "matmul", "kernels", "kv_cache", "kv_int8", "forward", "weights")

_configured: Path | None = None
_lock = threading.Lock()


def kernel_folder() -> Path:
    """The cache folder for this edgephi, numba, llvmlite and Python, and these kernel sources."""
    import llvmlite

    from . import __version__

    versions = f"edgephi {__version__} numba {numba.__version__} llvmlite {llvmlite.__version__} " \
               f"python {platform.python_version()}"
    digest = hashlib.sha256(versions.encode())
    here = Path(__file__).parent
    for name in KERNEL_MODULES:
        digest.update((here / f"{name}.py").read_bytes())
    return kernel_cache_root() / digest.hexdigest()[:16]


def _cache_class(folder: Path) -> type:
    """numba's FunctionCache, located in `folder` whatever the function's file."""
    class KernelLocator(_SourceFileBackedLocatorMixin, _CacheLocator):
        def __init__(self, py_func, py_file):
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            self._cache_path = str(folder)

        def get_cache_path(self):
            return self._cache_path

        @classmethod
        def from_function(cls, py_func, py_file):
            locator = cls(py_func, py_file)
            try:
                locator.ensure_cache_path()
            except OSError:
                return None
            return locator

    class KernelCacheImpl(CompileResultCacheImpl):
        _locator_classes = [KernelLocator]  # noqa: RUF012  (numba reads the class attribute)

    class KernelCache(FunctionCache):
        _impl_class = KernelCacheImpl

    return KernelCache


def use_kernel_cache() -> Path:
    """Point every cached edgephi kernel at kernel_folder() (made on first use); idempotent."""
    global _configured
    folder = kernel_folder()
    with _lock:
        if _configured == folder:
            return folder
        if _configured is not None:
            raise EdgephiError(f"edgephi's compiled kernels already use {_configured} in this process; numba keeps "
                               f"one cache folder per kernel, so EDGEPHI_KERNEL_CACHE cannot move to {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        cache_class = _cache_class(folder)
        for name in KERNEL_MODULES:
            module = importlib.import_module(f"{__package__}.{name}")
            for value in vars(module).values():
                if isinstance(value, Dispatcher) and not isinstance(value._cache, NullCache):
                    value._cache = cache_class(value.py_func)
        _configured = folder
    return folder


def is_cached(dispatcher: Dispatcher, signature: tuple) -> bool:
    """Whether numba's cache holds `dispatcher`'s machine code for these argument types (for this
    CPU and these sources): if not, the first call compiles. Read from numba's cache index;
    False where its internals are not as expected (then a notice may show needlessly)."""
    try:
        cache = dispatcher._cache
        if isinstance(cache, NullCache):
            return False
        key = cache._index_key(signature, dispatcher.targetctx.codegen())
        return key in cache._cache_file._load_index()
    except Exception:
        return False


class _CompileCounter(event.Listener):
    def __init__(self):
        self.done = 0

    def on_start(self, ev):
        pass

    def on_end(self, ev):
        self.done += 1


@contextmanager
def compile_progress(report: Callable[[int, float], None], every_s: float = 1.0) -> Iterator[None]:
    """report(functions compiled so far, seconds) as numba compiles functions inside the block,
    and every `every_s` seconds besides, then once at the end."""
    counter = _CompileCounter()
    started = time.perf_counter()
    stop = threading.Event()

    def tick():
        while not stop.wait(every_s):
            report(counter.done, time.perf_counter() - started)

    ticker = threading.Thread(target=tick, name="edgephi-compile-progress", daemon=True)
    ticker.start()
    try:
        with event.install_listener("numba:compile", counter):
            yield
    finally:
        stop.set()
        ticker.join()
        report(counter.done, time.perf_counter() - started)
