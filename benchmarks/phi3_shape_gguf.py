"""Turn a llama-architecture GGUF (such as ../shared/tools/make_big_gguf.py writes) into the phi3
architecture that Phi-3/Phi-4 GGUFs use, then optionally quantize it with llama.cpp's quantizer.

phi3 GGUFs keep Hugging Face's fused matrices: attn_qkv (q, k, v rows stacked) and ffn_up (gate
rows, then up). So a K-quant mix gives the fused matrix one type, as in the Phi files people
download, where a llama file would mix Q4_K and Q6_K inside q/k/v. Rows are copied as raw block
bytes (blocks never cross rows), so no value changes. Random weights make the Q/K row order of
the two architectures irrelevant for speed.

Usage: python benchmarks/phi3_shape_gguf.py IN.gguf OUT.gguf [--quantize Q4_K_M]
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter


def copy_metadata(reader: GGUFReader, writer: GGUFWriter) -> None:
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        name = re.sub(r"^llama\.", "phi3.", f.name)
        kind = f.types[0]
        if kind == GGUFValueType.ARRAY:
            sub = f.types[1]
            values = [bytes(f.parts[i]) for i in f.data] if sub == GGUFValueType.STRING else \
                [f.parts[i].tolist()[0] for i in f.data]
            writer.add_key_value(name, values, kind, sub_type=sub)
        elif kind == GGUFValueType.STRING:
            writer.add_key_value(name, bytes(f.parts[f.data[0]]), kind)
        else:
            writer.add_key_value(name, f.parts[f.data[0]].tolist()[0], kind)
    context = reader.fields["llama.context_length"].parts[-1].tolist()[0]
    writer.add_uint32("phi3.rope.scaling.original_context_length", context)
    writer.add_uint32("phi3.attention.sliding_window", 0)  # none, as llama.cpp writes for Phi-4


def fused_plan(reader: GGUFReader) -> list[tuple[str, list]]:
    """(output tensor name, source tensors whose rows it stacks), in the file's order."""
    tensors = {t.name: t for t in reader.tensors}
    plan = []
    for t in reader.tensors:
        m = re.match(r"blk\.(\d+)\.(attn_q|ffn_gate|attn_k|attn_v|ffn_up)\.weight$", t.name)
        if m is None:
            plan.append((t.name, [t]))
        elif m.group(2) == "attn_q":
            i = m.group(1)
            plan.append((f"blk.{i}.attn_qkv.weight", [tensors[f"blk.{i}.attn_{p}.weight"] for p in "qkv"]))
        elif m.group(2) == "ffn_gate":
            i = m.group(1)
            plan.append((f"blk.{i}.ffn_up.weight", [tensors[f"blk.{i}.ffn_{p}.weight"] for p in ("gate", "up")]))
    return plan


def convert(src: str, out: str) -> None:
    reader = GGUFReader(src)
    writer = GGUFWriter(out, "phi3")
    copy_metadata(reader, writer)
    plan = fused_plan(reader)
    for name, parts in plan:
        types = {p.tensor_type for p in parts}
        assert len(types) == 1, (name, types)
        cols = int(parts[0].shape[0])  # ggml order: the row length first
        rows = sum(int(np.prod(p.shape[1:])) for p in parts)
        nbytes = sum(int(p.n_bytes) for p in parts)
        shape = (rows, cols) if len(parts[0].shape) > 1 else (cols,)
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=parts[0].tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, parts in plan:
        data = np.concatenate([np.asarray(p.data).reshape(-1).view(np.uint8) for p in parts])
        writer.write_tensor_data(data)
    writer.close()


def quantize(src: str, out: str, ftype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True  # the source is Q8_0: llama.cpp dequantizes it first
    params.nthread = 2
    if llama_cpp.llama_model_quantize(src.encode(), out.encode(), params) != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} to {ftype}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--quantize", metavar="FTYPE", help="then quantize OUT in place of itself, e.g. Q4_K_M")
    args = ap.parse_args()
    started = time.perf_counter()
    target = args.out + ".phi3.tmp" if args.quantize else args.out
    convert(args.src, target)
    print(f"[{time.perf_counter() - started:.0f} s] wrote {target}", file=sys.stderr)
    if args.quantize:
        quantize(target, args.out, args.quantize)
        import os
        os.remove(target)
        print(f"[{time.perf_counter() - started:.0f} s] quantized to {args.quantize}: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
