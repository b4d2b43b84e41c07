"""Rotary position embedding frequencies, shared by the numba forward pass and the ONNX exporter."""

from __future__ import annotations

import numpy as np


def inverse_frequencies(rotary_dim: int, theta: float, factors=None) -> np.ndarray:
    """Inverse frequencies (R/2,) in float32, computed as transformers does; LongRoPE's factors
    (R/2,) divide each frequency's wavelength base."""
    exponent = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    base = np.float32(theta) ** exponent
    if factors is not None:
        base = np.asarray(factors, dtype=np.float32) * base
    return (np.float32(1.0) / base).astype(np.float32)
