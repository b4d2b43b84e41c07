"""edgephi model folder -> ONNX decoder in onnxruntime-genai's layout (inputs input_ids, attention_mask,
position_ids, past_key_values.{i}.key/.value; outputs logits, present.{i}.key/.value).

Quantized linears become com.microsoft::MatMulNBits with the edgephi blocks repacked bit for bit:
q4_0 -> bits 4 with the default zero point 8; q4_1 -> bits 4 with zero points 0 plus the blocks'
minimums as a separate product with the input's block sums (MatMulNBits' zero point would have to be
-m/d, which float32 cannot always hold exactly); q8_0 -> bits 8 with the default zero point 128.
Float weights become plain MatMul. Attention, RoPE (partial rotary, LongRoPE) and RMSNorm are plain
ONNX operators, so any onnxruntime build runs the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgephi.errors import EdgephiError, ModelFormatError
from edgephi.format import WEIGHTS_FILE, ModelConfig, expected_shape, layer_tensor, read_config, read_generation
from edgephi.onnx_backend import EDGEPHI_SUBFOLDER, MODEL_FILE
from edgephi.quant import BLOCK, FORMATS, dequantize, unpack_nibbles
from edgephi.rope import inverse_frequencies
from edgephi.safetensors_io import SafetensorsFile
from edgephi.weights import read_planes

from .onnx_graph import FLOAT, INT64, MS_DOMAIN, Graph

DATA_FILE = "model.onnx.data"
NEG_LARGE = np.float32(np.finfo(np.float32).min)  # masked scores: exp() gives exactly 0


@dataclass
class ModelTensors:
    """Raw planes of an edgephi model, read from its mapped weights file."""
    folder: Path
    cfg: ModelConfig
    st: SafetensorsFile

    def planes(self, name: str) -> tuple[str, dict[str, np.ndarray]]:
        fmt, planes = read_planes(self.st, self.cfg, name)
        return fmt.name, planes

    def vector(self, name: str) -> np.ndarray:
        return np.asarray(self.planes(name)[1][""], dtype=np.float32)


def open_model(folder: Path) -> ModelTensors:
    cfg = read_config(folder)
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise ModelFormatError(f"{path}: missing")
    return ModelTensors(Path(folder), cfg, SafetensorsFile(path))


# ---------------------------------------------------------------------------------------------
# weights


# formats written as MatMulNBits; the others (GGUF's 5-bit and K-quant imports) go out as exact
# float32 MatMuls, which the export report lists
MATMULNBITS_FORMATS = ("q4_0", "q4_1", "q8_0")


def matmulnbits_q4(qs: np.ndarray) -> np.ndarray:
    """ggml nibbles (byte j of a block: element j low, element j + 16 high) -> MatMulNBits' order
    (byte i: element 2i low, element 2i + 1 high); [N, K/2] -> [N, K/32, 16]."""
    values = unpack_nibbles(qs.reshape(qs.shape[0], -1, 16))  # [N, nb, 32] in order
    return (values[:, :, 0::2] | (values[:, :, 1::2] << np.uint8(4))).astype(np.uint8)


def _float_matrix(fmt: str, planes: dict) -> np.ndarray:
    return dequantize(planes, FORMATS[fmt]).astype(np.float32)


def linear(g: Graph, x: str, name: str, fmt: str, planes: dict, in_features: int, out_features: int,
           int8_compute: bool = True) -> str:
    """x [..., K] @ W.T with W stored as `fmt` planes; exact in the weights. int8_compute: 8-bit
    weights multiply int8-quantized activations (MatMulNBits accuracy_level 4): onnxruntime 1.32
    has no fast float path for them and dequantizes the whole matrix on every call otherwise
    (184 ms for SmolLM2's output layer here, against 2.4 ms)."""
    if fmt not in MATMULNBITS_FORMATS:  # floats, and GGUF's 5-bit and K-quant formats: exact as float32
        w = g.weight(name, _float_matrix(fmt, planes).T.copy())
        return g.op("MatMul", x, w)
    n_blocks = in_features // BLOCK
    scales = g.weight(f"{name}.scales", planes["d"].view(np.float16).astype(np.float32).reshape(-1))
    if fmt == "q8_0":
        packed = (planes["qs"].view(np.int8).astype(np.int16) + 128).astype(np.uint8).reshape(out_features, n_blocks, BLOCK)
        bits = 8
    else:
        packed = matmulnbits_q4(planes["qs"])
        bits = 4
    inputs = [x, g.weight(f"{name}.qweight", packed), scales]
    if fmt == "q4_1":
        inputs.append(g.weight(f"{name}.zero_points", np.zeros((out_features, (n_blocks + 1) // 2), np.uint8)))
    level = 4 if bits == 8 and int8_compute else 0
    y = g.op("MatMulNBits", *inputs, domain=MS_DOMAIN, K=in_features, N=out_features, bits=bits, block_size=BLOCK,
             accuracy_level=level)
    if fmt != "q4_1":
        return y
    # + sum_b m[n, b] * sum_{j in block b} x[j]
    blocks = g.op("Reshape", x, g.const([0, 0, n_blocks, BLOCK]))
    block_sums = g.op("ReduceSum", blocks, g.const([-1]), keepdims=0)
    minimums = g.weight(f"{name}.minimums", planes["m"].view(np.float16).astype(np.float32).T.copy())
    return g.op("Add", y, g.op("MatMul", block_sums, minimums))


def rms_norm(g: Graph, x: str, weight: np.ndarray, eps: float, name: str) -> str:
    mean_square = g.op("ReduceMean", g.op("Mul", x, x), axes=[-1], keepdims=1)
    scale = g.op("Reciprocal", g.op("Sqrt", g.op("Add", mean_square, g.const(np.float32(eps), np.float32))))
    return g.op("Mul", g.op("Mul", x, scale), g.weight(name, weight))


# ---------------------------------------------------------------------------------------------
# attention pieces shared by every layer


def rope_tables(g: Graph, cfg: ModelConfig, position_ids: str, total_length: str) -> tuple[str, str]:
    """cos and sin [B, 1, S, R/2] of the positions, scaled by LongRoPE's attention factor. LongRoPE
    takes its long factors once the sequence (past + new) is longer than the original context,
    as transformers does for a whole sequence."""
    half = cfg.rotary_dim // 2
    scaling = cfg.rope_scaling
    if scaling is None:
        inv_freq = g.weight("rope.inv_freq", inverse_frequencies(cfg.rotary_dim, cfg.rope_theta))
        factor = np.float32(1.0)
    else:
        short = inverse_frequencies(cfg.rotary_dim, cfg.rope_theta, scaling.short_factor)
        long = inverse_frequencies(cfg.rotary_dim, cfg.rope_theta, scaling.long_factor)
        beyond = g.op("Greater", total_length, g.const(cfg.original_max_position_embeddings))
        inv_freq = g.op("Where", beyond, g.weight("rope.inv_freq_long", long), g.weight("rope.inv_freq_short", short))
        factor = np.float32(scaling.attention_factor)
    positions = g.op("Unsqueeze", g.op("Cast", position_ids, to=FLOAT), g.const([-1]))  # [B, S, 1]
    angles = g.op("Mul", positions, g.op("Reshape", inv_freq, g.const([1, 1, half])))  # [B, S, R/2]
    tables = []
    for fn in ("Cos", "Sin"):
        t = g.op(fn, angles)
        if factor != 1.0:
            t = g.op("Mul", t, g.const(factor, np.float32))
        tables.append(g.op("Unsqueeze", t, g.const([1])))
    return tables[0], tables[1]


def apply_rope(g: Graph, t: str, cos: str, sin: str, cfg: ModelConfig) -> str:
    """rotate_half over the first R dims of every head: t [B, heads, S, Dh]."""
    half, R, Dh = cfg.rotary_dim // 2, cfg.rotary_dim, cfg.head_dim

    def dims(start, stop):
        return g.op("Slice", t, g.const([start]), g.const([stop]), g.const([3]))
    x1, x2 = dims(0, half), dims(half, R)
    first = g.op("Sub", g.op("Mul", x1, cos), g.op("Mul", x2, sin))
    second = g.op("Add", g.op("Mul", x2, cos), g.op("Mul", x1, sin))
    parts = [first, second] + ([dims(R, Dh)] if R < Dh else [])
    return g.op("Concat", *parts, axis=3)


def attention_bias(g: Graph, cfg: ModelConfig, attention_mask: str, total_length: str, new_length: str) -> str:
    """[B, 1, G*S, T] additive mask: 0 where query s (at position T - S + s) may see key j (j <= its
    position, attention_mask[b, j] == 1, and within the sliding window), else a huge negative.
    Rows repeat per query head of a group (heads are grouped as [Hk, G*S] below)."""
    past = g.op("Sub", total_length, new_length)
    key_pos = g.op("Range", g.const(0), total_length, g.const(1))  # [T]
    query_pos = g.op("Range", past, total_length, g.const(1))  # [S]
    keys = g.op("Unsqueeze", key_pos, g.const([0]))  # [1, T]
    queries = g.op("Unsqueeze", query_pos, g.const([1]))  # [S, 1]
    allowed = g.op("LessOrEqual", keys, queries)
    if cfg.sliding_window:
        allowed = g.op("And", allowed, g.op("Greater", keys, g.op("Sub", queries, g.const(cfg.sliding_window))))
    present = g.op("Equal", attention_mask, g.const(1))  # [B, T]
    allowed = g.op("And", g.op("Unsqueeze", present, g.const([1, 2])), allowed)  # [B, 1, S, T]
    bias = g.op("Where", allowed, g.const(np.float32(0.0), np.float32), g.const(NEG_LARGE, np.float32))
    group = cfg.num_heads // cfg.num_kv_heads
    return g.op("Tile", bias, g.const([1, 1, group, 1])) if group > 1 else bias


def attention(g: Graph, cfg: ModelConfig, qkv: str, cos: str, sin: str, bias: str, past_k: str, past_v: str,
              layer: int) -> tuple[str, str, str]:
    """qkv [B, S, (H + 2Hk) Dh] -> (attention output [B, S, H Dh], present key, present value)."""
    H, Hk, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = g.op("Split", qkv, g.const([H * Dh, Hk * Dh, Hk * Dh]), axis=2, outputs=3)

    def heads(t, n):  # [B, S, n Dh] -> [B, n, S, Dh]
        return g.op("Transpose", g.op("Reshape", t, g.const([0, 0, n, Dh])), perm=[0, 2, 1, 3])
    q = apply_rope(g, heads(q, H), cos, sin, cfg)
    k = apply_rope(g, heads(k, Hk), cos, sin, cfg)
    present_k = g.op("Concat", past_k, k, axis=2, name=f"present.{layer}.key")
    present_v = g.op("Concat", past_v, heads(v, Hk), axis=2, name=f"present.{layer}.value")
    # query heads h = kv * G + g share kv head kv: [B, H, S, Dh] -> [B, Hk, G*S, Dh], no K/V copies
    grouped = g.op("Reshape", q, g.const([0, Hk, -1, Dh]))
    scores = g.op("MatMul", grouped, g.op("Transpose", present_k, perm=[0, 1, 3, 2]))
    scores = g.op("Add", g.op("Mul", scores, g.const(np.float32(1.0 / np.sqrt(Dh)), np.float32)), bias)
    out = g.op("MatMul", g.op("Softmax", scores, axis=-1), present_v)  # [B, Hk, G*S, Dh]
    out = g.op("Transpose", g.op("Reshape", out, g.const([0, H, -1, Dh])), perm=[0, 2, 1, 3])
    return g.op("Reshape", out, g.const([0, 0, H * Dh])), present_k, present_v


# ---------------------------------------------------------------------------------------------
# the decoder


def _dequantized_rows(fmt: str, planes: dict, rows_per_part: int = 8192):
    """A quantized matrix as float32 row blocks (a 200k-row embedding is 2.5 GB in float)."""
    rows = next(iter(planes.values())).shape[0]
    for start in range(0, rows, rows_per_part):
        yield _float_matrix(fmt, {k: v[start:start + rows_per_part] for k, v in planes.items()})


def embedding(g: Graph, model: ModelTensors, input_ids: str) -> tuple[str, str | None]:
    """Token embeddings [B, S, D], and the float matrix when one was stored. q8_0 and q4_0 rows stay
    quantized (GatherBlockQuantized, exact) unless the output layer shares them: a tied output
    reads one float copy through Gemm, exact where 8-bit MatMulNBits would be slow or approximate."""
    cfg = model.cfg
    fmt, planes = model.planes("embed")
    V, D = cfg.vocab_size, cfg.hidden_size
    if fmt in ("q8_0", "q4_0") and not cfg.tie_word_embeddings:
        if fmt == "q8_0":
            data = (planes["qs"].view(np.int8).astype(np.int16) + 128).astype(np.uint8)  # zero point 128
        else:
            data = matmulnbits_q4(planes["qs"]).reshape(V, D // 2)  # zero point 8
        scales = planes["d"].view(np.float16).astype(np.float32)
        x = g.op("GatherBlockQuantized", g.weight("embed.qweight", data), input_ids, g.weight("embed.scales", scales),
                 domain=MS_DOMAIN, bits=8 if fmt == "q8_0" else 4, block_size=BLOCK, gather_axis=0, quantize_axis=1)
        return x, None
    embed = g.weight_rows("embed.float", (V, D), np.float32, _dequantized_rows(fmt, planes))
    return g.op("Gather", embed, input_ids, axis=0), embed


def build_graph(model: ModelTensors, *, int8_compute: bool = True, data_path: Path | None = None) -> Graph:
    """The decoder graph; with data_path, its large weights are written there as they are added."""
    if model.cfg.architecture not in ("phi3", "llama"):
        raise EdgephiError(f"{model.folder}: the ONNX exporter does not cover architecture {model.cfg.architecture!r}")
    g = Graph(data_path)
    try:
        _decoder(g, model, int8_compute)
    finally:
        g.close_data()
    return g


def _decoder(g: Graph, model: ModelTensors, int8_compute: bool) -> None:
    cfg = model.cfg
    D, F, Hk, Dh, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    input_ids = g.input("input_ids", INT64, ["batch_size", "sequence_length"])
    attention_mask = g.input("attention_mask", INT64, ["batch_size", "total_sequence_length"])
    position_ids = g.input("position_ids", INT64, ["batch_size", "sequence_length"])
    past = []
    for i in range(L):
        past.append(tuple(g.input(f"past_key_values.{i}.{kind}", FLOAT, ["batch_size", Hk, "past_sequence_length", Dh])
                          for kind in ("key", "value")))

    total_length = g.op("Gather", g.op("Shape", attention_mask), g.const(1), axis=0)
    new_length = g.op("Gather", g.op("Shape", input_ids), g.const(1), axis=0)
    cos, sin = rope_tables(g, cfg, position_ids, total_length)
    bias = attention_bias(g, cfg, attention_mask, total_length, new_length)

    x, embed = embedding(g, model, input_ids)
    presents = []
    for i in range(L):
        def lin(kind, t, i=i):
            name = layer_tensor(i, kind)
            fmt, planes = model.planes(name)
            out_features, in_features = expected_shape(cfg, name)
            return linear(g, t, name, fmt, planes, in_features, out_features, int8_compute)

        def norm(t, kind, i=i):
            name = layer_tensor(i, kind)
            return rms_norm(g, t, model.vector(name), cfg.rms_norm_eps, name)
        attn, present_k, present_v = attention(g, cfg, lin("qkv", norm(x, "attn_norm")), cos, sin, bias, *past[i], i)
        presents.append((present_k, present_v))
        x = g.op("Add", x, lin("o", attn))
        gate, up = g.op("Split", lin("gate_up", norm(x, "ffn_norm")), g.const([F, F]), axis=2, outputs=2)
        act = g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up)
        x = g.op("Add", x, lin("down", act))
    h = rms_norm(g, x, model.vector("norm"), cfg.rms_norm_eps, "norm")
    if cfg.tie_word_embeddings:
        # the float embedding the Gather reads serves as the output layer too: exact, one copy
        rows = g.op("Gemm", g.op("Reshape", h, g.const([-1, D])), embed, transB=1)
        shape = g.op("Concat", g.op("Shape", input_ids), g.const([cfg.vocab_size]), axis=0)
        logits = g.op("Reshape", rows, shape)
    else:
        out_fmt, out_planes = model.planes("output")
        logits = linear(g, h, "output", out_fmt, out_planes, D, cfg.vocab_size, int8_compute)

    g.output(logits, "logits", FLOAT, ["batch_size", "sequence_length", cfg.vocab_size])
    for i, (k, v) in enumerate(presents):
        g.output(k, f"present.{i}.key", FLOAT, ["batch_size", Hk, "total_sequence_length", Dh])
        g.output(v, f"present.{i}.value", FLOAT, ["batch_size", Hk, "total_sequence_length", Dh])


# ---------------------------------------------------------------------------------------------
# files


def save(graph: Graph, folder: Path) -> Path:
    """model.onnx beside the model.onnx.data its weights were written to (build_graph's data_path)."""
    import onnx

    path = folder / MODEL_FILE
    onnx.save_model(graph.model("edgephi"), str(path))
    onnx.checker.check_model(str(path))  # by path: models past 2 GB are checked with their data file
    return path


def genai_config(cfg: ModelConfig, generation: dict, context_length: int) -> dict:
    """onnxruntime-genai's genai_config.json for the decoder written by build_graph."""
    eos = list(generation.get("eos_token_ids") or [])
    bos = generation.get("bos_token_id")
    return {
        "model": {
            "bos_token_id": bos if bos is not None else (eos[0] if eos else 0),
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": cfg.num_heads,
                "num_hidden_layers": cfg.num_layers,
                "num_key_value_heads": cfg.num_kv_heads,
            },
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": eos[0] if eos else 0,
            "type": cfg.architecture,  # phi3 or llama: both plain decoders to onnxruntime-genai
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }


@dataclass
class ExportReport:
    out: Path
    seconds: float = 0.0
    files: dict = None  # name -> bytes
    check_tokens: int = 0
    max_abs_diff: float = 0.0  # onnxruntime's logits vs the edgephi runtime's, on a short prompt
    max_rel_diff: float = 0.0  # ... over the largest |logit|
    float_formats: dict = None  # format -> tensors written as float32 MatMul (no MatMulNBits form)




def export_onnx(folder, out, *, force: bool = False, check: bool = True, int8_compute: bool = True) -> ExportReport:
    """Write the ONNX decoder of the edgephi model `folder` into `out` (staged, renamed when done):
    model.onnx + model.onnx.data, genai_config.json, tokenizer.json / tokenizer_config.json, and
    the edgephi files under edgephi/ (for edgephi's onnxruntime backend). check: run the graph on
    a short prompt and compare its logits with the edgephi runtime's. int8_compute: see linear()."""
    import json
    import shutil
    import time

    from edgephi.format import CONFIG_FILE, GENERATION_FILE, TOKENIZER_RANKS_FILE, TOKENIZER_SPEC_FILE
    from edgephi.tokenizer_files import TokenizerSpec

    from .hf_tokenizer_writer import write_hf_tokenizer
    from .staging import check_target, staged_folder

    started = time.perf_counter()
    folder, out = Path(folder), Path(out)
    check_target(out, force, folder, kind="onnx")
    model = open_model(folder)
    generation = read_generation(folder, model.cfg.vocab_size)
    spec = TokenizerSpec.load(folder)
    context = model.cfg.max_position_embeddings
    report = ExportReport(out)
    report.float_formats = {}
    for name in model.cfg.tensor_names():
        fmt = model.cfg.tensors[name]["format"]
        if fmt not in MATMULNBITS_FORMATS + ("f32", "f16") and name != "embed":
            report.float_formats[fmt] = report.float_formats.get(fmt, 0) + 1
    with staged_folder(out, check=lambda: check_target(out, force, folder, kind="onnx")) as tmp:
        save(build_graph(model, int8_compute=int8_compute, data_path=tmp / DATA_FILE), tmp)
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(model.cfg, generation, context), indent=1) + "\n")
        write_hf_tokenizer(spec, generation, tmp, context)
        (tmp / EDGEPHI_SUBFOLDER).mkdir()
        for name in (CONFIG_FILE, GENERATION_FILE, TOKENIZER_RANKS_FILE, TOKENIZER_SPEC_FILE):
            shutil.copyfile(folder / name, tmp / EDGEPHI_SUBFOLDER / name)
        if check:
            _compare_with_runtime(folder, tmp, report)
    report.files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    report.seconds = time.perf_counter() - started
    return report


CHECK_TEXT = "The capital of France is Paris. Numbers: 12345, and code: def f(x): return x * 2"


def _compare_with_runtime(folder: Path, exported: Path, report: ExportReport) -> None:
    import edgephi
    from edgephi.onnx_backend import OnnxDecoder

    model = edgephi.load(folder, kv_dtype="float32")
    ids = model.prompt_ids(CHECK_TEXT)[:24]
    expected = model.logits(ids)
    got = OnnxDecoder(exported).logits(ids)
    diff = np.abs(got - expected)
    report.check_tokens = len(ids)
    report.max_abs_diff = float(diff.max())
    report.max_rel_diff = float(diff.max() / np.abs(expected).max())
