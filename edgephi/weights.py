"""Model weights, memory-mapped from weights.safetensors and arranged as kernel arguments."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numba import njit, typed

from . import jit_cache  # noqa: F401  (numba's cache folder)

from .errors import ModelFormatError
from .format import WEIGHTS_FILE, ModelConfig, expected_shape
from .quant import FORMATS, QuantFormat, check_finite, plane_key, plane_layout
from .safetensors_io import SafetensorsFile


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)  # a plain ndarray view of the map: numba does not take np.memmap
    a.setflags(write=False)  # every weight array has one numba type, mapped or not
    return a


EMPTY_U8 = _readonly(np.zeros((0, 0), np.uint8))
EMPTY_U16 = _readonly(np.zeros((0, 0), np.uint16))
EMPTY_F32 = _readonly(np.zeros((0, 0), np.float32))


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


@dataclass
class Weights:
    embed: tuple  # linear-weight tuples, see kernels.py
    output: tuple
    norm: np.ndarray  # (D,)
    attn_norms: typed.List  # L x (D,)
    ffn_norms: typed.List
    qkv: typed.List  # L x linear-weight tuple
    o: typed.List
    gate_up: typed.List
    down: typed.List


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


def load_weights(folder: Path, cfg: ModelConfig) -> Weights:
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

    def matrix(name):
        fmt, planes = checked_planes(name)
        if fmt.name == "f32":
            return (fmt.ggml_type, EMPTY_U8, EMPTY_U16, EMPTY_U16, _readonly(planes[""]))
        if fmt.name == "f16":
            return (fmt.ggml_type, EMPTY_U8, _readonly(planes[""].view(np.uint16)), EMPTY_U16, EMPTY_F32)
        m = _readonly(planes["m"].view(np.uint16)) if fmt.name == "q4_1" else EMPTY_U16
        return (fmt.ggml_type, _readonly(planes["qs"].view(np.uint8)), _readonly(planes["d"].view(np.uint16)), m,
                EMPTY_F32)

    def vector(name):
        fmt, planes = checked_planes(name)
        if fmt.name != "f32":
            raise ModelFormatError(f"{path}: tensor {name!r} is {fmt.name}, not f32")
        return _readonly(planes[""])

    def per_layer(kind, load):
        items = _list_of(load(f"layers.0.{kind}"))
        for i in range(1, cfg.num_layers):
            _append(items, load(f"layers.{i}.{kind}"))
        return items

    embed = matrix("embed")
    return Weights(
        embed=embed, output=embed if cfg.tie_word_embeddings else matrix("output"), norm=vector("norm"),
        attn_norms=per_layer("attn_norm", vector), ffn_norms=per_layer("ffn_norm", vector),
        qkv=per_layer("qkv", matrix), o=per_layer("o", matrix), gate_up=per_layer("gate_up", matrix),
        down=per_layer("down", matrix),
    )
