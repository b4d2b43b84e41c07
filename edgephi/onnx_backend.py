"""Running an exported ONNX decoder (convert/onnx_export.py) with plain onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .backend import check_context, check_threads
from .errors import EdgephiError, ModelFormatError
from .format import GENERATION_FILE

MODEL_FILE = "model.onnx"  # the layout convert/onnx_export.py writes
EDGEPHI_SUBFOLDER = "edgephi"  # the source's config, tokenizer and generation settings


class OnnxDecoder:
    """An onnxruntime session over the exported decoder. It holds no conversation: the KV arrays
    travel in and out of run(), so one decoder serves many sequences (onnxruntime's run() may be
    called from several threads at once)."""

    def __init__(self, folder, *, threads: int | None = None):
        import onnxruntime as ort

        folder = Path(folder)
        self.path = path = folder / MODEL_FILE
        if not path.is_file():
            raise ModelFormatError(f"{folder}: not an exported ONNX model (no {MODEL_FILE})")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime reports a corrupt graph with its own exception types
            raise ModelFormatError(f"{path}: onnxruntime cannot load it ({_first_line(exc)})") from None
        # the cache's geometry as the graph declares it: [batch, kv heads, length, head dim]
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        shapes = {tuple(i.shape[1::2]) for i in past}
        if not past or len(past) % 2 or len(shapes) != 1 or not all(isinstance(d, int) for d in next(iter(shapes))):
            raise ModelFormatError(f"{path}: not a decoder with past_key_values inputs of one fixed shape")
        self.layers = len(past) // 2
        self.kv_heads, self.head_size = next(iter(shapes))

    def empty_past(self) -> list:
        empty = np.zeros((1, self.kv_heads, 0, self.head_size), np.float32)
        return [(empty, empty) for _ in range(self.layers)]

    def run(self, tokens, past: list) -> tuple[np.ndarray, list]:
        """Logits (len(tokens), V) of tokens appended after `past`, and the new past."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        start = past[0][0].shape[2]
        total = start + ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": np.arange(start, total, dtype=np.int64).reshape(1, -1)}
        for i, (k, v) in enumerate(past):
            feeds[f"past_key_values.{i}.key"] = k
            feeds[f"past_key_values.{i}.value"] = v
        try:
            outputs = self.session.run(None, feeds)
        except Exception as exc:  # a graph whose shapes disagree with its own declared inputs
            raise ModelFormatError(f"{self.path}: onnxruntime failed to run it ({_first_line(exc)})") from None
        return outputs[0][0], [(outputs[1 + 2 * i], outputs[2 + 2 * i]) for i in range(self.layers)]

    def logits(self, ids) -> np.ndarray:
        """Logits of `ids` in a fresh context."""
        return self.run(list(ids), self.empty_past())[0]


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def is_onnx_folder(folder) -> bool:
    folder = Path(folder)
    return (folder / MODEL_FILE).is_file() and (folder / EDGEPHI_SUBFOLDER).is_dir()


class OnnxCache:
    """One sequence's KV arrays on the exported decoder. No ring: a conversation longer than the
    context is an error (the numba backend wraps)."""

    def __init__(self, decoder: OnnxDecoder, capacity: int):
        self.decoder = decoder
        self.capacity = capacity
        self.reset()

    @property
    def next_pos(self) -> int:
        return self.past[0][0].shape[2]

    def reset(self) -> None:
        self.past = self.decoder.empty_past()

    def truncate(self, n: int) -> bool:
        if n > self.next_pos:
            return False
        self.past = [(k[:, :, :n], v[:, :, :n]) for k, v in self.past]
        return True

    def keep_prefix(self, n: int) -> None:
        """Nothing to pin: without a ring no position is ever overwritten."""


class OnnxBackend:
    """An exported ONNX folder run by onnxruntime (a Backend, see backend.py)."""

    name = "onnxruntime"
    kv_dtype = "float32"  # the graph's past_key_values
    # onnxruntime lays out its weights itself and builds its kernels at the first step
    kernels_s = weights_file_bytes = weight_bytes_per_token = None

    def __init__(self, folder, *, threads: int | None = None, context: int | None = None):
        from .model_folder import read_model_folder

        self.folder = Path(folder)
        if not is_onnx_folder(self.folder):
            raise ModelFormatError(f"{self.folder}: not an ONNX folder written by `edgephi export-onnx`")
        files = read_model_folder(self.folder / EDGEPHI_SUBFOLDER)
        self.config, self.tokenizer, self.generation_config = files.config, files.tokenizer, files.generation
        self.generation_file = files.path / GENERATION_FILE
        self.threads = check_threads(threads)
        self.decoder = OnnxDecoder(self.folder, threads=self.threads)
        cfg = self.config
        if (self.decoder.layers, self.decoder.kv_heads, self.decoder.head_size) != (
                cfg.num_layers, cfg.num_kv_heads, cfg.head_dim):
            raise ModelFormatError(f"{self.decoder.path}: its cache has {self.decoder.layers} layers of "
                                   f"{self.decoder.kv_heads} x {self.decoder.head_size}, but {files.path}/config.json "
                                   f"says {cfg.num_layers} of {cfg.num_kv_heads} x {cfg.head_dim}")
        self.context = check_context(cfg.max_position_embeddings if context is None else context)

    def new_cache(self, capacity: int, sinks: int = 0) -> OnnxCache:
        """sinks is ignored: the cache never wraps."""
        return OnnxCache(self.decoder, capacity)

    def feed(self, cache: OnnxCache, tokens: np.ndarray, all_logits: bool, verify: bool = False) -> np.ndarray:
        """verify makes no difference: onnxruntime computes every step alike."""
        if cache.next_pos + len(tokens) > cache.capacity:
            raise EdgephiError(f"context full ({cache.capacity} tokens): the onnxruntime backend does not "
                               f"wrap its cache; start a new conversation or raise --context")
        logits, cache.past = self.decoder.run(tokens, cache.past)
        if not np.isfinite(logits[-1]).all():
            raise ModelFormatError(f"{self.folder}: the model computed non-finite logits (NaN or Inf)")
        return logits if all_logits else logits[-1:]

    def step(self, cache: OnnxCache, token: int) -> np.ndarray:
        """onnxruntime returns new arrays every run, so this step allocates whatever the backend does."""
        return self.feed(cache, np.full(1, token, np.int64), False)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self.decoder.logits(ids)
