"""Running an exported ONNX decoder (convert/onnx_export.py) with plain onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .api import LanguageModel
from .errors import EdgephiError, ModelFormatError
from .files import Fields, read_json
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
        path = folder / MODEL_FILE
        if not path.is_file():
            raise ModelFormatError(f"{folder}: not an exported ONNX model (no {MODEL_FILE})")
        genai = Fields(read_json(folder / "genai_config.json"), str(folder / "genai_config.json"))
        decoder = genai.object("model").object("decoder")
        self.layers = decoder.integer("num_hidden_layers", low=1)
        self.kv_heads = decoder.integer("num_key_value_heads", low=1)
        self.head_size = decoder.integer("head_size", low=1)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime reports a corrupt graph with its own exception types
            raise ModelFormatError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})") from None

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
        outputs = self.session.run(None, feeds)
        return outputs[0][0], [(outputs[1 + 2 * i], outputs[2 + 2 * i]) for i in range(self.layers)]

    def logits(self, ids) -> np.ndarray:
        """Logits of `ids` in a fresh context."""
        return self.run(list(ids), self.empty_past())[0]


def is_onnx_folder(folder) -> bool:
    folder = Path(folder)
    return (folder / MODEL_FILE).is_file() and (folder / EDGEPHI_SUBFOLDER).is_dir()


class OnnxSequence:
    """One token sequence on the exported decoder: its KV arrays. No ring: a conversation longer
    than the context is an error (the numba backend wraps)."""

    def __init__(self, model: "OnnxModel", capacity: int):
        self.model = model
        self.capacity = capacity
        self.reset()

    @property
    def next_pos(self) -> int:
        return self.past[0][0].shape[2]

    def reset(self) -> None:
        self.past = self.model.decoder.empty_past()

    def truncate(self, n: int) -> bool:
        if n > self.next_pos:
            return False
        self.past = [(k[:, :, :n], v[:, :, :n]) for k, v in self.past]
        return True

    def keep_prefix(self, n: int) -> None:
        """Nothing to pin: without a ring no position is ever overwritten."""

    def feed(self, tokens, *, all_logits: bool = False) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int64)
        vocab = self.model.config.vocab_size
        if tokens.ndim != 1 or len(tokens) == 0:
            raise ValueError("tokens must be a non-empty list of token ids")
        if tokens.min() < 0 or tokens.max() >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab})")
        if self.next_pos + len(tokens) > self.capacity:
            raise EdgephiError(f"context full ({self.capacity} tokens): the onnxruntime backend does not "
                               f"wrap its cache; start a new conversation or raise --context")
        logits, self.past = self.model.decoder.run(tokens, self.past)
        if not np.isfinite(logits[-1]).all():
            raise ModelFormatError(f"{self.model.folder}: the model computed non-finite logits (NaN or Inf)")
        return logits if all_logits else logits[-1:]

    def step(self, token: int) -> np.ndarray:
        return self.feed([token])


class OnnxModel(LanguageModel):
    """An exported ONNX folder run by onnxruntime, with the generation and chat API of edgephi.load."""

    backend = "onnxruntime"

    def __init__(self, folder, *, threads: int | None = None, context: int | None = None):
        from .model_folder import read_model_folder

        self.folder = Path(folder)
        if not is_onnx_folder(self.folder):
            raise ModelFormatError(f"{self.folder}: not an ONNX folder written by `edgephi export-onnx`")
        files = read_model_folder(self.folder / EDGEPHI_SUBFOLDER)
        self.config, self.tokenizer, self.generation_config = files.config, files.tokenizer, files.generation
        self.generation_file = files.path / GENERATION_FILE
        self.decoder = OnnxDecoder(self.folder, threads=threads)
        context = context or self.config.max_position_embeddings
        if not isinstance(context, int) or isinstance(context, bool) or context < 2:
            raise ValueError(f"context must be an integer >= 2, got {context!r}")
        self.context = context

    def sequence(self, context: int | None = None) -> OnnxSequence:
        return OnnxSequence(self, context or self.context)

    def logits(self, ids) -> np.ndarray:
        """float32 (len(ids), V) logits of `ids` in a fresh context."""
        return self.decoder.logits(ids)
