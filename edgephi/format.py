"""The edgephi model folder: file names, format version and the model config.

Shape legend used across the package: T tokens, D hidden size, H query heads, Hk kv heads,
Dh head dim, R rotary dims, F ffn dim, V vocab, C cache capacity.

A model folder holds:
  config.json          ModelConfig (this module) with the per-tensor quant recipe
  weights.safetensors  every tensor; quantized ones split into planes (see quant.py)
  tokenizer.tiktoken   mergeable ranks, tiktoken's own file format (base64 bytes, rank)
  tokenizer.json       split pattern, special tokens and how ranks map to ids
  generation.json      bos id, whether to add it, the eos id, every end-of-turn id, chat template
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelFormatError
from .files import Fields, is_finite_number, read_json

FORMAT_NAME = "edgephi"
FORMAT_VERSION = 1

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
TOKENIZER_RANKS_FILE = "tokenizer.tiktoken"
TOKENIZER_SPEC_FILE = "tokenizer.json"
GENERATION_FILE = "generation.json"

ARCHITECTURES = ("phi3", "llama")
MAX_SIZE = 1 << 31  # any dimension or count; products of two stay far inside int64
FLOAT32_MAX = 3.4028234663852886e38
MAX_NORM_EPS = 1.0  # far above any model's (1e-5, 1e-6); an eps near float32's range zeroes every norm


@dataclass(frozen=True)
class RopeScaling:
    """LongRoPE: per-frequency divisors for short and long contexts and a magnitude factor."""

    short_factor: tuple[float, ...]  # (R/2,)
    long_factor: tuple[float, ...]  # (R/2,)
    attention_factor: float


@dataclass(frozen=True)
class ModelConfig:
    """Every dimension the runtime needs, independent of where the weights came from."""

    architecture: str
    vocab_size: int  # V: rows of the embedding
    hidden_size: int  # D
    num_layers: int
    num_heads: int  # H
    num_kv_heads: int  # Hk
    head_dim: int  # Dh
    intermediate_size: int  # F
    rms_norm_eps: float
    rope_theta: float
    rotary_dim: int  # R <= Dh; rotate_half ("NeoX") pairing over the first R dims
    max_position_embeddings: int
    original_max_position_embeddings: int
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None  # a query sees itself and the previous window-1 keys
    tie_word_embeddings: bool = False
    # name -> {"format": q4_0|q4_1|q8_0|f16|f32, "shape": [rows, cols]}
    tensors: dict = field(default_factory=dict, compare=False)
    source: dict = field(default_factory=dict, compare=False)

    def check(self, where: str) -> "ModelConfig":
        """Every invariant the kernels rely on, for configs from any source: integer sizes in
        range, divisible heads, rotary dims within a head, finite positive RoPE values. A config
        that passes cannot make a kernel index outside the arrays built from it."""
        def fail(problem):
            raise ModelFormatError(f"{where}: {problem}")

        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "rotary_dim", "max_position_embeddings",
                     "original_max_position_embeddings"):
            value = getattr(self, name)
            if not _is_int(value) or not 1 <= value <= MAX_SIZE:
                fail(f"{name} must be an integer in [1, {MAX_SIZE}], got {value!r}")
        if self.architecture not in ARCHITECTURES:
            fail(f"unknown architecture {self.architecture!r} (known: {', '.join(ARCHITECTURES)})")
        if self.num_heads % self.num_kv_heads:
            fail(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            fail(f"rotary_dim must be even and at most head_dim ({self.head_dim}), got {self.rotary_dim}")
        if not _is_number(self.rms_norm_eps) or not 0 <= self.rms_norm_eps <= MAX_NORM_EPS:
            fail(f"rms_norm_eps must be a number in [0, {MAX_NORM_EPS:g}], got {self.rms_norm_eps!r}")
        if not _is_number(self.rope_theta) or self.rope_theta <= 0:
            fail(f"rope_theta must be a finite number > 0, got {self.rope_theta!r}")
        window = self.sliding_window
        if window is not None and (not _is_int(window) or not 1 <= window <= MAX_SIZE):
            fail(f"sliding_window must be null or an integer in [1, {MAX_SIZE}], got {window!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            fail(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        scaling = self.rope_scaling
        if scaling is not None:
            for name in ("short_factor", "long_factor"):
                factors = getattr(scaling, name)
                if len(factors) != self.rotary_dim // 2:
                    fail(f"LongRoPE {name} must have {self.rotary_dim // 2} values (rotary_dim / 2), "
                         f"got {len(factors)}")
                if not all(_is_number(f) and f > 0 for f in factors):
                    fail(f"LongRoPE {name} must hold finite numbers > 0")
            if not _is_number(scaling.attention_factor) or scaling.attention_factor <= 0:
                fail(f"LongRoPE attention_factor must be a finite number > 0, got {scaling.attention_factor!r}")
        return self

    def tensor_names(self) -> list[str]:
        """Every tensor of the model, in file order."""
        return list(self.iter_tensor_names())

    def iter_tensor_names(self):
        """tensor_names() one at a time: a converter source fails at its first missing tensor even
        when hostile metadata claims billions of layers."""
        yield "embed"
        for i in range(self.num_layers):
            for kind in LAYER_KINDS:
                yield layer_tensor(i, kind)
        yield "norm"
        if not self.tie_word_embeddings:
            yield "output"

    def check_recipe(self, where: str) -> "ModelConfig":
        """The per-tensor recipe names exactly this model's tensors, each in a known format with
        the shape the dimensions imply (quantized formats: whole blocks of 32 per row)."""
        from .quant import BLOCK, FORMATS

        if not isinstance(self.tensors, dict):
            raise ModelFormatError(f"{where}: tensors must be a JSON object")
        count = 6 * self.num_layers + (2 if self.tie_word_embeddings else 3)
        if len(self.tensors) != count:  # before listing the names: num_layers may be huge
            raise ModelFormatError(f"{where}: tensors has {len(self.tensors)} recipes, but a {self.num_layers}-layer "
                                   f"{'tied' if self.tie_word_embeddings else 'untied'} model has {count} tensors")
        expected = self.tensor_names()
        extra = sorted(set(self.tensors) - set(expected))
        if extra:
            raise ModelFormatError(f"{where}: tensors lists {', '.join(extra[:3])}, which a {self.num_layers}-layer "
                                   f"{'tied' if self.tie_word_embeddings else 'untied'} model does not have")
        for name in expected:
            recipe = self.tensors.get(name)
            if not isinstance(recipe, dict):
                raise ModelFormatError(f"{where}: tensors has no recipe for {name!r}")
            fmt, shape = FORMATS.get(recipe.get("format")), recipe.get("shape")
            if fmt is None:
                raise ModelFormatError(f"{where}: tensors.{name}.format must be one of {', '.join(FORMATS)}, "
                                       f"got {recipe.get('format')!r}"[:300])
            want = list(expected_shape(self, name))
            if shape != want or not all(_is_int(n) for n in shape):
                raise ModelFormatError(f"{where}: tensors.{name}.shape must be {want}, got {shape!r}"[:300])
            if len(want) == 1 and fmt.name != "f32":
                raise ModelFormatError(f"{where}: tensors.{name} is a norm and must be f32, got {fmt.name}")
            if not fmt.is_float and want[1] % BLOCK:
                raise ModelFormatError(f"{where}: tensors.{name} has {want[1]} columns, not whole blocks of "
                                       f"{BLOCK}, so it cannot be {fmt.name}")
        return self

    @property
    def qkv_rows(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """float16 K and V for every layer."""
        return 2 * 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def to_json(self) -> dict:
        out = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
        out.update(dataclasses.asdict(self))
        return out

    @classmethod
    def from_json(cls, data: dict, where: str = CONFIG_FILE) -> "ModelConfig":
        """A config.json as the converter wrote it, checked as thoroughly as a converter source:
        the runtime trusts nothing in a model folder it did not verify."""
        f = Fields(data, where)
        if data.get("format") != FORMAT_NAME:
            raise ModelFormatError(f"{where}: not an edgephi model config")
        version = f.integer("format_version", optional=True)
        if version is None or version > FORMAT_VERSION or version < 1:
            raise ModelFormatError(
                f"{where}: made by a newer edgephi (format version {version}, this one reads "
                f"{FORMAT_VERSION}); upgrade edgephi or convert the model again"
            )
        names = {fld.name for fld in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        missing = names - kwargs.keys() - {"rope_scaling", "sliding_window", "tie_word_embeddings",
                                            "tensors", "source"}
        if missing:
            raise ModelFormatError(f"{where}: missing {', '.join(sorted(missing))}")
        rope = f.object("rope_scaling", None, optional=True)
        if rope is not None:
            kwargs["rope_scaling"] = RopeScaling(rope.numbers("short_factor"), rope.numbers("long_factor"),
                                                 rope.number("attention_factor"))
        f.object("tensors", {})
        f.object("source", {})
        return cls(**kwargs).check(where).check_recipe(where)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite number that stays finite as float32, the type the kernels compute in."""
    return is_finite_number(value) and abs(value) <= FLOAT32_MAX


def read_config(folder: Path) -> ModelConfig:
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise ModelFormatError(f"{folder}: not a folder (an edgephi model is a folder made by `edgephi convert`)")
    if not path.exists():
        raise ModelFormatError(f"{folder}: not an edgephi model folder (no {CONFIG_FILE})")
    return ModelConfig.from_json(read_json(path), str(path))


# ---------------------------------------------------------------------------------------------
# Tensor names: edgephi's, and the Hugging Face and GGUF tensors each one is made of

@dataclass(frozen=True)
class SourcePart:
    hf: str  # Hugging Face safetensors name; {i} is the layer
    gguf: str  # llama.cpp's GGUF name
    shape: tuple[str, ...]  # in the sizes of _sizes(); linear weights are [out, in]


def _parts(*rows: tuple[str, str, tuple[str, ...]]) -> tuple[SourcePart, ...]:
    return tuple(SourcePart(*row) for row in rows)


# edgephi tensor kind -> architecture ("*": any) -> the source tensors stacked row-wise into it,
# in order. Phi-3 stores qkv and gate_up fused (GGUF's ffn_up then holds gate and up); Llama
# stores them as parts. Kinds are listed in file order; those in LAYER_KINDS repeat per layer.
TENSOR_TABLE: dict[str, dict[str, tuple[SourcePart, ...]]] = {
    "embed": {"*": _parts(("model.embed_tokens.weight", "token_embd.weight", ("V", "D")))},
    "attn_norm": {"*": _parts(("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", ("D",)))},
    "qkv": {
        "phi3": _parts(("model.layers.{i}.self_attn.qkv_proj.weight", "blk.{i}.attn_qkv.weight", ("QKV", "D"))),
        "llama": _parts(("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", ("Q", "D")),
                        ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight", ("KV", "D")),
                        ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight", ("KV", "D"))),
    },
    "o": {"*": _parts(("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", ("D", "Q")))},
    "ffn_norm": {"*": _parts(("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", ("D",)))},
    "gate_up": {
        "phi3": _parts(("model.layers.{i}.mlp.gate_up_proj.weight", "blk.{i}.ffn_up.weight", ("2F", "D"))),
        "llama": _parts(("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", ("F", "D")),
                        ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight", ("F", "D"))),
    },
    "down": {"*": _parts(("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", ("D", "F")))},
    "norm": {"*": _parts(("model.norm.weight", "output_norm.weight", ("D",)))},
    "output": {"*": _parts(("lm_head.weight", "output.weight", ("V", "D")))},
}
LAYER_KINDS = ("attn_norm", "qkv", "o", "ffn_norm", "gate_up", "down")


def layer_tensor(layer: int, kind: str) -> str:
    """edgephi's name of a layer's tensor: layers.{layer}.{kind}."""
    return f"layers.{layer}.{kind}"


def _sizes(cfg: ModelConfig) -> dict[str, int]:
    F, Dh = cfg.intermediate_size, cfg.head_dim
    return {"V": cfg.vocab_size, "D": cfg.hidden_size, "F": F, "2F": 2 * F, "Q": cfg.num_heads * Dh,
            "KV": cfg.num_kv_heads * Dh, "QKV": cfg.qkv_rows}


def source_parts(cfg: ModelConfig, name: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(Hugging Face name, GGUF name, shape) of each source tensor stacked into edgephi tensor `name`."""
    layer, _, kind = name.rpartition(".")
    by_arch = TENSOR_TABLE[kind]
    sizes, i = _sizes(cfg), layer.rpartition(".")[2]
    return [(p.hf.format(i=i), p.gguf.format(i=i), tuple(sizes[n] for n in p.shape))
            for p in by_arch.get(cfg.architecture) or by_arch["*"]]


def expected_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """Logical shape of a tensor, its source parts stacked; linear weights are [out, in] as in Hugging Face."""
    shapes = [shape for _, _, shape in source_parts(cfg, name)]
    return shapes[0] if len(shapes[0]) == 1 else (sum(rows for rows, _ in shapes), shapes[0][1])


def check_generation(data: dict, where: str, vocab_size: int) -> dict:
    """generation.json's fields, typed and with every id inside the vocabulary; returns a clean copy."""
    f = Fields(data, where)
    out = {
        "bos_token_id": f.integer("bos_token_id", None, low=0, high=vocab_size - 1, optional=True),
        "add_bos_token": f.boolean("add_bos_token", False),
        "eos_token_id": f.integer("eos_token_id", None, low=0, high=vocab_size - 1, optional=True),
        "chat_template": f.string("chat_template", None, optional=True),
    }
    eos = f.array("eos_token_ids", [])
    for i, token in enumerate(eos):
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size:
            f.fail(f"eos_token_ids[{i}]", f"must be a token id in [0, {vocab_size}), got {token!r}"[:200])
    out["eos_token_ids"] = list(eos)
    return out


def read_generation(folder: Path, vocab_size: int) -> dict:
    path = Path(folder) / GENERATION_FILE
    return check_generation(read_json(path), str(path), vocab_size)
