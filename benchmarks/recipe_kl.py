"""Mixed recipes by KL per byte: which tensors are worth more bits than q4_0.

    python benchmarks/recipe_kl.py [--out DIR] [--chunks 16]

Run after benchmarks/quant_quality.py (same --out): it reuses that run's F32 GGUF of the default model
and its importance matrix. Every candidate is calibrated q4_0 (by that importance) with some tensors
at q8_0 (or the embedding at q4_0), scored against the float32 model on the same Pride and Prejudice
chunks. Prints each recipe's weight bytes, mean KL and, against all-q4_0, the KL saved per extra MB.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quant_quality import EdgephiLogits, kl_scores  # noqa: E402

CANDIDATES = {
    "all q4_0 (embed q8_0)": "embed=q8_0,*=q4_0",
    "first and last down q8_0": "embed=q8_0,layers.0.down=q8_0,layers.-1.down=q8_0,*=q4_0",
    "first two and last two down q8_0": "embed=q8_0,layers.0.down=q8_0,layers.1.down=q8_0,layers.-2.down=q8_0,"
                                        "layers.-1.down=q8_0,*=q4_0",
    "every down q8_0": "embed=q8_0,layers.*.down=q8_0,*=q4_0",
    "every qkv q8_0": "embed=q8_0,layers.*.qkv=q8_0,*=q4_0",
    "every o q8_0": "embed=q8_0,layers.*.o=q8_0,*=q4_0",
    "first and last layer q8_0": "embed=q8_0,layers.0.*=q8_0,layers.-1.*=q8_0,*=q4_0",
    "embed q4_0": "embed=q4_0,*=q4_0",
}


def main() -> None:
    from edgephi.convert import convert
    from tests import texts

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/edgephi-quant-quality"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=16)
    args = ap.parse_args()
    f32, imatrix = args.out / "f32.gguf", args.out / "edgephi.imatrix"
    if not f32.exists() or not imatrix.exists():
        raise SystemExit(f"run benchmarks/quant_quality.py --out {args.out} first")
    folders = {}
    for name, recipe in CANDIDATES.items():
        folders[name] = args.out / ("recipe-" + name.replace(" ", "-").replace("(", "").replace(")", ""))
        convert(f32, folders[name], quant="q4_0", embed_quant="q8_0", recipe=recipe, imatrix=imatrix, force=True)
    base_folder = args.out / "float32"
    if not base_folder.exists():
        convert(f32, base_folder, quant="f32", embed_quant="f32")
    ctx = args.ctx
    base = EdgephiLogits(base_folder, ctx, "float32")
    runners = {name: EdgephiLogits(folder, ctx) for name, folder in folders.items()}
    scores, chunks = kl_scores(base, runners, texts.evaluation_text(), ctx, args.chunks)
    rows = {name: (s.report(ctx, len(chunks), 0).kl, (folders[name] / "weights.safetensors").stat().st_size / 1e6)
            for name, s in scores.items()}
    kl0, mb0 = rows["all q4_0 (embed q8_0)"][0].kl_mean, rows["all q4_0 (embed q8_0)"][1]
    print(f"{len(chunks)} chunks of {ctx} tokens; calibrated q4_0 by {imatrix}")
    print("| recipe | MB | mean KL | KL 99% | same top-1 | KL saved per extra MB |")
    print("|---|---|---|---|---|---|")
    for name, (kl, mb) in rows.items():
        per_mb = f"{(kl0 - kl.kl_mean) / (mb - mb0):.4f}" if abs(mb - mb0) > 1e-3 else ""
        print(f"| {name} | {mb:.1f} | {kl.kl_mean:.4f} ± {kl.kl_err:.4f} | {kl.kl_p99:.3f} | "
              f"{100 * kl.same_top1:.1f}% | {per_mb} |")


if __name__ == "__main__":
    main()
