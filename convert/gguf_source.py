"""GGUF files (llama and phi3 architectures): config, tensors kept in their block format, tokenizer."""

from __future__ import annotations

import os

import numpy as np

from edgephi.errors import EdgephiError
from edgephi.files import Fields, brief, open_regular
from edgephi.format import ModelConfig, RopeScaling
from edgephi.quant import FORMAT_BY_GGML_TYPE, FORMATS

from .gguf_reader import MAGIC, GGUFFile
from .gguf_blocks import planes_from_gguf_blocks
from .tensors import Part, RowReader, Source
from .tokenizers import spec_from_gguf

ARCHITECTURES = ("llama", "phi3")
BF16 = 30  # GGUF's bfloat16 type id
READABLE = ", ".join([name.upper() for name in FORMATS] + ["BF16"])
MAX_SIZE = 1 << 31  # far above any model's dimension, context or layer count; far below overflow


def unpermute_order(rows: int, heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation: the GGUF keeps each head's rotary pairs
    (i, i + Dh/2) adjacent; order[r] is the GGUF row that holds Hugging Face row r."""
    head_dim = rows // heads
    hf = np.arange(rows).reshape(heads, 2, head_dim // 2)  # HF row r = (head, half, i)
    gguf_pos = hf.transpose(0, 2, 1).reshape(-1)  # GGUF row j holds HF row gguf_pos[j]
    order = np.empty(rows, dtype=np.int64)
    order[gguf_pos] = np.arange(rows)
    return order


class GGUFModel(Source):
    NAMING = "gguf"

    def __init__(self, path):
        self.path = path
        self.file = GGUFFile(path)
        # typed reads of the metadata; errors name the file and the key
        self.meta = Fields(self.file.metadata, str(path))
        self.config = self._config()

    @staticmethod
    def has_magic(path) -> bool:
        """Whether `path` starts like a GGUF file (opened without blocking; regular files only)."""
        fd = open_regular(path)
        try:
            return os.pread(fd, len(MAGIC), 0) == MAGIC
        finally:
            os.close(fd)

    def _config(self) -> ModelConfig:
        f = self.file
        arch = f.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise EdgephiError(f"{self.path}: unsupported GGUF architecture {brief(arch)} "
                               f"(supported: {', '.join(ARCHITECTURES)})")
        if "rope_freqs.weight" in f.tensors:
            raise EdgephiError(f"{self.path}: Llama 3.1-style rope frequency scaling is not supported")
        return self._read_config(f, arch)

    def _size(self, key: str, default=Fields.MISSING) -> int:
        """A count or dimension: an integer type in GGUF (not a float, bool, string or array), >= 1."""
        return self.meta.integer(key, default, low=1, high=MAX_SIZE)

    def _read_config(self, f, arch) -> ModelConfig:
        m, a = self.meta, arch + "."
        D, H = self._size(a + "embedding_length"), self._size(a + "attention.head_count")
        Hk = self._size(a + "attention.head_count_kv", H)
        head_dim = self._size(a + "attention.key_length") if a + "attention.key_length" in m.data else D // H
        if arch == "llama" and head_dim % 2:  # llama.cpp's Q/K permutation pairs rows within a head
            raise EdgephiError(f"{self.path}: head dimension {head_dim} is odd")
        embed = f.tensors.get("token_embd.weight")
        if embed is None:
            raise EdgephiError(f"{self.path}: tensor token_embd.weight is missing")
        context = self._size(a + "context_length")
        original = self._size(a + "rope.scaling.original_context_length", context)
        scaling = None
        if "rope_factors_long.weight" in f.tensors or "rope_factors_short.weight" in f.tensors:
            if not {"rope_factors_long.weight", "rope_factors_short.weight"} <= f.tensors.keys():
                raise EdgephiError(f"{self.path}: GGUF has only one of rope_factors_long/rope_factors_short")
            scaling = RopeScaling(self._rope_factors("rope_factors_short.weight"),
                                  self._rope_factors("rope_factors_long.weight"),
                                  m.number(a + "rope.scaling.attn_factor", 1.0, positive=True))
        window = m.integer(a + "attention.sliding_window", 0, low=0, high=MAX_SIZE)
        return ModelConfig(
            architecture=arch, vocab_size=embed.shape[0], hidden_size=D,
            num_layers=self._size(a + "block_count"), num_heads=H, num_kv_heads=Hk, head_dim=head_dim,
            intermediate_size=self._size(a + "feed_forward_length"),
            rms_norm_eps=m.number(a + "attention.layer_norm_rms_epsilon", 1e-5, positive=True),
            rope_theta=m.number(a + "rope.freq_base", 10000.0, positive=True),
            rotary_dim=self._size(a + "rope.dimension_count", head_dim),
            max_position_embeddings=context, original_max_position_embeddings=original,
            rope_scaling=scaling, sliding_window=window or None,
            tie_word_embeddings="output.weight" not in f.tensors,
        ).check(str(self.path))

    def _rope_factors(self, name: str) -> tuple[float, ...]:
        """LongRoPE divides frequencies by these: each must be finite and positive."""
        values = self.file.float_array(name)
        if values.ndim != 1 or not np.all(np.isfinite(values) & (values > 0)):
            raise EdgephiError(f"{self.path}: tensor {name!r} must be a vector of finite positive factors")
        return tuple(map(float, values))

    def _part(self, name: str, shape: tuple[int, ...], order=None) -> Part:
        t = self.file.tensors.get(name)
        if t is None:
            raise EdgephiError(f"{self.path}: tensor {name!r} is missing")
        if t.shape != tuple(shape):
            raise EdgephiError(f"{self.path}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
        rows, cols = shape if len(shape) == 2 else (1, shape[0])
        reader = RowReader(self.path, t.offset, t.nbytes // rows)
        if t.ggml_type == BF16:  # kept as float32, which holds every bfloat16 exactly
            def read_bf16(idx, reader=reader):
                return (reader(idx).view("<u2").astype(np.uint32) << 16).view(np.float32)

            return Part(rows, cols, read_bf16, fmt=FORMATS["f32"], order=order)
        fmt = FORMAT_BY_GGML_TYPE.get(t.ggml_type)
        if fmt is None:
            raise EdgephiError(f"{self.path}: tensor {name!r} is {t.type_name}, which edgephi cannot compute with; "
                               f"it reads {READABLE} GGUF tensors")
        if len(shape) == 1 and not fmt.is_float:  # norm weights are read as floats, never as blocks
            raise EdgephiError(f"{self.path}: tensor {name!r} is {t.type_name}; a vector must be F32 or F16")
        if fmt.is_float:
            def read_floats(idx, reader=reader, dtype="<f4" if fmt.name == "f32" else "<f2"):
                return reader(idx).view(dtype).astype(np.float32)

            return Part(rows, cols, read_floats, fmt=fmt, order=order)

        def read_planes(idx, reader=reader, fmt=fmt):
            return planes_from_gguf_blocks(reader(idx), fmt, len(idx))

        return Part(rows, cols, None, fmt, read_planes, order)

    def tensors(self):
        c = self.config
        for t in super().tensors():
            if c.architecture == "llama" and t.name.endswith(".qkv"):
                # row orders are built once the shapes are checked against the file, so that
                # hostile metadata cannot make them huge
                t.parts[0].order = unpermute_order(t.parts[0].rows, c.num_heads)
                t.parts[1].order = unpermute_order(t.parts[1].rows, c.num_kv_heads)
            yield t

    def tokenizer(self):
        return spec_from_gguf(self.file, str(self.path))

    def generation(self, special: dict[str, int]) -> dict:
        m = self.meta
        ids = [m.integer(f"tokenizer.ggml.{kind}_token_id", None, low=0, optional=True)
               for kind in ("bos", "eos", "eot", "eom")]
        return {"bos_token_id": ids[0], "add_bos_token": m.boolean("tokenizer.ggml.add_bos_token", False),
                "eos_token_ids": ids[1:], "chat_template": m.string("tokenizer.chat_template", None, optional=True)}
