"""Running an exported ONNX decoder (convert/onnx_export.py) with plain onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import ModelFormatError

MODEL_FILE = "model.onnx"


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
