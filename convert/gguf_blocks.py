"""GGUF's interleaved blocks <-> edgephi's planes (edgephi/quant.py), bit for bit.

The 32-value formats only split each block's fields apart. The K-quants (super-blocks of 256)
also rearrange: their 6-bit scales and minimums are unpacked to bytes, and their values are
regrouped into blocks of 32 in q4_0's nibble order with the high bits as per-block bit masks,
so that one block decoder in the kernels serves every format. No value changes.
"""

from __future__ import annotations

import numpy as np

from edgephi.quant import QuantFormat, block_values


def _fields(blocks: np.ndarray, widths: list[tuple[str, int]]) -> dict[str, np.ndarray]:
    """Split uint8 [n, block bytes] into named byte columns, in order."""
    out, at = {}, 0
    for name, width in widths:
        out[name] = np.ascontiguousarray(blocks[:, at:at + width])
        at += width
    return out


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """values uint8 [n, 32] (low 4 bits used) -> uint8 [n, 16] in q4_0's order."""
    q = q & np.uint8(15)
    return q[:, :16] | (q[:, 16:] << np.uint8(4))


def _pack_bit(q: np.ndarray, bit: int) -> np.ndarray:
    """values uint8 [n, 32] -> uint8 [n, 4]: bit `bit` of value j as bit j of a little-endian uint32."""
    return np.packbits((q >> np.uint8(bit)) & np.uint8(1), axis=-1, bitorder="little")


def _k_scales_unpack(scales: np.ndarray) -> np.ndarray:
    """q4_k/q5_k's 12 packed bytes per super-block -> 16 bytes: 8 six-bit scales, 8 six-bit minimums."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return np.concatenate([sc, mn], axis=1).astype(np.uint8)


def _k_scales_pack(unpacked: np.ndarray) -> np.ndarray:
    sc, mn = unpacked[:, :8].astype(np.uint8), unpacked[:, 8:].astype(np.uint8)
    d = (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6)
    m = (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6)
    md = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([d, m, md], axis=1).astype(np.uint8)


def _k_values(qs: np.ndarray) -> np.ndarray:
    """q4_k/q5_k's 128 bytes per super-block -> its 256 low-nibble values in order, as [n*8, 32]:
    each 32-byte chunk holds one block of 32 in its low nibbles and the next in its high ones."""
    chunks = qs.reshape(-1, 4, 1, 32)
    return ((chunks >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(15)).reshape(-1, 32)


def _q6_values(ql: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """q6_k's ql[128], qh[64] per super-block -> its 256 six-bit values (0..63) in order, [n*8, 32]."""
    n = ql.shape[0]
    out = np.empty((n, 2, 4, 32), np.uint8)
    for half in range(2):
        lo, hi = ql[:, 64 * half:64 * half + 64], qh[:, 32 * half:32 * half + 32]
        out[:, half, 0] = (lo[:, :32] & 15) | (((hi >> 0) & 3) << 4)
        out[:, half, 1] = (lo[:, 32:] & 15) | (((hi >> 2) & 3) << 4)
        out[:, half, 2] = (lo[:, :32] >> 4) | (((hi >> 4) & 3) << 4)
        out[:, half, 3] = (lo[:, 32:] >> 4) | (((hi >> 6) & 3) << 4)
    return out.reshape(-1, 32)


def _q6_pack(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of _q6_values: values [n*8, 32] -> ql [n, 128], qh [n, 64]."""
    v = q.reshape(-1, 2, 4, 32)
    ql = np.empty((v.shape[0], 2, 64), np.uint8)
    qh = np.empty((v.shape[0], 2, 32), np.uint8)
    ql[:, :, :32] = (v[:, :, 0] & 15) | ((v[:, :, 2] & 15) << 4)
    ql[:, :, 32:] = (v[:, :, 1] & 15) | ((v[:, :, 3] & 15) << 4)
    qh[:] = sum(((v[:, :, i] >> 4) & 3) << (2 * i) for i in range(4)).astype(np.uint8)
    return ql.reshape(-1, 128), qh.reshape(-1, 64)


def planes_from_gguf_blocks(raw: np.ndarray, fmt: QuantFormat, rows: int) -> dict[str, np.ndarray]:
    """GGUF block bytes (uint8, rows x whole blocks) -> planes, bit for bit."""
    blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, fmt.gguf_block_bytes)
    name = fmt.name
    if name in ("q4_0", "q4_1", "q8_0", "q5_0", "q5_1"):
        widths = [("d", 2)] + [("m", 2)] * (name in ("q4_1", "q5_1")) + [("qh", 4)] * name.startswith("q5")
        f = _fields(blocks, widths + [("qs", 32 if name == "q8_0" else 16)])
        planes = {"qs": f["qs"], "d": f["d"].view(np.float16)}
        if "m" in f:
            planes["m"] = f["m"].view(np.float16)
        if "qh" in f:
            planes["qh"] = f["qh"]
        if name == "q8_0":
            planes["qs"] = planes["qs"].view(np.int8)
    elif name in ("q4_k", "q5_k"):
        widths = [("d", 2), ("m", 2), ("scales", 12)] + [("qh", 32)] * (name == "q5_k") + [("qs", 128)]
        f = _fields(blocks, widths)
        q = _k_values(f["qs"])
        planes = {"qs": _pack_nibbles(q), "d": f["d"].view(np.float16), "m": f["m"].view(np.float16),
                  "sc": _k_scales_unpack(f["scales"])}
        if name == "q5_k":
            high = ((f["qh"].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1)
            planes["qh"] = _pack_bit(high.reshape(-1, 32), 0)
    elif name == "q6_k":
        f = _fields(blocks, [("ql", 128), ("qh", 64), ("sc", 16), ("d", 2)])
        q = _q6_values(f["ql"], f["qh"])
        planes = {"qs": _pack_nibbles(q), "qh": np.concatenate([_pack_bit(q, 4), _pack_bit(q, 5)], axis=1),
                  "d": f["d"].view(np.float16), "sc": f["sc"].view(np.int8)}
    else:
        raise ValueError(f"no GGUF block layout for {name!r}")
    planes = {p: np.ascontiguousarray(a).reshape(rows, -1) for p, a in planes.items()}
    return {plane: planes[plane] for plane, _, _ in fmt.planes}


def planes_to_gguf_blocks(planes: dict[str, np.ndarray], fmt: QuantFormat) -> np.ndarray:
    """planes -> GGUF block bytes uint8 [N, row bytes] (for export and tests)."""
    rows = planes["qs"].shape[0]
    name = fmt.name

    def column(plane, width):
        return np.ascontiguousarray(planes[plane]).view(np.uint8).reshape(-1, width)

    if name in ("q4_0", "q4_1", "q8_0", "q5_0", "q5_1"):
        parts = [column("d", 2)]
        if "m" in planes:
            parts.append(column("m", 2))
        if "qh" in planes:
            parts.append(column("qh", 4))
        parts.append(column("qs", 32 if name == "q8_0" else 16))
    else:
        q = block_values(planes, fmt).reshape(-1, 8, 32)  # values per super-block
        if name == "q6_k":
            ql, qh = _q6_pack(q.reshape(-1, 32))
            parts = [ql, qh, column("sc", 16), column("d", 2)]
        else:
            low = q & np.uint8(15)
            qs = (low[:, 0::2] | (low[:, 1::2] << np.uint8(4))).reshape(-1, 128)
            parts = [column("d", 2), column("m", 2), _k_scales_pack(column("sc", 16))]
            if name == "q5_k":
                bits = (q >> np.uint8(4)) & np.uint8(1)
                parts.append(sum(bits[:, s].astype(np.uint8) << np.uint8(s) for s in range(8)).astype(np.uint8))
            parts.append(qs)
    return np.concatenate(parts, axis=1).reshape(rows, -1)

