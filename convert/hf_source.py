"""Hugging Face checkpoint folders (Phi3ForCausalLM, LlamaForCausalLM): config, tensors, tokenizer."""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePosixPath

import numpy as np

from edgephi.errors import EdgephiError
from edgephi.files import Fields, brief, read_json, read_text
from edgephi.format import TENSOR_TABLE, ModelConfig, RopeScaling
from edgephi.safetensors_io import DTYPES, SafetensorsFile

from .tensors import Part, RowReader, Source
from .tokenizers import spec_from_tokenizer_json

ARCHITECTURES = {"Phi3ForCausalLM": "phi3", "LlamaForCausalLM": "llama"}
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size")
MAX_SIZE = 1 << 31  # far above any model's dimension, context or layer count; far below overflow
MAX_TEMPLATE_BYTES = 4 << 20  # chat templates are a few kB
MAX_NAME = 255  # characters in a shard's file name (a path inside the folder)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: widening is exact."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _rope(c: Fields, where: str, head_dim: int, max_pos: int) -> tuple[float, int, int, RopeScaling | None]:
    """(theta, rotary dims, original max positions, LongRoPE) from either config style:
    the Hub's top-level rope_theta/rope_scaling or transformers 5's rope_parameters."""
    layers = [f for f in (c.object("rope_parameters", None, optional=True),
                          c.object("rope_scaling", None, optional=True)) if f is not None]

    def holder(key: str, top: bool = False) -> Fields | None:
        """The object that sets `key` (null counts as unset): rope_parameters, then rope_scaling,
        then (when `top`) the config itself."""
        return next((f for f in layers + [c] * top if f.data.get(key) is not None), None)

    theta = (holder("rope_theta", top=True) or c).number("rope_theta", 10000.0, positive=True)
    f = holder("partial_rotary_factor", top=True)
    factor = f.number("partial_rotary_factor", positive=True) if f else 1.0
    if factor > 1:
        f.fail("partial_rotary_factor", f"must be in (0, 1], got {factor}")
    rotary_dim = int(head_dim * factor)
    f = holder("rope_type") or holder("type")
    kind = f.string("rope_type" if "rope_type" in f.data else "type") if f else "default"
    # the top-level value first, as the Hub's Phi-3 configs set it there
    f = c if c.data.get("original_max_position_embeddings") is not None else holder("original_max_position_embeddings")
    original = f.integer("original_max_position_embeddings", low=1, high=MAX_SIZE) if f else max_pos
    if kind == "default":
        return theta, rotary_dim, original, None
    if kind not in ("longrope", "su", "yarn") or c.data.get("model_type") not in ("phi3", None):
        raise EdgephiError(f"{where}: rope scaling {brief(kind)} is not supported (default and longrope are)")
    short_at, long_at = holder("short_factor"), holder("long_factor")
    short = short_at.numbers("short_factor", positive=True) if short_at else ()
    long_ = long_at.numbers("long_factor", positive=True) if long_at else ()
    if not short or not long_ or len(short) != rotary_dim // 2 or len(long_) != rotary_dim // 2:
        raise EdgephiError(f"{where}: longrope short_factor/long_factor must each have {rotary_dim // 2} values")
    f = holder("attention_factor")
    attention = f.number("attention_factor", positive=True) if f else None
    if attention is None:
        # transformers: the scale ratio defaults to max/original positions when `factor` is absent
        f = holder("factor")
        scale = f.number("factor", positive=True) if f else max_pos / original
        if scale > 1 and original < 2:  # the factor divides by log(original)
            c.fail("original_max_position_embeddings", f"must be at least 2 for LongRoPE, got {original}")
        attention = 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(original))
    return theta, rotary_dim, original, RopeScaling(short, long_, attention)


def config_from_json(cfg: dict, path: Path) -> ModelConfig:
    where = str(path)
    c = Fields(cfg, f"{where}: bad value")  # errors read "config.json: bad value: <field> <problem>"
    archs = cfg.get("architectures")
    if archs is not None and not isinstance(archs, list):
        c.fail("architectures", f"must be a JSON array, got {brief(archs)}")
    name = archs[0] if archs and isinstance(archs[0], str) else None
    if name not in ARCHITECTURES:
        shown = name or cfg.get("model_type")
        raise EdgephiError(f"{where}: unsupported architecture {brief(shown)} "
                           f"(supported: {', '.join(ARCHITECTURES)})")
    arch = ARCHITECTURES[name]
    for key in REQUIRED:
        if key not in cfg:
            raise EdgephiError(f"{where}: missing {key}")
    D, H = c.integer("hidden_size", low=1, high=MAX_SIZE), c.integer("num_attention_heads", low=1, high=MAX_SIZE)
    Hk = c.integer("num_key_value_heads", None, low=1, high=MAX_SIZE, optional=True) or H
    head_dim = c.integer("head_dim", None, low=1, high=MAX_SIZE, optional=True) or D // H
    max_pos = c.integer("max_position_embeddings", 4096, low=1, high=MAX_SIZE)
    theta, rotary_dim, original, scaling = _rope(c, where, head_dim, max_pos)
    if arch == "llama" and (c.boolean("attention_bias", False) or c.boolean("mlp_bias", False)):
        raise EdgephiError(f"{where}: Llama models with attention or MLP biases are not supported")
    return ModelConfig(
        architecture=arch, vocab_size=c.integer("vocab_size", low=1, high=MAX_SIZE), hidden_size=D,
        num_layers=c.integer("num_hidden_layers", low=1, high=MAX_SIZE), num_heads=H, num_kv_heads=Hk,
        head_dim=head_dim, intermediate_size=c.integer("intermediate_size", low=1, high=MAX_SIZE),
        rms_norm_eps=c.number("rms_norm_eps", 1e-5, positive=True),
        rope_theta=theta, rotary_dim=rotary_dim, max_position_embeddings=max_pos,
        original_max_position_embeddings=original, rope_scaling=scaling,
        sliding_window=c.integer("sliding_window", None, low=0, high=MAX_SIZE, optional=True) or None,
        tie_word_embeddings=c.boolean("tie_word_embeddings", False),
    ).check(where)


def read_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    return config_from_json(read_json(path), path)


def _shard_name(index: Fields, tensor: str, shard) -> str:
    """A file name from the index's weight_map, which must stay inside the checkpoint folder."""
    if (not isinstance(shard, str) or not 0 < len(shard) <= MAX_NAME or "\0" in shard
            or PurePosixPath(shard).is_absolute() or ".." in PurePosixPath(shard).parts):
        index.fail(f"weight_map[{brief(tensor)}]", f"must name a file inside the folder, got {brief(shard)}")
    return shard


def open_shards(folder: Path) -> dict[str, SafetensorsFile]:
    """tensor name -> the mapped file holding it (one file or an index of shards)."""
    index = folder / "model.safetensors.index.json"
    if os.path.lexists(index):
        fields = Fields(read_json(index), str(index))
        weight_map = {name: _shard_name(fields, name, shard)
                      for name, shard in fields.object("weight_map").data.items()}
        files = {}
        for shard in sorted(set(weight_map.values())):
            if not os.path.exists(folder / shard):  # a dangling link is missing too
                raise EdgephiError(f"{folder / shard}: shard listed in {index.name} is missing")
            files[shard] = SafetensorsFile(folder / shard)
        located = {}
        for name, shard in weight_map.items():
            if name not in files[shard].header:
                raise EdgephiError(f"{folder / shard}: tensor {brief(name)} listed in {index.name} is missing")
            located[name] = files[shard]
        return located
    single = folder / "model.safetensors"
    if not os.path.lexists(single):
        raise EdgephiError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    f = SafetensorsFile(single)
    return {name: f for name in f.keys()}


class HFCheckpoint(Source):
    NAMING = "hf"

    def __init__(self, folder: Path):
        self.folder = folder
        self.raw_config = read_json(folder / "config.json")  # also for bos/eos ids
        self.config = config_from_json(self.raw_config, folder / "config.json")
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
        yield from super().tensors()
        c = self.config
        tied_output = TENSOR_TABLE["output"]["*"][0].hf  # checkpoints with tied embeddings may still hold it
        leftover = [n for n in self.files if n not in self._used and not n.endswith(IGNORED_SUFFIXES)
                    and not (c.tie_word_embeddings and n == tied_output)]
        if leftover:
            raise EdgephiError(f"{self.folder}: unexpected tensors the {c.architecture} architecture does "
                               f"not use: {', '.join(brief(n) for n in sorted(leftover)[:5])}")

    def tokenizer(self):
        path = self.folder / "tokenizer.json"
        if not os.path.lexists(path):
            raise EdgephiError(f"{path}: missing (edgephi builds its tokenizer from tokenizer.json)")
        return spec_from_tokenizer_json(path)

    def generation(self, special: dict[str, int]) -> dict:
        """bos/eos/end-of-turn ids and the chat template, from the checkpoint's side files."""
        cfg = Fields(self.raw_config, str(self.folder / "config.json"))
        gen = _optional_json(self.folder / "generation_config.json")
        tok = _optional_json(self.folder / "tokenizer_config.json")
        template = _chat_template(tok)
        jinja = self.folder / "chat_template.jinja"
        if os.path.exists(jinja):
            template = read_text(jinja, MAX_TEMPLATE_BYTES)

        def token_id(key: str) -> int | None:
            """The id of tokenizer_config's `key` token: a string or an AddedToken object."""
            value = tok.data.get(key)
            if isinstance(value, dict):
                value = Fields(value, tok.where, f"{key}.").string("content", None, optional=True)
            elif value is not None and not isinstance(value, str):
                tok.fail(key, f"must be a string or a token object, got {brief(value)}")
            return special.get(value) if isinstance(value, str) else None

        eos = _token_ids(gen, "eos_token_id") + _token_ids(cfg, "eos_token_id") + [token_id("eos_token")]
        bos = (gen if "bos_token_id" in gen.data else cfg).integer("bos_token_id", None, low=0, optional=True)
        if bos is None:
            bos = token_id("bos_token")
        add_bos = tok.data.get("add_bos_token")
        if add_bos not in (None, True, False):
            tok.fail("add_bos_token", f"must be true or false, got {brief(add_bos)}")
        return {"bos_token_id": bos, "add_bos_token": bool(add_bos),
                "eos_token_ids": eos, "chat_template": template}


def _optional_json(path: Path) -> Fields:
    """An optional side file's fields; absent means empty (a FIFO or a folder is refused)."""
    return Fields(read_json(path) if os.path.exists(path) else {}, str(path))


def _token_ids(f: Fields, key: str) -> list[int]:
    """An id or a list of ids (generation_config's eos_token_id may be either); null means none."""
    value = f.data.get(key)
    values = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 31 for v in values):
        f.fail(key, f"must be a token id or a list of them, got {brief(value)}")
    return values


def _chat_template(tok: Fields) -> str | None:
    """tokenizer_config's chat_template: a string, or [{"name": ..., "template": ...}] (the default's)."""
    value = tok.data.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        tok.fail("chat_template", f"must be a string or a list of named templates, got {brief(value)}")
    for i, entry in enumerate(value):
        named = Fields(entry, tok.where, f"chat_template[{i}].")
        if named.string("name", None, optional=True) == "default":
            return named.string("template")
    return None
