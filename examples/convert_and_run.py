"""Convert a checkpoint (Hugging Face folder or GGUF file) and run a prompt on the result.

    python examples/convert_and_run.py SRC OUT_FOLDER "PROMPT" [--quant q4_0]
"""

import argparse

import edgephi
from edgephi.convert import convert

ap = argparse.ArgumentParser()
ap.add_argument("src")
ap.add_argument("out")
ap.add_argument("prompt")
ap.add_argument("--quant", default=None, help="q4_0, q4_1, q8_0, f16, f32 (default: q4_0, a GGUF keeps its own)")
args = ap.parse_args()

report = convert(args.src, args.out, quant=args.quant, force=True)
print(f"converted {report.parameters / 1e6:.1f}M parameters into {report.bytes_on_disk / 1e6:.1f} MB")
model = edgephi.load(args.out)
print(model.generate(args.prompt, max_new_tokens=32))
