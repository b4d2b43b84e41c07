"""Peak memory and time of `edgephi convert` on a large synthetic checkpoint with real Phi shapes.

    python benchmarks/convert_memory.py --shape phi4-mini --workdir /tmp/bench  [--quant q4_0]

Writes a random bf16 Hugging Face checkpoint (sharded, Hub-style config.json, the Phi-4-mini or
Phi-4 tokenizer built from tiktoken's vocabulary by tests/fixtures.py), converts it in a child
process and prints parameters, bytes, seconds and the child's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgephi.convert.safetensors_writer import SafetensorsWriter  # noqa: E402
from tests import fixtures  # noqa: E402

SHAPES = {  # Hub config.json values (see ../shared/docs/phi-architecture.md)
    "phi4-mini": dict(hidden_size=3072, num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8,
                      intermediate_size=8192, vocab_size=200064, tie_word_embeddings=True,
                      partial_rotary_factor=0.75, max_position_embeddings=131072,
                      original_max_position_embeddings=4096, sliding_window=262144, tokenizer="phi4_mini"),
    "phi4": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=10,
                 intermediate_size=17920, vocab_size=100352, tie_word_embeddings=False,
                 max_position_embeddings=16384, original_max_position_embeddings=16384, tokenizer="phi4"),
}
SHARD_BYTES = 4 << 30


def checkpoint_tensors(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    D, F, Dh = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    qkv = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * Dh
    out = [("model.embed_tokens.weight", (c["vocab_size"], D))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (D,)), (p + "self_attn.qkv_proj.weight", (qkv, D)),
                (p + "self_attn.o_proj.weight", (D, D)), (p + "post_attention_layernorm.weight", (D,)),
                (p + "mlp.gate_up_proj.weight", (2 * F, D)), (p + "mlp.down_proj.weight", (D, F))]
    out.append(("model.norm.weight", (D,)))
    if not c["tie_word_embeddings"]:
        out.append(("lm_head.weight", (c["vocab_size"], D)))
    return out


def random_bf16(shape, rng, scale=0.02) -> np.ndarray:
    x = (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale))
    return (x.view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def write_checkpoint(folder: Path, shape: str) -> None:
    c = dict(SHAPES[shape])
    tokenizer = c.pop("tokenizer")
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tensors = checkpoint_tensors(c)
    shards, current, size = [], [], 0
    for name, shp in tensors:
        nbytes = int(np.prod(shp)) * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shp))
        size += nbytes
    shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = SafetensorsWriter(folder / fname, [(n, "BF16", s) for n, s in shard], {"format": "pt"})
        for name, shp in shard:
            rows = shp[0] if len(shp) == 2 else 1
            step = max(1, (16 << 20) // (shp[-1]))
            for start in range(0, rows, step):
                n = min(step, rows - start)
                block = random_bf16((n, shp[-1]) if len(shp) == 2 else shp, rng)
                writer.write(name, block, start)
            weight_map[name] = fname
        writer.close()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    rotary = int(c["hidden_size"] // c["num_attention_heads"] * c.get("partial_rotary_factor", 1.0))
    config = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "torch_dtype": "bfloat16", "hidden_act": "silu", **c}
    if c["max_position_embeddings"] != c["original_max_position_embeddings"]:
        config["rope_scaling"] = {"type": "longrope", "short_factor": [1.0] * (rotary // 2),
                                  "long_factor": [1.0 + i / 8 for i in range(rotary // 2)]}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    if tokenizer == "phi4":
        fixtures.write_phi4_tokenizer(folder)
    else:
        fixtures.write_phi4_mini_tokenizer(folder)


# `python -m edgephi.convert ...` that writes its own peak RSS (MiB) to argv[1] at exit. Not
# getrusage(RUSAGE_CHILDREN): Linux carries the parent's peak (here: writing the checkpoint) into
# a child across exec, so the child's ru_maxrss can be this script's (edgephi/rss.py).
CONVERT_REPORTING_PEAK = """
import runpy, sys
from edgephi.rss import peak_rss_mib
peak_file = sys.argv.pop(1)
try:
    runpy.run_module("edgephi.convert", run_name="__main__", alter_sys=True)
finally:
    with open(peak_file, "w") as f:
        f.write(str(peak_rss_mib()))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="phi4-mini")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/edgephi-convert-bench"))
    ap.add_argument("--quant", default="q4_0")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and output")
    args = ap.parse_args()
    src, out = args.workdir / f"{args.shape}-hf", args.workdir / f"{args.shape}-{args.quant}"
    if not src.exists():
        t = time.perf_counter()
        write_checkpoint(src, args.shape)
        print(f"wrote synthetic checkpoint {src} in {time.perf_counter() - t:.0f} s", flush=True)
    src_bytes = sum(p.stat().st_size for p in src.iterdir())
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        subprocess.run([sys.executable, "-c", CONVERT_REPORTING_PEAK, str(peak_file), str(src), str(out),
                        "--quant", args.quant, "--force"], check=True, cwd=ROOT)
        seconds = time.perf_counter() - t
        peak_bytes = float(peak_file.read_text()) * 2**20
    out_bytes = sum(p.stat().st_size for p in out.iterdir())
    print(f"\n{args.shape} bf16 -> {args.quant}: checkpoint {src_bytes / 1e9:.2f} GB, output {out_bytes / 1e9:.2f} GB, "
          f"{seconds:.0f} s, peak RSS {peak_bytes / 2**20:.0f} MiB ({peak_bytes / src_bytes:.1%} of the checkpoint)")
    if not args.keep:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
