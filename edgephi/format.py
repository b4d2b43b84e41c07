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
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelFormatError

FORMAT_NAME = "edgephi"
FORMAT_VERSION = 1

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
TOKENIZER_RANKS_FILE = "tokenizer.tiktoken"
TOKENIZER_SPEC_FILE = "tokenizer.json"
GENERATION_FILE = "generation.json"

ARCHITECTURES = ("phi3", "llama")


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
        """Sizes a converter may meet in a source file, checked before any tensor is read."""
        sizes = (self.vocab_size, self.hidden_size, self.num_layers, self.num_heads, self.num_kv_heads,
                 self.head_dim, self.intermediate_size)
        if min(sizes) <= 0:
            raise ModelFormatError(f"{where}: sizes and counts must be positive")
        if self.num_heads % self.num_kv_heads or self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ModelFormatError(f"{where}: inconsistent heads ({self.num_heads}/{self.num_kv_heads}) or rotary "
                                   f"dims ({self.rotary_dim}/{self.head_dim})")
        scaling = self.rope_scaling
        if scaling and not len(scaling.short_factor) == len(scaling.long_factor) == self.rotary_dim // 2:
            raise ModelFormatError(f"{where}: LongRoPE factors must each have {self.rotary_dim // 2} values")
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
        if data.get("format") != FORMAT_NAME:
            raise ModelFormatError(f"{where}: not an edgephi model config")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ModelFormatError(
                f"{where}: made by a newer edgephi (format version {version}, this one reads "
                f"{FORMAT_VERSION}); upgrade edgephi or convert the model again"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        missing = names - kwargs.keys() - {"rope_scaling", "sliding_window", "tie_word_embeddings",
                                            "tensors", "source"}
        if missing:
            raise ModelFormatError(f"{where}: missing {', '.join(sorted(missing))}")
        if kwargs["architecture"] not in ARCHITECTURES:
            raise ModelFormatError(f"{where}: unknown architecture {kwargs['architecture']!r}")
        if kwargs.get("rope_scaling"):
            rs = kwargs["rope_scaling"]
            kwargs["rope_scaling"] = RopeScaling(tuple(rs["short_factor"]), tuple(rs["long_factor"]),
                                                 float(rs["attention_factor"]))
        return cls(**kwargs)


def read_config(folder: Path) -> ModelConfig:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ModelFormatError(f"{folder}: not an edgephi model folder (no {CONFIG_FILE})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path}: not valid JSON ({exc})") from None
    return ModelConfig.from_json(data, str(path))


def expected_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
    """Logical shape of a tensor; linear weights are [out, in] as in Hugging Face."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    kind = name.rsplit(".", 1)[-1]
    return {
        "embed": (cfg.vocab_size, D),
        "output": (cfg.vocab_size, D),
        "norm": (D,),
        "attn_norm": (D,),
        "ffn_norm": (D,),
        "qkv": (cfg.qkv_rows, D),
        "o": (D, cfg.num_heads * cfg.head_dim),
        "gate_up": (2 * F, D),
        "down": (D, F),
    }[kind]
