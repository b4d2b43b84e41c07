"""Running an exported ONNX decoder (convert/onnx_export.py) with plain onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .api import LanguageModel, read_generation_config
from .errors import EdgephiError, ModelFormatError

MODEL_FILE = "model.onnx"  # the layout convert/onnx_export.py writes
EDGEPHI_SUBFOLDER = "edgephi"  # the source's config, tokenizer and generation settings


class OnnxDecoder:
    """An onnxruntime session over the exported decoder and the KV arrays it returns."""

    def __init__(self, folder, *, threads: int | None = None):
        import onnxruntime as ort

        folder = Path(folder)
        path = folder / MODEL_FILE
        if not path.is_file():
            raise ModelFormatError(f"{folder}: not an exported ONNX model (no {MODEL_FILE})")
        try:
            decoder = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelFormatError(f"{folder / 'genai_config.json'}: unreadable ({exc})") from None
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.layers = decoder["num_hidden_layers"]
        self.kv_heads = decoder["num_key_value_heads"]
        self.head_size = decoder["head_size"]
        self.reset()

    def reset(self) -> None:
        empty = np.zeros((1, self.kv_heads, 0, self.head_size), np.float32)
        self.past = [(empty, empty) for _ in range(self.layers)]

    @property
    def length(self) -> int:
        return self.past[0][0].shape[2]

    def truncate(self, n: int) -> None:
        self.past = [(k[:, :, :n], v[:, :, :n]) for k, v in self.past]

    def feed(self, tokens) -> np.ndarray:
        """Append tokens; returns their logits (len(tokens), V)."""
        ids = np.asarray(tokens, dtype=np.int64).reshape(1, -1)
        start = self.length
        total = start + ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": np.arange(start, total, dtype=np.int64).reshape(1, -1)}
        for i, (k, v) in enumerate(self.past):
            feeds[f"past_key_values.{i}.key"] = k
            feeds[f"past_key_values.{i}.value"] = v
        outputs = self.session.run(None, feeds)
        self.past = [(outputs[1 + 2 * i], outputs[2 + 2 * i]) for i in range(self.layers)]
        return outputs[0][0]

    def logits(self, ids) -> np.ndarray:
        """Logits of `ids` in a fresh context."""
        self.reset()
        return self.feed(list(ids))



def is_onnx_folder(folder) -> bool:
    folder = Path(folder)
    return (folder / MODEL_FILE).is_file() and (folder / EDGEPHI_SUBFOLDER).is_dir()


class OnnxCache:
    """The exported decoder's KV arrays seen through the cache interface the chat session uses.
    No ring: a conversation longer than the context is an error (the numba backend wraps)."""

    def __init__(self, decoder: OnnxDecoder, capacity: int):
        self.decoder = decoder
        self.capacity = capacity
        self.owner = None

    @property
    def next_pos(self) -> int:
        return self.decoder.length

    def reset(self) -> None:
        self.decoder.reset()
        self.owner = None

    def truncate(self, n: int) -> bool:
        if n > self.next_pos:
            return False
        self.decoder.truncate(n)
        return True

    def keep_prefix(self, n: int) -> None:
        """Nothing to pin: without a ring no position is ever overwritten."""


class OnnxModel(LanguageModel):
    """An exported ONNX folder run by onnxruntime, with the generation and chat API of edgephi.load."""

    def __init__(self, folder, *, threads: int | None = None, context: int | None = None):
        from .format import read_config
        from .tokenizer import Tokenizer

        self.folder = Path(folder)
        if not is_onnx_folder(self.folder):
            raise ModelFormatError(f"{self.folder}: not an ONNX folder written by `edgephi export-onnx`")
        own = self.folder / EDGEPHI_SUBFOLDER
        self.config = read_config(own)
        self.tokenizer = Tokenizer.from_folder(own)
        self.generation_config = read_generation_config(own)
        self.decoder = OnnxDecoder(self.folder, threads=threads)
        context = context or self.config.max_position_embeddings
        if not isinstance(context, int) or context < 2:
            raise ValueError(f"context must be an integer >= 2, got {context!r}")
        self.cache = OnnxCache(self.decoder, context)
        self.backend = "onnxruntime"

    def feed(self, tokens, *, all_logits: bool = False) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64)
        if tokens.ndim != 1 or len(tokens) == 0:
            raise ValueError("tokens must be a non-empty list of token ids")
        if tokens.min() < 0 or tokens.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        if self.cache.next_pos + len(tokens) > self.cache.capacity:
            raise EdgephiError(f"context full ({self.cache.capacity} tokens): the onnxruntime backend does not "
                               f"wrap its cache; start a new conversation or raise --context")
        logits = self.decoder.feed(tokens)
        return logits if all_logits else logits[-1:]

    def step(self, token: int) -> np.ndarray:
        return self.feed([token])

    def logits(self, ids) -> np.ndarray:
        """float32 (len(ids), V) logits of `ids` in a fresh context (the conversation's cache is kept)."""
        kept = self.decoder.past
        try:
            return self.decoder.logits(list(ids))
        finally:
            self.decoder.past = kept
