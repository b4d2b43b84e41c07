"""Model weights, memory-mapped from weights.safetensors and arranged as the forward pass's
records (records.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numba import njit, typed

from .errors import ModelFormatError
from .format import WEIGHTS_FILE, ModelConfig, expected_shape, layer_tensor
from .isa import Isa
from .quant import FORMATS, QuantFormat, check_finite, plane_key, plane_layout
from .records import Layer, Linear, Rope, Transformer, linear_from_planes, readonly
from .rope import inverse_frequencies
from .safetensors_io import SafetensorsFile


@njit(cache=True)
def _list_of(first):
    """A typed List built in cached compiled code: from Python, typed.List compiles its methods
    anew in every process (about a second of start-up)."""
    items = typed.List()
    items.append(first)
    return items


@njit(cache=True)
def _append(items, item):
    items.append(item)


def read_planes(st: SafetensorsFile, cfg: ModelConfig, name: str) -> tuple[QuantFormat, dict[str, np.ndarray]]:
    """The planes of tensor `name` as its recipe in config.json lays them out (mapped, not copied),
    each checked for presence, element size and shape: kernels do not check bounds, so a plane of
    the wrong size must never reach them."""
    path = st.path
    recipe = cfg.tensors.get(name)
    if recipe is None:
        raise ModelFormatError(f"{path.parent}/config.json: no recipe for tensor {name!r}")
    fmt = FORMATS.get(recipe["format"])
    if fmt is None or tuple(recipe["shape"]) != expected_shape(cfg, name):
        raise ModelFormatError(f"{path}: tensor {name!r} has format {recipe['format']} shape {recipe['shape']}")
    planes = {}
    for plane_name, (dtype, shape) in plane_layout(fmt, tuple(recipe["shape"])).items():
        key = plane_key(name, plane_name)
        if key not in st.header:
            raise ModelFormatError(f"{path}: tensor {key!r} is missing")
        arr = st.raw(key)
        if arr.dtype.itemsize != np.dtype(dtype).itemsize or arr.shape != tuple(shape):
            raise ModelFormatError(f"{path}: tensor {key!r} is {arr.dtype} {list(arr.shape)}, not the "
                                   f"{np.dtype(dtype)} {list(shape)} its recipe implies")
        planes[plane_name] = arr.view(dtype)
    return fmt, planes


def expected_keys(cfg: ModelConfig) -> set[str]:
    """Every safetensors key the model's recipe implies."""
    return {plane_key(name, plane) for name in cfg.tensor_names()
            for plane in plane_layout(FORMATS[cfg.tensors[name]["format"]], tuple(cfg.tensors[name]["shape"]))}


def load_transformer(folder: Path, cfg: ModelConfig, isa: Isa) -> Transformer:
    """The model's record for forward(): its weights mapped from the folder's weights file, each
    tensor checked against the recipe and for NaN/Inf scales and float values."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.exists():
        raise ModelFormatError(f"{path}: missing")
    st = SafetensorsFile(path)
    extra = sorted(set(st.header) - expected_keys(cfg))
    if extra:
        raise ModelFormatError(f"{path}: holds tensors config.json does not describe ({', '.join(extra[:3])}); "
                               f"its num_layers ({cfg.num_layers}) or tied output may have been edited")

    def checked_planes(name):
        fmt, planes = read_planes(st, cfg, name)
        check_finite(path, name, planes)
        return fmt, planes

    def matrix(name) -> Linear:
        fmt, planes = checked_planes(name)
        return linear_from_planes(fmt.name, planes)

    def vector(name) -> np.ndarray:
        fmt, planes = checked_planes(name)
        if fmt.name != "f32":
            raise ModelFormatError(f"{path}: tensor {name!r} is {fmt.name}, not f32")
        return readonly(planes[""])

    def layer(i) -> Layer:
        return Layer(attn_norm=vector(layer_tensor(i, "attn_norm")), qkv=matrix(layer_tensor(i, "qkv")),
                     o=matrix(layer_tensor(i, "o")), ffn_norm=vector(layer_tensor(i, "ffn_norm")),
                     gate_up=matrix(layer_tensor(i, "gate_up")), down=matrix(layer_tensor(i, "down")))

    layers = _list_of(layer(0))
    for i in range(1, cfg.num_layers):
        _append(layers, layer(i))
    embed = matrix("embed")
    scaling = cfg.rope_scaling
    short = inverse_frequencies(cfg.rotary_dim, cfg.rope_theta, scaling.short_factor if scaling else None)
    long = inverse_frequencies(cfg.rotary_dim, cfg.rope_theta, scaling.long_factor) if scaling else short
    rope = Rope(short=short, long=long, attention_factor=np.float32(scaling.attention_factor if scaling else 1.0),
                rotary_dim=cfg.rotary_dim)
    return Transformer(isa=isa, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                       eps=np.float32(cfg.rms_norm_eps), window=cfg.sliding_window or 0, rope=rope, embed=embed,
                       layers=layers, norm=vector("norm"),
                       output=embed if cfg.tie_word_embeddings else matrix("output"))
