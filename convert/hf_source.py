"""Hugging Face checkpoint folders (Phi3ForCausalLM, LlamaForCausalLM): config, tensors, tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from edgephi.errors import EdgephiError
from edgephi.format import ModelConfig, RopeScaling
from edgephi.safetensors_io import DTYPES, SafetensorsFile, bf16_to_float32

from .tensors import Part, RowReader, Source
from .tokenizers import spec_from_tokenizer_json

ARCHITECTURES = {"Phi3ForCausalLM": "phi3", "LlamaForCausalLM": "llama"}
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgephiError(f"{path}: missing") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise EdgephiError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise EdgephiError(f"{path}: expected a JSON object")
    return data


def _rope(cfg: dict, where: str, head_dim: int, max_pos: int) -> tuple[float, int, int, RopeScaling | None]:
    """(theta, rotary dims, original max positions, LongRoPE) from either config style:
    the Hub's top-level rope_theta/rope_scaling or transformers 5's rope_parameters."""
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    factor = float(params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    rotary_dim = int(head_dim * factor)
    kind = params.get("rope_type", params.get("type", "default"))
    original = int(cfg.get("original_max_position_embeddings")
                   or params.get("original_max_position_embeddings") or max_pos)
    if kind == "default":
        return theta, rotary_dim, original, None
    if kind not in ("longrope", "su", "yarn") or cfg.get("model_type") not in ("phi3", None):
        raise EdgephiError(f"{where}: rope scaling {kind!r} is not supported (default and longrope are)")
    short, long_ = params.get("short_factor"), params.get("long_factor")
    if not short or not long_ or len(short) != rotary_dim // 2 or len(long_) != rotary_dim // 2:
        raise EdgephiError(f"{where}: longrope short_factor/long_factor must each have {rotary_dim // 2} values")
    attention = params.get("attention_factor")
    if attention is None:
        # transformers: the scale ratio defaults to max/original positions when `factor` is absent
        scale = params.get("factor") or max_pos / original
        attention = 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(original))
    return theta, rotary_dim, original, RopeScaling(tuple(map(float, short)), tuple(map(float, long_)),
                                                    float(attention))


def read_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    cfg = _read_json(path)
    archs = cfg.get("architectures")
    name = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if name not in ARCHITECTURES:
        raise EdgephiError(f"{path}: unsupported architecture {name or cfg.get('model_type')!r} "
                           f"(supported: {', '.join(ARCHITECTURES)})")
    arch = ARCHITECTURES[name]
    try:
        D, H = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        Hk = int(cfg.get("num_key_value_heads") or H)
        if min(D, H, Hk, int(cfg["num_hidden_layers"]), int(cfg["intermediate_size"])) <= 0:
            raise ValueError("sizes and counts must be positive")
        head_dim = int(cfg.get("head_dim") or D // H)
        max_pos = int(cfg.get("max_position_embeddings", 4096))
        theta, rotary_dim, original, scaling = _rope(cfg, str(path), head_dim, max_pos)
        window = cfg.get("sliding_window")
        config = ModelConfig(
            architecture=arch, vocab_size=int(cfg["vocab_size"]), hidden_size=D,
            num_layers=int(cfg["num_hidden_layers"]), num_heads=H, num_kv_heads=Hk, head_dim=head_dim,
            intermediate_size=int(cfg["intermediate_size"]), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=theta, rotary_dim=rotary_dim, max_position_embeddings=max_pos,
            original_max_position_embeddings=original, rope_scaling=scaling,
            sliding_window=int(window) if window else None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except KeyError as exc:
        raise EdgephiError(f"{path}: missing {exc.args[0]}") from None
    except (TypeError, ValueError) as exc:
        raise EdgephiError(f"{path}: bad value ({exc})") from None
    if arch == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise EdgephiError(f"{path}: Llama models with attention or MLP biases are not supported")
    return config.check(str(path))


def open_shards(folder: Path) -> dict[str, SafetensorsFile]:
    """tensor name -> the mapped file holding it (one file or an index of shards)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise EdgephiError(f"{index}: no weight_map")
        files = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise EdgephiError(f"{folder / shard}: shard listed in {index.name} is missing")
            files[shard] = SafetensorsFile(folder / shard)
        located = {}
        for name, shard in weight_map.items():
            if name not in files[shard].header:
                raise EdgephiError(f"{folder / shard}: tensor {name!r} listed in {index.name} is missing")
            located[name] = files[shard]
        return located
    single = folder / "model.safetensors"
    if not single.is_file():
        raise EdgephiError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    f = SafetensorsFile(single)
    return {name: f for name in f.keys()}


class HFCheckpoint(Source):
    def __init__(self, folder: Path):
        self.folder = folder
        self.config = read_config(folder)
        self.raw_config = _read_json(folder / "config.json")  # for bos/eos ids
        self.files = open_shards(folder)
        self._used: set[str] = set()

    def _part(self, name: str, shape: tuple[int, int], order=None) -> Part:
        f = self.files.get(name)
        if f is None:
            raise EdgephiError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        if f.dtype(name) not in ("F32", "F16", "BF16"):
            raise EdgephiError(f"{f.path}: tensor {name!r} has unsupported dtype {f.dtype(name)}")
        if f.shape(name) != shape:
            raise EdgephiError(f"{f.path}: tensor {name!r} has shape {list(f.shape(name))}, "
                               f"expected {list(shape)} from config.json")
        self._used.add(name)
        dtype = f.dtype(name)
        rows, cols = shape if len(shape) == 2 else (1, shape[0])
        itemsize = np.dtype(DTYPES[dtype]).itemsize
        reader = RowReader(f.path, f.data_start + f.header[name]["data_offsets"][0], cols * itemsize)

        def read(idx, reader=reader, dtype=dtype):
            values = reader(idx).view(DTYPES[dtype])
            return bf16_to_float32(values) if dtype == "BF16" else values.astype(np.float32)

        return Part(rows, cols, read)

    def tensors(self):
        """Yields SourceTensors in file order: embed, each layer's tensors, norm, output."""
        c = self.config
        D, F, Dh = c.hidden_size, c.intermediate_size, c.head_dim
        yield self._matrix("embed", ["model.embed_tokens.weight"], [(c.vocab_size, D)])
        for i in range(c.num_layers):
            p, e = f"model.layers.{i}.", f"layers.{i}."
            yield self._vector(e + "attn_norm", p + "input_layernorm.weight")
            if c.architecture == "phi3":
                yield self._matrix(e + "qkv", [p + "self_attn.qkv_proj.weight"], [(c.qkv_rows, D)])
            else:
                yield self._matrix(e + "qkv", [p + f"self_attn.{x}_proj.weight" for x in "qkv"],
                                   [(c.num_heads * Dh, D), (c.num_kv_heads * Dh, D), (c.num_kv_heads * Dh, D)])
            yield self._matrix(e + "o", [p + "self_attn.o_proj.weight"], [(D, c.num_heads * Dh)])
            yield self._vector(e + "ffn_norm", p + "post_attention_layernorm.weight")
            if c.architecture == "phi3":
                yield self._matrix(e + "gate_up", [p + "mlp.gate_up_proj.weight"], [(2 * F, D)])
            else:
                yield self._matrix(e + "gate_up", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
                                   [(F, D), (F, D)])
            yield self._matrix(e + "down", [p + "mlp.down_proj.weight"], [(D, F)])
        yield self._vector("norm", "model.norm.weight")
        if not c.tie_word_embeddings:
            yield self._matrix("output", ["lm_head.weight"], [(c.vocab_size, D)])
        leftover = [n for n in self.files if n not in self._used and not n.endswith(IGNORED_SUFFIXES)
                    and not (c.tie_word_embeddings and n == "lm_head.weight")]
        if leftover:
            raise EdgephiError(f"{self.folder}: unexpected tensors the {c.architecture} architecture does "
                               f"not use: {', '.join(sorted(leftover)[:5])}")

    def tokenizer(self):
        path = self.folder / "tokenizer.json"
        if not path.is_file():
            raise EdgephiError(f"{path}: missing (edgephi builds its tokenizer from tokenizer.json)")
        return spec_from_tokenizer_json(path)

    def generation(self, special: dict[str, int]) -> dict:
        """bos/eos/end-of-turn ids and the chat template, from the checkpoint's side files."""
        cfg = self.raw_config
        gen = _optional_json(self.folder / "generation_config.json")
        tok = _optional_json(self.folder / "tokenizer_config.json")
        template = tok.get("chat_template")
        jinja = self.folder / "chat_template.jinja"
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        def token_id(value):
            if isinstance(value, dict):
                value = value.get("content")
            return special.get(value) if isinstance(value, str) else None

        eos = []
        for value in (gen.get("eos_token_id"), cfg.get("eos_token_id")):
            eos += value if isinstance(value, list) else [value] if value is not None else []
        eos.append(token_id(tok.get("eos_token")))
        bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
        if bos is None:
            bos = token_id(tok.get("bos_token"))
        return {"bos_token_id": bos, "add_bos_token": bool(tok.get("add_bos_token", False)),
                "eos_token_ids": eos, "chat_template": template}


def _optional_json(path: Path) -> dict:
    return _read_json(path) if path.is_file() else {}
