"""edgephi: run Phi language models quantized on CPUs, offline."""

__version__ = "0.1.0"


BACKENDS = ("numba", "onnxruntime")


def load(path, *, threads=None, context=None, kv_dtype="float16", backend=None, isa=None, on_compile=None,
         prefix_cache=None):
    """Load an edgephi model folder, or an ONNX folder written by `edgephi export-onnx`.
    context: KV capacity in tokens (default: the model's context length, capped so the numba
    backend's KV cache fits in 512 MiB). backend: "numba" (edgephi's kernels) or "onnxruntime";
    by default an ONNX folder runs on onnxruntime, an edgephi folder on numba. isa: the numba
    kernels' instruction set (see edgephi/isa.py; default $EDGEPHI_ISA, else the fastest the CPU
    runs). threads: this model's steps run on that many threads, whatever other models use
    (default: the cores nothing else keeps busy). kv_dtype: "float16", "float32" or "int8" (a
    float16 scale per 16 values; the numba backend only: onnxruntime keeps its graph's float32 cache).
    on_compile: where the kernels are not in the cache yet (a first run, a new edgephi or CPU),
    called as on_compile(functions compiled, seconds) every second while they compile.
    prefix_cache: bytes of prompts' KV kept so that a sequence whose prompt starts as an earlier
    one did copies it instead of computing it (default: as much as one full KV cache, filled only
    as prompts come; 0: none). The numba backend only."""
    from .api import LanguageModel
    from .onnx_backend import is_onnx_folder

    if backend is None:
        backend = "onnxruntime" if is_onnx_folder(path) else "numba"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "onnxruntime":
        from .onnx_backend import OnnxBackend

        return LanguageModel(OnnxBackend(path, threads=threads, context=context))
    from .model_folder import read_model_folder

    files = read_model_folder(path)  # checked before numba is even imported: a bad folder fails fast
    from .model import NumbaBackend

    return LanguageModel(NumbaBackend(files, threads=threads, context=context, kv_dtype=kv_dtype, isa=isa,
                                      on_compile=on_compile), prefix_cache=prefix_cache)
