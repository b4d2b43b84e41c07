"""Phi-3, Phi-3.5, Phi-4 and Phi-4-mini GGUFs as llama.cpp writes them (issue #14), end to end.

The files come from llama.cpp's own converter and quantizer (tests/gguf_fixtures.py, built once
and cached: about four minutes on 2 cores the first time). Every expectation is an outside reference:
  - f32 GGUFs: edgephi's logits equal transformers' on the source Hugging Face checkpoint;
  - K-quant mixes and BF16: edgephi's logits equal transformers' running the GGUF's own tensors as
    gguf.quants.dequantize reads them, to well within the quantization error itself;
  - the import keeps every tensor bit for bit: edgephi's dequantized planes equal gguf.quants';
  - malformed files are refused by the CLI in one line naming the file and the culprit.
The reference results are cached with the fixtures, so these tests import neither torch nor
transformers once the cache is warm.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

import edgephi
from edgephi.convert import convert
from tests import gguf_fixtures as gf
from tests.fixtures import rel_err

pytestmark = pytest.mark.integration  # real vocabularies, llama.cpp-made files, the CLI in a subprocess

F32_FILES = [n for n, (_, how) in gf.GGUF_FILES.items() if how == "f32"]
QUANT_FILES = [n for n, (_, how) in gf.GGUF_FILES.items() if how != "f32"]
# Between them every native format: Q4_K, Q5_K, Q6_K, Q5_0, Q5_1, Q8_0, BF16 (see
# test_fixtures_hold_every_format), and a 200k-row tied Q6_K embedding.
LOSSLESS_FILES = ["phi3.5-q4_k_m", "phi3.5-q5_k_m", "phi3.5-bf16", "phi3.5-d384-q4_k_m", "phi3.5-d384-q5_k_m",
                  "phi4-mini-q4_k_m"]
FORMATS_FROM_LLAMA_CPP = {"Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1", "Q8_0", "BF16"}
FLOAT_TYPES = {"F32", "F16", "BF16"}

# llama.cpp's GGUF names -> edgephi's tensor names (edgephi/format.py's layout, written out here
# rather than read from edgephi so that a wrong table there cannot make this test agree with it).
_TOP = {"token_embd.weight": "embed", "output_norm.weight": "norm", "output.weight": "output"}
_BLOCK = {"attn_norm": "attn_norm", "attn_qkv": "qkv", "attn_output": "o", "ffn_norm": "ffn_norm",
          "ffn_up": "gate_up", "ffn_down": "down"}


def edgephi_name(gguf_name: str) -> str:
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    blk, layer, kind, _ = gguf_name.split(".")
    assert blk == "blk", gguf_name
    return f"layers.{layer}.{_BLOCK[kind]}"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> edgephi model folder converted from GGUF_FILES[name] keeping the file's own formats,
    converted once per module (a failed conversion fails every test that needs it)."""
    folders: dict[str, object] = {}
    failures: dict[str, str] = {}

    def get(name: str):
        if name in failures:
            pytest.fail(f"converting {name} failed (see its first test): {failures[name]}")
        if name not in folders:
            out = tmp_path_factory.mktemp(name) / "model"
            try:
                convert(gf.gguf_file(name), out, quant=None, embed_quant=None)
            except Exception as exc:
                failures[name] = f"{type(exc).__name__}: {exc}"
                raise
            folders[name] = out
        return folders[name]

    return get


def _load(folder):
    return edgephi.load(folder, kv_dtype="float32")


# ---------------------------------------------------------------------------------------------
# The fixtures themselves (no edgephi)


def test_fixtures_hold_every_format():
    """The K-quant mixes, as llama.cpp's quantizer made them, hold every format issue #14 names."""
    held = {t["type"] for name in QUANT_FILES for t in gf.gguf_tensor_digests(name).values()}
    assert FORMATS_FROM_LLAMA_CPP <= held, sorted(held)
    lossless = {t["type"] for name in LOSSLESS_FILES for t in gf.gguf_tensor_digests(name).values()}
    assert FORMATS_FROM_LLAMA_CPP <= lossless, sorted(lossless)


@pytest.mark.parametrize("family", sorted(gf.FAMILIES))
def test_reference_prompts_cross_longrope_switch(family):
    """transformers' logits of the first 40 tokens change once the prompt runs past the original
    context (LongRoPE switches every position to the long factors); without LongRoPE a causal
    model's prefix logits do not depend on what follows."""
    _, half, long = gf.hf_reference_logits(family)
    n = len(gf.prompts()[1])
    change = rel_err(half, long[:n])
    if gf.FAMILIES[family].long_context:
        assert len(gf.prompts()[2]) > gf.FAMILIES[family].long_context >= n
        assert change > 1e-2, change
    else:
        assert change < 1e-5, change


# ---------------------------------------------------------------------------------------------
# Logits


@pytest.mark.parametrize("name", F32_FILES)
def test_f32_gguf_logits_match_transformers(name, converted):
    """llama.cpp's f32 GGUF of each family, converted with formats kept and run with a float32 KV
    cache, gives transformers' logits on the source checkpoint (7, 40 and 80 tokens: the last past
    the original context of the LongRoPE families and Phi-3.5's 48-token window)."""
    model = _load(converted(name))
    errors = {len(ids): rel_err(model.logits(ids), ref)
              for ids, ref in zip(gf.prompts(), gf.hf_reference_logits(gf.family_of(name)))}
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.parametrize("name", QUANT_FILES)
def test_quantized_gguf_logits_match_transformers_on_its_own_tensors(name, converted):
    """A K-quant mix (or BF16) converted with formats kept gives the logits transformers computes
    from the same file's tensors dequantized by gguf.quants: off by at most 30% of what the
    quantization itself moves the logits (or 2e-3), per prompt."""
    model = _load(converted(name))
    report = {}
    for ids, ref, exact in zip(gf.prompts(), gf.gguf_reference_logits(name),
                               gf.hf_reference_logits(gf.family_of(name))):
        quantization = rel_err(ref, exact)
        assert quantization > 0, "the reference runs the float weights, not the GGUF's"
        report[len(ids)] = (rel_err(model.logits(ids), ref), max(0.3 * quantization, 2e-3))
    assert all(err <= bound for err, bound in report.values()), f"tokens: (error, bound) {report}"


# ---------------------------------------------------------------------------------------------
# The import is lossless


@pytest.mark.parametrize("name", LOSSLESS_FILES)
def test_quantized_gguf_import_is_lossless(name, converted):
    """Every tensor of the model folder, dequantized by edgephi's numpy path, is bit for bit what
    gguf.quants.dequantize reads from the GGUF, block formats in the GGUF's own format. phi3 GGUFs
    keep Hugging Face's row order (llama.cpp permutes Q/K rows for llama only), so no rows are
    reordered."""
    import gguf

    from edgephi.format import WEIGHTS_FILE, read_config
    from edgephi.quant import dequantize
    from edgephi.safetensors_io import SafetensorsFile
    from edgephi.weights import read_planes

    folder = converted(name)
    cfg = read_config(folder)
    st = SafetensorsFile(folder / WEIGHTS_FILE)
    expected = gf.gguf_tensor_digests(name)
    mapped = {edgephi_name(t): t for t in expected if not t.startswith("rope_factors_")}
    assert sorted(cfg.tensors) == sorted(mapped)

    wrong = {}
    for ours, theirs in mapped.items():
        ref = expected[theirs]
        fmt, planes = read_planes(st, cfg, ours)
        # block formats must be the file's own (re-quantizing is never bit for bit); float ones may
        # widen (BF16 is kept as f32, which holds every bfloat16 exactly)
        kept = fmt.is_float if ref["type"] in FLOAT_TYPES else fmt.ggml_type == gguf.GGMLQuantizationType[ref["type"]]
        if not kept:
            wrong[theirs] = f"stored as {fmt.name}, the GGUF holds {ref['type']}"
            continue
        values = dequantize(planes, fmt)
        if values.dtype != np.float32 or values.size != np.prod(ref["shape"]):
            wrong[theirs] = f"dequantized to {values.dtype} {list(values.shape)}, expected float32 {ref['shape']}"
            continue
        values = np.ascontiguousarray(values).reshape(ref["shape"])
        if hashlib.sha256(values.tobytes()).hexdigest() != ref["sha256"]:
            wrong[theirs] = (f"{ref['type']}: values differ from gguf.quants.dequantize's "
                             f"(ours start {values.reshape(-1)[:4].tolist()}, gguf's {ref['first'][:4]})")
    assert not wrong, wrong

    # LongRoPE factors become the config's: the same float32 values
    for which in ("short", "long"):
        ref = expected.get(f"rope_factors_{which}.weight")
        if ref is not None:
            ours = np.asarray(getattr(cfg.rope_scaling, f"{which}_factor"), dtype=np.float32)
            assert hashlib.sha256(ours.tobytes()).hexdigest() == ref["sha256"], which


# ---------------------------------------------------------------------------------------------
# Bad input, through the CLI


BAD_CASES = {
    "unknown-pre": [gf.UNKNOWN_PRE],  # a pre-tokenizer name no one knows
    "iq4_nl-tensor": ["output.weight"],  # llama.cpp's quantizer with --output-tensor-type iq4_nl
    "k-quant-rows-384": [gf.BAD_K_TENSOR],  # Q4_K with rows of 384 values: not whole 256-blocks
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_gguf_is_refused_in_one_line(case, tmp_path):
    src = gf.bad_gguf(case)
    dest = tmp_path / "dest"
    dest.mkdir()
    out = dest / "model"
    proc = subprocess.run([sys.executable, "-m", "edgephi.convert", str(src), str(out)], check=False,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    shown = f"exit {proc.returncode}\n--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    assert proc.returncode != 0, shown
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), shown
    for name in [str(src), *BAD_CASES[case]]:
        assert name in lines[0], f"{name} not named in: {lines[0]}"
    assert not out.exists() and os.listdir(dest) == [], "the refused conversion left files"
