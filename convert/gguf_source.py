"""GGUF files (llama and phi3 architectures): config, tensors kept in their block format, tokenizer."""

from __future__ import annotations

import numpy as np

from edgephi.errors import EdgephiError
from edgephi.format import ModelConfig, RopeScaling
from edgephi.quant import FORMAT_BY_GGML_TYPE, planes_from_gguf_blocks

from .gguf_reader import GGUFFile
from .tensors import Part, RowReader, Source
from .tokenizers import spec_from_gguf

ARCHITECTURES = ("llama", "phi3")


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
    def __init__(self, path):
        self.path = path
        self.file = GGUFFile(path)
        self.config = self._config()

    def _key(self, suffix: str, default=None, required=True):
        arch = self.file.get("general.architecture")
        value = self.file.get(f"{arch}.{suffix}", default)
        if value is None and required:
            raise EdgephiError(f"{self.path}: GGUF metadata {arch}.{suffix} is missing")
        return value

    def _config(self) -> ModelConfig:
        f = self.file
        arch = f.get("general.architecture")
        if arch not in ARCHITECTURES:
            raise EdgephiError(f"{self.path}: unsupported GGUF architecture {arch!r} "
                               f"(supported: {', '.join(ARCHITECTURES)})")
        if "rope_freqs.weight" in f.tensors:
            raise EdgephiError(f"{self.path}: Llama 3.1-style rope frequency scaling is not supported")
        try:
            return self._read_config(f, arch)
        except (TypeError, ValueError, ZeroDivisionError) as exc:
            raise EdgephiError(f"{self.path}: bad GGUF metadata ({exc})") from None

    def _read_config(self, f, arch) -> ModelConfig:
        D, H = int(self._key("embedding_length")), int(self._key("attention.head_count"))
        Hk = int(self._key("attention.head_count_kv", H))
        head_dim = int(self._key("attention.key_length", required=False) or D // H)
        embed = f.tensors.get("token_embd.weight")
        if embed is None:
            raise EdgephiError(f"{self.path}: tensor token_embd.weight is missing")
        context = int(self._key("context_length"))
        original = int(self._key("rope.scaling.original_context_length", context))
        scaling = None
        if "rope_factors_long.weight" in f.tensors or "rope_factors_short.weight" in f.tensors:
            if not {"rope_factors_long.weight", "rope_factors_short.weight"} <= f.tensors.keys():
                raise EdgephiError(f"{self.path}: GGUF has only one of rope_factors_long/rope_factors_short")
            attn = self._key("rope.scaling.attn_factor", required=False)
            scaling = RopeScaling(tuple(map(float, f.float_array("rope_factors_short.weight"))),
                                  tuple(map(float, f.float_array("rope_factors_long.weight"))),
                                  float(attn) if attn is not None else 1.0)
        window = self._key("attention.sliding_window", 0, required=False)
        return ModelConfig(
            architecture=arch, vocab_size=embed.shape[0], hidden_size=D,
            num_layers=int(self._key("block_count")), num_heads=H, num_kv_heads=Hk, head_dim=head_dim,
            intermediate_size=int(self._key("feed_forward_length")),
            rms_norm_eps=float(self._key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(self._key("rope.freq_base", 10000.0)),
            rotary_dim=int(self._key("rope.dimension_count", head_dim)),
            max_position_embeddings=context, original_max_position_embeddings=original,
            rope_scaling=scaling, sliding_window=int(window) or None,
            tie_word_embeddings="output.weight" not in f.tensors,
        ).check(str(self.path))

    def _part(self, name: str, shape: tuple[int, ...], order=None) -> Part:
        t = self.file.tensors.get(name)
        if t is None:
            raise EdgephiError(f"{self.path}: tensor {name!r} is missing")
        if t.shape != tuple(shape):
            raise EdgephiError(f"{self.path}: tensor {name!r} has shape {list(t.shape)}, expected {list(shape)}")
        rows, cols = shape if len(shape) == 2 else (1, shape[0])
        fmt = FORMAT_BY_GGML_TYPE.get(t.ggml_type)
        if fmt is None:
            raise EdgephiError(f"{self.path}: tensor {name!r} is {t.type_name}; edgephi reads "
                               "F32, F16, Q8_0, Q4_0 and Q4_1 GGUF tensors")
        reader = RowReader(self.path, t.offset, t.nbytes // rows)
        if fmt.is_float:
            def read_floats(idx, reader=reader, dtype="<f4" if fmt.name == "f32" else "<f2"):
                return reader(idx).view(dtype).astype(np.float32)

            return Part(rows, cols, read_floats, fmt=fmt, order=order)

        def read_planes(idx, reader=reader, fmt=fmt):
            return planes_from_gguf_blocks(reader(idx), fmt, len(idx))

        return Part(rows, cols, None, fmt, read_planes, order)

    def tensors(self):
        c = self.config
        D, F, Dh = c.hidden_size, c.intermediate_size, c.head_dim
        q_rows, kv_rows = c.num_heads * Dh, c.num_kv_heads * Dh
        yield self._matrix("embed", ["token_embd.weight"], [(c.vocab_size, D)])
        for i in range(c.num_layers):
            b, e = f"blk.{i}.", f"layers.{i}."
            yield self._vector(e + "attn_norm", b + "attn_norm.weight")
            if c.architecture == "phi3":
                yield self._matrix(e + "qkv", [b + "attn_qkv.weight"], [(c.qkv_rows, D)])
            else:
                yield self._matrix(e + "qkv", [b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"],
                                   [(q_rows, D), (kv_rows, D), (kv_rows, D)],
                                   [unpermute_order(q_rows, c.num_heads),
                                    unpermute_order(kv_rows, c.num_kv_heads), None])
            yield self._matrix(e + "o", [b + "attn_output.weight"], [(D, q_rows)])
            yield self._vector(e + "ffn_norm", b + "ffn_norm.weight")
            if c.architecture == "phi3":
                yield self._matrix(e + "gate_up", [b + "ffn_up.weight"], [(2 * F, D)])
            else:
                yield self._matrix(e + "gate_up", [b + "ffn_gate.weight", b + "ffn_up.weight"], [(F, D), (F, D)])
            yield self._matrix(e + "down", [b + "ffn_down.weight"], [(D, F)])
        yield self._vector("norm", "output_norm.weight")
        if not c.tie_word_embeddings:
            yield self._matrix("output", ["output.weight"], [(c.vocab_size, D)])

    def tokenizer(self):
        return spec_from_gguf(self.file, str(self.path))

    def generation(self, special: dict[str, int]) -> dict:
        f = self.file
        eos = [f.get("tokenizer.ggml.eos_token_id"), f.get("tokenizer.ggml.eot_token_id"),
               f.get("tokenizer.ggml.eom_token_id")]
        return {"bos_token_id": f.get("tokenizer.ggml.bos_token_id"),
                "add_bos_token": bool(f.get("tokenizer.ggml.add_bos_token", False)),
                "eos_token_ids": eos, "chat_template": f.get("tokenizer.chat_template")}
