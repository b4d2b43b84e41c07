"""edgephi: run Phi language models quantized on CPUs, offline."""

__version__ = "0.1.0"


def load(path, *, threads=None, context=None, kv_dtype="float16"):
    """Load an edgephi model folder. context: KV ring capacity in tokens (default: the model's
    context length, capped so the KV cache fits in 512 MiB)."""
    from .model import Model

    return Model(path, threads=threads, context=context, kv_dtype=kv_dtype)
