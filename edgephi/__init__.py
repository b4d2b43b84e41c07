"""edgephi: run Phi language models quantized on CPUs, offline."""

__version__ = "0.1.0"


BACKENDS = ("numba", "onnxruntime")


def load(path, *, threads=None, context=None, kv_dtype="float16", backend=None):
    """Load an edgephi model folder, or an ONNX folder written by `edgephi export-onnx`.
    context: KV capacity in tokens (default: the model's context length, capped so the numba
    backend's KV cache fits in 512 MiB). backend: "numba" (edgephi's kernels) or "onnxruntime";
    by default an ONNX folder runs on onnxruntime, an edgephi folder on numba."""
    from .onnx_backend import is_onnx_folder

    if backend is None:
        backend = "onnxruntime" if is_onnx_folder(path) else "numba"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "onnxruntime":
        from .onnx_backend import OnnxModel

        return OnnxModel(path, threads=threads, context=context)
    from .model_folder import read_model_folder

    files = read_model_folder(path)  # checked before numba is even imported: a bad folder fails fast
    from .model import Model

    return Model(files, threads=threads, context=context, kv_dtype=kv_dtype)
