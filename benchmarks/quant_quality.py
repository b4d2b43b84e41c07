"""How close each 4-bit file comes to the float model: edgephi's round-to-nearest and calibrated q4_0/q4_1
against llama.cpp's Q4_0/Q4_1 without and with an importance matrix, all made from the same float32
GGUF, scored on the same tokens by `edgephi perplexity`'s method.

    python benchmarks/quant_quality.py [GGUF] [--ctx 512] [--chunks 16] [--calibrate-chunks 64] [--out DIR]

GGUF defaults to the default model (SmolLM2-135M-Instruct, Q4_1 with Q8_0 embeddings). llama.cpp's
quantizer (llama-cpp-python) first writes its weights as F32; every other file comes from that one.
Calibration reads Sense and Sensibility + Mansfield Park, evaluation Pride and Prejudice
(tests/texts.py). edgephi's calibration pass also writes llama.cpp's importance-matrix file, which
is read back and handed to llama.cpp's quantizer as llama-quantize --imatrix would. Token
embeddings are Q8_0 in every file. The reference is the float32 model on edgephi (float32 KV),
whose perplexity matches transformers' (tests/test_perplexity.py). Needs llama-cpp-python.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA_FTYPES = {"F32": 0, "Q4_0": 2, "Q4_1": 3}
GGML_Q8_0 = 8


def llama_quantize(src: Path, out: Path, ftype: str, imatrix: dict[str, np.ndarray] | None = None) -> float:
    """llama.cpp's quantizer, as llama-quantize [--imatrix] runs it; returns seconds."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[ftype]
    params.allow_requantize = True
    params.nthread = 2
    if ftype != "F32":
        params.token_embedding_type = GGML_Q8_0
        params.output_tensor_type = GGML_Q8_0
    keep = []
    if imatrix is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            data = np.ascontiguousarray(values, np.float32)
            keep += [data, name.encode()]
            entries[i].name = keep[-1]
            entries[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = len(data)
        params.imatrix = entries  # the last entry's name stays NULL: the end of the list
    started = time.perf_counter()
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} to {ftype}")
    return time.perf_counter() - started


def gguf_bits_per_weight(path: Path) -> float:
    """Bits per weight of the transformer blocks' matrices (blk.*, 2-D) in a GGUF."""
    from edgephi.convert.gguf_reader import GGUFFile

    f = GGUFFile(path)
    ts = [t for t in f.tensors.values() if t.name.startswith("blk.") and len(t.shape) == 2]
    return 8 * sum(t.nbytes for t in ts) / sum(int(np.prod(t.shape)) for t in ts)


def edgephi_bits_per_weight(folder: Path) -> float:
    from edgephi.quant import FORMATS

    cfg = json.loads((folder / "config.json").read_text())
    ts = [t for name, t in cfg["tensors"].items() if name.startswith("layers.") and len(t["shape"]) == 2]
    bits = {f.name: f.bits if f.is_float else f.gguf_block_bytes * 8 / f.row_multiple for f in FORMATS.values()}
    return sum(bits[t["format"]] * t["shape"][0] * t["shape"][1] for t in ts) / sum(
        t["shape"][0] * t["shape"][1] for t in ts)


class LlamaCppLogits:
    """A GGUF on llama.cpp, every position's logits of a chunk evaluated in a fresh context."""

    def __init__(self, path: Path, ctx: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, n_threads=2,
                                   n_threads_batch=2, verbose=False)

    def __call__(self, chunk: np.ndarray, first: int, count: int) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(chunk.tolist())
        return np.asarray(self.llm.scores[first:first + count], np.float32)


class EdgephiLogits:
    def __init__(self, folder: Path, ctx: int, kv_dtype: str = "float16"):
        import edgephi

        self.model = edgephi.load(folder, context=ctx, kv_dtype=kv_dtype)
        self.sequence = self.model.sequence(context=ctx)

    def __call__(self, chunk: np.ndarray, first: int, count: int) -> np.ndarray:
        self.sequence.reset()
        self.sequence.feed(chunk[:first])
        return self.sequence.feed(chunk[first:], all_logits=True)[:count]


def kl_scores(base, runners: dict, text_file: Path, ctx: int, chunks: int):
    """{name: TokenScores} of every runner against the base model on `chunks` chunks of a text."""
    from edgephi.perplexity import TokenScores, text_chunks

    first, count = ctx // 2, ctx - 1 - ctx // 2
    tokens, _ = text_chunks(base.model, text_file.read_text(encoding="utf-8"), ctx, chunks, str(text_file))
    scores = {name: TokenScores(len(tokens) * count, True) for name in runners}
    for i, chunk in enumerate(tokens):
        base_logits = base(chunk, first, count)
        for name, run in runners.items():
            scores[name].add(i * count, run(chunk, first, count), chunk[first + 1:], base_logits)
        print(f"{text_file.name}: chunk {i + 1}/{len(tokens)}", file=sys.stderr)
    return scores, tokens


def main() -> None:
    from edgephi.convert import convert
    from edgephi.convert.imatrix import read_imatrix
    from tests import fixtures, texts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", nargs="?", type=Path)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--calibrate-chunks", type=int, default=64)
    ap.add_argument("--ood-chunks", type=int, default=8, help="chunks of CPython's pydoc topics (out of domain)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/edgephi-quant-quality"))
    args = ap.parse_args()
    source = args.gguf or fixtures.smollm2_gguf()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    calibration, evaluation = texts.calibration_text(), texts.evaluation_text()

    f32 = out / "f32.gguf"
    if not f32.exists():
        llama_quantize(source, f32, "F32")
    models: dict[str, tuple[str, Path]] = {}
    seconds: dict[str, float] = {}
    imatrix_file = out / "edgephi.imatrix"
    for name, quant, calibrate in (("edgephi q4_0", "q4_0", False), ("edgephi q4_1", "q4_1", False),
                                   ("edgephi q4_0 calibrated", "q4_0", True),
                                   ("edgephi q4_1 calibrated", "q4_1", True), ("float32", "f32", False)):
        folder = out / name.replace(" ", "-")
        started = time.perf_counter()
        convert(f32, folder, quant=quant, embed_quant="f32" if quant == "f32" else "q8_0", force=True,
                calibrate=calibration if calibrate else None, calibrate_chunks=args.calibrate_chunks,
                save_imatrix=imatrix_file if calibrate and quant == "q4_0" else None)
        seconds[name] = time.perf_counter() - started
        models[name] = ("edgephi", folder)
    imatrix = read_imatrix(imatrix_file)
    for ftype in ("Q4_0", "Q4_1"):
        for with_imatrix in (False, True):
            name = f"llama.cpp {ftype}" + (" imatrix" if with_imatrix else "")
            path = out / (name.replace(" ", "-").replace(".", "") + ".gguf")
            seconds[name] = llama_quantize(f32, path, ftype, imatrix if with_imatrix else None)
            models[name] = ("llama.cpp", path)

    ctx = args.ctx
    base = EdgephiLogits(models.pop("float32")[1], ctx, "float32")
    runners = {name: (EdgephiLogits(path, ctx) if kind == "edgephi" else LlamaCppLogits(path, ctx))
               for name, (kind, path) in models.items()}
    scores, chunks = kl_scores(base, runners, evaluation, ctx, args.chunks)
    ood, ood_chunks = kl_scores(base, runners, texts.pydoc_topics(), ctx, args.ood_chunks)
    rows = []
    for name, (kind, path) in models.items():
        r = scores[name].report(ctx, len(chunks), 0)
        size = (path / "weights.safetensors").stat().st_size if kind == "edgephi" else path.stat().st_size
        bpw = edgephi_bits_per_weight(path) if kind == "edgephi" else gguf_bits_per_weight(path)
        o = ood[name].report(ctx, len(ood_chunks), 0).kl
        rows.append(dict(model=name, bpw=bpw, ppl=r.ppl, base_ppl=r.kl.base_ppl, kl=r.kl.kl_mean, kl_err=r.kl.kl_err,
                         kl_p99=r.kl.kl_p99, same_top1=r.kl.same_top1, rms_dp=r.kl.rms_dp, mb=size / 1e6,
                         seconds=seconds[name], ood_kl=o.kl_mean, ood_kl_err=o.kl_err))
    print(f"{len(chunks)} chunks of {ctx} tokens of {evaluation.name}, {len(chunks) * (ctx - 1 - ctx // 2)} scored; "
          f"float32 PPL {rows[0]['base_ppl']:.3f}")
    print(f"out of domain: {len(ood_chunks)} chunks of CPython's pydoc topics")
    print("| file | bits/weight (blocks) | PPL | mean KL | KL 99% | same top-1 | RMS Δp | KL, pydoc | MB | make (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['bpw']:.2f} | {r['ppl']:.3f} | {r['kl']:.4f} ± {r['kl_err']:.4f} | "
              f"{r['kl_p99']:.3f} | {100 * r['same_top1']:.1f}% | {100 * r['rms_dp']:.2f}% | "
              f"{r['ood_kl']:.4f} ± {r['ood_kl_err']:.4f} | {r['mb']:.1f} | "
              f"{r['seconds']:.1f} |")
    kl = {r["model"]: r["kl"] for r in rows}
    for fmt in ("Q4_0", "Q4_1"):
        ours = kl[f"edgephi {fmt.lower()} calibrated"]
        print(f"{fmt}: calibrated / llama.cpp = {ours / kl[f'llama.cpp {fmt}']:.3f}x, "
              f"/ llama.cpp with the same imatrix = {ours / kl[f'llama.cpp {fmt} imatrix']:.3f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
