"""`edgephi convert` on hostile input: malformed GGUF metadata and tensor infos, safetensors
headers, Hugging Face JSON of the wrong shape, FIFOs and devices (issue #12).

Each case runs the real command under a 4 GiB address-space limit and a 60 s timeout and must
end with exit code 1, one `Error:` line naming the file (and the field or tensor), no traceback,
and nothing written beside OUT. The cases of tests/test_convert_errors.py are not repeated here.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import pytest

from tests.hostile import ARRAY, BOOL, F32, F64, I32, STRING, U8, U32, U64, run_convert_limited, tiny_model
from tests.test_convert_errors import (assert_refused, ckpt, dest, edit_json, header_length, phi3,  # noqa: F401
                                       replace_file, rewrite_header, shards)

pytestmark = pytest.mark.integration  # the converter's CLI in subprocesses

INF, NAN = math.inf, math.nan
DEEP = "[" * 100_000 + "]" * 100_000  # nested beyond the JSON parser's recursion limit


def refused(src: Path, out: Path, names, says=()) -> str:
    res = run_convert_limited([src, out], cwd=out.parent)
    msg = assert_refused(res, src, out, names, says)
    assert [line for line in res.stderr.splitlines() if line.startswith("Error:")] == [msg], res
    return msg


# ---------------------------------------------------------------------------
# Valid inputs convert under the same limits


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_tiny_gguf_converts_under_limits(arch, tmp_path, dest):
    src, out = tmp_path / "tiny.gguf", dest / "model"
    src.write_bytes(tiny_model(arch).to_bytes())
    res = run_convert_limited([src, out], cwd=tmp_path)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res
    assert {"config.json", "weights.safetensors", "tokenizer.tiktoken", "generation.json"} <= set(os.listdir(out))
    config = json.loads((out / "config.json").read_text())
    assert (config["architecture"], config["hidden_size"], config["num_kv_heads"]) == (
        arch, 64, 2 if arch == "llama" else 4)
    assert (config["rope_scaling"] is not None) == (arch == "phi3")


def test_checkpoint_converts_under_limits(phi3, dest):
    out = dest / "model"
    res = run_convert_limited([phi3, out, "--quant", "q8_0"], cwd=dest)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res
    assert json.loads((out / "config.json").read_text())["tensors"]["layers.0.qkv"]["format"] == "q8_0"


# ---------------------------------------------------------------------------
# GGUF files: tiny_model() with one thing wrong


def meta(key, vtype, value, arch="llama"):
    return lambda: tiny_model(arch).set(key, vtype, value)


def tensor_change(name, arch="llama", **changes):
    def make():
        g = tiny_model(arch)
        t = g.tensor(name)
        for attr, value in changes.items():
            setattr(t, attr, value)
        return g
    return make


def _overlapping_norms():
    g = tiny_model()
    g.to_bytes()  # lays the tensors out, filling g.offsets
    g.tensor("blk.0.ffn_norm.weight").offset = g.offsets["blk.0.attn_norm.weight"]
    return g


def _unaligned_tensor():
    g = tiny_model()
    g.to_bytes()
    g.tensor("blk.0.ffn_norm.weight").offset = g.offsets["blk.0.ffn_norm.weight"] + 4
    return g


def _tensor_twice():
    g = tiny_model()
    g.tensors.append(g.tensor("blk.0.attn_norm.weight"))
    return g


def _key_twice():
    g = tiny_model()
    g.kv.append(("llama.block_count", U32, 1))
    return g


def _nested_arrays():
    value = struct.pack("<IQ", ARRAY, 1) * 10 + struct.pack("<IQ", U8, 0)  # [[[[...[]...]]]]
    return tiny_model().set("general.tags", ARRAY, value)


def _tensor_count(n_tensors):
    def make():
        g = tiny_model()
        g.counts = (n_tensors, len(g.kv))
        return g
    return make


def _rope_factors(values):
    def make():
        g = tiny_model("phi3")
        g.tensor("rope_factors_long.weight").data = struct.pack("<8f", *values)
        return g
    return make


def _empty_vocabulary():
    return (tiny_model().set("tokenizer.ggml.tokens", ARRAY, (STRING, []))
            .set("tokenizer.ggml.token_type", ARRAY, (I32, [])).set("tokenizer.ggml.merges", ARRAY, (STRING, [])))


NOT_INT = "must be an integer"
GGUF_CASES = {
    # metadata of the wrong type or out of range where a size belongs
    "embedding_length-float32-inf": (meta("llama.embedding_length", F32, INF), ["llama.embedding_length", NOT_INT]),
    "embedding_length-float32-3.5": (meta("llama.embedding_length", F32, 3.5), ["llama.embedding_length", NOT_INT]),
    "head_count-string": (meta("llama.attention.head_count", STRING, "4"), ["llama.attention.head_count", NOT_INT]),
    "block_count-bool": (meta("llama.block_count", BOOL, True), ["llama.block_count", NOT_INT]),
    "feed_forward_length-array": (meta("llama.feed_forward_length", ARRAY, (U32, [64])),
                                  ["llama.feed_forward_length", NOT_INT]),
    "context_length-zero": (meta("llama.context_length", U32, 0), ["llama.context_length", "got 0"]),
    "head_count_kv-uint64-max": (meta("llama.attention.head_count_kv", U64, 2**64 - 1),
                                 ["llama.attention.head_count_kv", str(2**64 - 1)]),
    "key_length-odd": (meta("llama.attention.key_length", U32, 15), ["head dimension 15 is odd"]),
    "sliding_window-float64": (meta("llama.attention.sliding_window", F64, 8.0),
                               ["llama.attention.sliding_window", NOT_INT]),
    "original_context-float32": (meta("phi3.rope.scaling.original_context_length", F32, 32.0, "phi3"),
                                 ["phi3.rope.scaling.original_context_length", NOT_INT]),
    "alignment-not-power-of-two": (meta("general.alignment", U32, 48), ["general.alignment"]),
    "alignment-float": (meta("general.alignment", F32, 32.0), ["general.alignment"]),
    # floats that must be finite and positive
    "freq_base-inf": (meta("llama.rope.freq_base", F32, INF), ["llama.rope.freq_base", "finite"]),
    "freq_base-negative": (meta("llama.rope.freq_base", F32, -1e4), ["llama.rope.freq_base", "> 0"]),
    "rms_epsilon-nan": (meta("llama.attention.layer_norm_rms_epsilon", F32, NAN),
                        ["llama.attention.layer_norm_rms_epsilon", "finite"]),
    "attn_factor-string": (meta("phi3.rope.scaling.attn_factor", STRING, "1.2", "phi3"),
                           ["phi3.rope.scaling.attn_factor", "finite number"]),
    "rope-factors-inf": (_rope_factors([1.0] * 7 + [INF]), ["rope_factors_long.weight", "finite"]),
    "rope-factors-negative": (_rope_factors([1.0] * 7 + [-2.0]), ["rope_factors_long.weight", "positive"]),
    "rope-factors-not-float": (tensor_change("rope_factors_long.weight", "phi3", ggml_type=24, data=bytes(8)),
                               ["rope_factors_long.weight", "float type"]),
    # tensor infos
    "tensor-dimension-zero": (tensor_change("token_embd.weight", dims=[64, 0]), ["token_embd.weight", "size 0"]),
    "tensor-dims-product-wraps-2^64": (tensor_change("blk.0.ffn_down.weight", dims=[2**32, 2**32]),
                                       ["blk.0.ffn_down.weight", "runs past the end"]),
    "tensor-dims-product-wraps-negative": (tensor_change("blk.0.ffn_down.weight", dims=[3, 2**63]),
                                           ["blk.0.ffn_down.weight", "runs past the end"]),
    "tensor-dim-uint64-max": (tensor_change("output_norm.weight", dims=[2**64 - 1]),
                              ["output_norm.weight", "runs past the end"]),
    "tensor-unknown-ggml-type": (tensor_change("blk.0.attn_k.weight", ggml_type=99),
                                 ["blk.0.attn_k.weight", "unknown ggml type 99"]),
    "tensor-five-dimensions": (tensor_change("output_norm.weight", dims=[64, 1, 1, 1, 1]),
                               ["output_norm.weight", "5 dimensions"]),
    "tensor-no-dimensions": (tensor_change("output_norm.weight", dims=[], data=b""),
                             ["output_norm.weight", "0 dimensions"]),
    "tensor-partial-block": (tensor_change("token_embd.weight", dims=[48, 265]), ["token_embd.weight", "blocks"]),
    "tensors-overlap": (_overlapping_norms, ["blk.0.attn_norm.weight", "blk.0.ffn_norm.weight", "overlap"]),
    "tensor-offset-unaligned": (_unaligned_tensor, ["blk.0.ffn_norm.weight", "aligned"]),
    "tensor-name-twice": (_tensor_twice, ["blk.0.attn_norm.weight", "twice"]),
    "key-twice": (_key_twice, ["llama.block_count", "twice"]),
    # lengths and counts that the file cannot hold
    "string-length-huge": (meta("general.name", STRING, struct.pack("<Q", 2**63) + b"x"), ["corrupt GGUF header"]),
    "array-count-huge": (meta("tokenizer.ggml.merges", ARRAY, struct.pack("<IQ", STRING, 2**62)),
                         ["corrupt GGUF header"]),
    "arrays-nested-deep": (_nested_arrays, ["corrupt GGUF header", "nested"]),
    "tensor-count-huge": (_tensor_count(2**64 - 1), ["corrupt GGUF header", "do not fit"]),
    # tokenizer and generation metadata
    "architecture-array": (meta("general.architecture", ARRAY, (STRING, ["llama"])), ["unsupported GGUF architecture"]),
    "tokens-not-strings": (meta("tokenizer.ggml.tokens", ARRAY, (U32, list(range(265)))), ["tokenizer.ggml.tokens"]),
    "token_type-too-short": (meta("tokenizer.ggml.token_type", ARRAY, (I32, [1] * 10)),
                             ["tokenizer.ggml.token_type", "265 integers"]),
    "token_type-strings": (meta("tokenizer.ggml.token_type", ARRAY, (STRING, ["1"] * 265)),
                           ["tokenizer.ggml.token_type"]),
    "merges-not-strings": (meta("tokenizer.ggml.merges", ARRAY, (I32, [1, 2])), ["tokenizer.ggml.merges"]),
    "merge-without-space": (meta("tokenizer.ggml.merges", ARRAY, (STRING, ["Ġt"])), ["malformed merges", "entry 0"]),
    "pre-tokenizer-array": (meta("tokenizer.ggml.pre", ARRAY, (STRING, ["gpt-2"])), ["pre-tokenizer"]),
    "empty-vocabulary": (_empty_vocabulary, ["vocabulary is empty"]),
    "bos_token_id-negative": (meta("tokenizer.ggml.bos_token_id", I32, -1), ["tokenizer.ggml.bos_token_id"]),
    "eos_token_id-array": (meta("tokenizer.ggml.eos_token_id", ARRAY, (U32, [264])),
                           ["tokenizer.ggml.eos_token_id", NOT_INT]),
    "add_bos_token-string": (meta("tokenizer.ggml.add_bos_token", STRING, "yes"),
                             ["tokenizer.ggml.add_bos_token", "true or false"]),
    "chat_template-int": (meta("tokenizer.chat_template", U32, 5), ["tokenizer.chat_template", "string"]),
}


@pytest.mark.parametrize("case", GGUF_CASES)
def test_hostile_gguf(case, tmp_path, dest):
    make, says = GGUF_CASES[case]
    src, out = tmp_path / "model.gguf", dest / "model"
    src.write_bytes(make().to_bytes())
    refused(src, out, src, says)


# ---------------------------------------------------------------------------
# safetensors headers, changed


def _busiest_shard(ckpt: Path) -> Path:
    """The shard holding the most tensors (the first holds only the embedding)."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    return ckpt / max(set(index.values()), key=list(index.values()).count)


def _first_two(header: dict) -> tuple[str, str]:
    """The tensor at data offset 0 and the next one in the file."""
    names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
    return names[0], names[1]


def _overlap(header):
    first, second = _first_two(header)
    begin, end = header[second]["data_offsets"]
    header[second]["data_offsets"] = [0, end - begin]  # its own size, starting where the first starts


def _entry(field, value):
    def change(header):
        header[_first_two(header)[1]][field] = value
    return change


def _entry_by(fn):
    def change(header):
        info = header[_first_two(header)[1]]
        fn(info)
    return change


def _metadata(value):
    return lambda header: header.update(__metadata__=value)


def _wrapping_shape(info):
    info["shape"], info["dtype"] = [2**32, 2**32], "F32"  # 2^64 elements: 0 in int64
    info["data_offsets"] = [info["data_offsets"][0]] * 2


ST_CASES = {
    "tensors-overlap": (_overlap, ["overlap"]),
    "float-offsets": (_entry_by(lambda i: i.update(data_offsets=[float(o) for o in i["data_offsets"]])),
                      ["data_offsets"]),
    "offsets-reversed": (_entry_by(lambda i: i.update(data_offsets=i["data_offsets"][::-1])), ["data_offsets"]),
    "offsets-three": (_entry_by(lambda i: i.update(data_offsets=i["data_offsets"] + [0])), ["data_offsets"]),
    "offsets-negative": (_entry_by(lambda i: i.update(data_offsets=[-4, i["data_offsets"][1]])), ["data_offsets"]),
    "shape-not-a-list": (_entry("shape", "64"), ["shape"]),
    "shape-negative": (_entry_by(lambda i: i.update(shape=[-d for d in i["shape"]])), ["shape"]),
    "shape-float": (_entry_by(lambda i: i.update(shape=[float(d) for d in i["shape"]])), ["shape"]),
    "shape-40-dimensions": (_entry("shape", [1] * 40), ["shape"]),
    "shape-product-wraps-2^64": (_entry_by(_wrapping_shape), ["size does not match"]),
    "dtype-not-a-string": (_entry("dtype", 7), ["dtype"]),
    "entry-not-an-object": (lambda h: h.update({_first_two(h)[1]: [1, 2]}), ["not a JSON object"]),
    "metadata-not-an-object": (_metadata(["pt"]), ["__metadata__"]),
    "metadata-values-not-strings": (_metadata({"format": 5}), ["__metadata__"]),
}


@pytest.mark.parametrize("case", ST_CASES)
def test_hostile_safetensors_header(case, ckpt, dest):
    change, says = ST_CASES[case]
    shard = _busiest_shard(ckpt)
    rewrite_header(shard, change)
    refused(ckpt, dest / "model", shard, says)


def _with_header_text(shard: Path, text: bytes, past_the_end: bool) -> None:
    """The shard's header replaced by `text`, its declared length true or one byte more than the file holds."""
    rest = shard.read_bytes()[8 + header_length(shard):]
    length = len(text) + len(rest) + 1 if past_the_end else len(text)
    replace_file(shard, length.to_bytes(8, "little") + text + rest)


ST_RAW_CASES = {
    "header-a-list": (b"[]", False, "expected a JSON object"),
    "header-nested-deeply": (DEEP.encode(), False, "nested too deeply"),
    "header-1e999": (b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e999]}}', False, "out of range"),
    "header-length-one-past-the-file": (b"{}", True, "corrupt safetensors header"),
}


@pytest.mark.parametrize("case", ST_RAW_CASES)
def test_hostile_safetensors_raw_header(case, ckpt, dest):
    text, past_the_end, says = ST_RAW_CASES[case]
    shard = shards(ckpt)[-1]
    _with_header_text(shard, text, past_the_end)
    refused(ckpt, dest / "model", shard, says)


# ---------------------------------------------------------------------------
# Hugging Face JSON files of the wrong shape

LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}


def _longrope_from_one_position(cfg):
    """LongRoPE's attention factor divides by log(original_max_position_embeddings) = log(1) = 0."""
    cfg.update(rope_parameters=LONGROPE, original_max_position_embeddings=1)


def _set(*path_and_value):
    *path, value = path_and_value

    def change(data):
        for key in path[:-1]:
            data = data[key]
        data[path[-1]] = value
    return change


def _first_vocab_id(value):
    def change(tok):
        first = next(iter(tok["model"]["vocab"]))
        tok["model"]["vocab"][first] = value
    return change


def _added_token_id(value):
    def change(tok):
        tok["added_tokens"][0]["id"] = value
    return change


def _two_tokens_one_id(tok):
    vocab = tok["model"]["vocab"]
    first, second = list(vocab)[300:302]
    vocab[second] = vocab[first]


JSON_CASES = {
    # config.json
    "config-a-string": ("config.json", '"hello"', ["expected a JSON object"]),
    "config-nested-deeply": ("config.json", DEEP, ["nested too deeply"]),
    "config-hidden_size-1e999": ("config.json", '{"architectures": ["Phi3ForCausalLM"], "hidden_size": 1e999}',
                                 ["1e999"]),
    "config-hidden_size-float": ("config.json", _set("hidden_size", 64.0), ["hidden_size", NOT_INT]),
    "config-hidden_size-bool": ("config.json", _set("hidden_size", True), ["hidden_size", NOT_INT]),
    "config-vocab_size-huge": ("config.json", _set("vocab_size", 10**30), ["vocab_size"]),
    "config-num_key_value_heads-negative": ("config.json", _set("num_key_value_heads", -4), ["num_key_value_heads"]),
    "config-rms_norm_eps-zero": ("config.json", _set("rms_norm_eps", 0), ["rms_norm_eps", "> 0"]),
    "config-rope_theta-string": ("config.json", _set("rope_parameters", "rope_theta", "1e4"),
                                 ["rope_parameters.rope_theta", "finite number"]),
    "config-rope_parameters-list": ("config.json", _set("rope_parameters", []), ["rope_parameters", "JSON object"]),
    "config-partial_rotary_factor-2": ("config.json", _set("rope_parameters", "partial_rotary_factor", 2.0),
                                       ["partial_rotary_factor", "(0, 1]"]),
    "config-partial_rotary_factor-negative": ("config.json", _set("rope_parameters", "partial_rotary_factor", -0.5),
                                              ["partial_rotary_factor", "> 0"]),
    "config-longrope-original-1": ("config.json", _longrope_from_one_position,
                                   ["original_max_position_embeddings", "at least 2"]),
    "config-longrope-factor-string": ("config.json", _set("rope_parameters", {**LONGROPE, "short_factor": ["x"] * 8}),
                                      ["rope_parameters.short_factor[0]"]),
    "config-sliding_window-float": ("config.json", _set("sliding_window", 8.5), ["sliding_window", NOT_INT]),
    "config-tie_word_embeddings-string": ("config.json", _set("tie_word_embeddings", "yes"),
                                          ["tie_word_embeddings", "true or false"]),
    "config-eos_token_id-bool": ("config.json", _set("eos_token_id", True), ["eos_token_id", "token id"]),
    # model.safetensors.index.json
    "index-a-list": ("model.safetensors.index.json", "[]", ["expected a JSON object"]),
    "index-nested-deeply": ("model.safetensors.index.json", DEEP, ["nested too deeply"]),
    "index-weight_map-list": ("model.safetensors.index.json", _set("weight_map", []), ["weight_map", "JSON object"]),
    "index-shard-not-a-string": ("model.safetensors.index.json", _set("weight_map", "model.norm.weight", 5),
                                 ["weight_map['model.norm.weight']"]),
    "index-shard-escapes": ("model.safetensors.index.json",
                            _set("weight_map", "model.norm.weight", "../ckpt/model-00003-of-00003.safetensors"),
                            ["weight_map['model.norm.weight']", "inside the folder"]),
    "index-shard-absolute": ("model.safetensors.index.json", _set("weight_map", "model.norm.weight", "/etc/hostname"),
                             ["weight_map['model.norm.weight']", "inside the folder"]),
    # tokenizer.json
    "tokenizer-model-a-list": ("tokenizer.json", _set("model", []), ["model must be a JSON object"]),
    "tokenizer-vocab-id-string": ("tokenizer.json", _first_vocab_id("5"), ["vocab[", "token id"]),
    "tokenizer-vocab-id-negative": ("tokenizer.json", _first_vocab_id(-1), ["vocab[", "token id"]),
    "tokenizer-vocab-id-float": ("tokenizer.json", _first_vocab_id(1.5), ["vocab[", "token id"]),
    "tokenizer-added_tokens-malformed": ("tokenizer.json", _set("added_tokens", [{"content": 5, "id": "x"}]),
                                         ["added_tokens[0].content"]),
    # tokenizers that converted before and then failed at every load
    "tokenizer-added-token-id-negative": ("tokenizer.json", _added_token_id(-5), ["added_tokens[0]", "-5"]),
    "tokenizer-two-tokens-one-id": ("tokenizer.json", _two_tokens_one_id, ["share", "id"]),
    "tokenizer-added-token-on-a-vocab-id": ("tokenizer.json", _added_token_id(300), ["300"]),
    "tokenizer-added_tokens-object": ("tokenizer.json", _set("added_tokens", {}), ["added_tokens", "JSON array"]),
    "tokenizer-pre_tokenizer-string": ("tokenizer.json", _set("pre_tokenizer", "ByteLevel"),
                                       ["pre_tokenizer must be a JSON object"]),
    "tokenizer-pretokenizers-numbers": ("tokenizer.json", _set("pre_tokenizer", "pretokenizers", [1, 2]),
                                        ["pre_tokenizer.pretokenizers[0]"]),
    "tokenizer-normalizer-string": ("tokenizer.json", _set("normalizer", "NFC"), ["normalizer", "JSON object"]),
    "tokenizer-merges-numbers": ("tokenizer.json", _set("model", "merges", [1, 2]), ["malformed merges", "entry 0"]),
    "tokenizer-merges-object": ("tokenizer.json", _set("model", "merges", {}), ["merges must be a list"]),
    "tokenizer-byte_fallback-string": ("tokenizer.json", _set("model", "byte_fallback", "yes"), ["byte_fallback"]),
    "tokenizer-nested-deeply": ("tokenizer.json", DEEP, ["nested too deeply"]),
    "tokenizer-1e999": ("tokenizer.json", '{"model": {"type": "BPE", "vocab": {"a": 1e999}}}', ["1e999"]),
    # tokenizer_config.json and generation_config.json
    "tokenizer_config-a-list": ("tokenizer_config.json", "[]", ["expected a JSON object"]),
    "tokenizer_config-chat_template-int": ("tokenizer_config.json", _set("chat_template", 5), ["chat_template"]),
    "tokenizer_config-chat_template-entry": ("tokenizer_config.json",
                                             _set("chat_template", [{"name": "default", "template": 5}]),
                                             ["chat_template[0].template", "string"]),
    "tokenizer_config-eos_token-list": ("tokenizer_config.json", _set("eos_token", [1]), ["eos_token"]),
    "tokenizer_config-add_bos_token-string": ("tokenizer_config.json", _set("add_bos_token", "yes"),
                                              ["add_bos_token", "true or false"]),
    "generation_config-a-string": ("generation_config.json", '"x"', ["expected a JSON object"]),
    "generation_config-eos-string": ("generation_config.json", _set("eos_token_id", "2"), ["eos_token_id"]),
    "generation_config-eos-floats": ("generation_config.json", _set("eos_token_id", [2.0]), ["eos_token_id"]),
    "generation_config-bos-negative": ("generation_config.json", _set("bos_token_id", -1), ["bos_token_id"]),
}


@pytest.mark.parametrize("case", JSON_CASES)
def test_hostile_json(case, ckpt, dest):
    name, change, says = JSON_CASES[case]
    path = ckpt / name
    if callable(change):
        edit_json(path, change)
    else:
        replace_file(path, change)
    refused(ckpt, dest / "model", path, says)


# ---------------------------------------------------------------------------
# FIFOs, devices and folders where files belong: refused at once, never read


def _fifo(path: Path) -> Path:
    if path.is_symlink() or path.exists():
        path.unlink()
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("kind", ["fifo", "fifo-named-gguf", "dev-zero", "dev-null"])
def test_special_file_as_src(kind, tmp_path, dest):
    src = {"fifo": lambda: _fifo(tmp_path / "model"), "fifo-named-gguf": lambda: _fifo(tmp_path / "model.gguf"),
           "dev-zero": lambda: Path("/dev/zero"), "dev-null": lambda: Path("/dev/null")}[kind]()
    refused(src, dest / "model", src, "not a regular file")


SPECIAL_IN_FOLDER = {
    "fifo-config.json": ("config.json", _fifo),
    "fifo-tokenizer.json": ("tokenizer.json", _fifo),
    "fifo-index": ("model.safetensors.index.json", _fifo),
    "fifo-shard": ("model-00002-of-00003.safetensors", _fifo),
    "fifo-generation_config.json": ("generation_config.json", _fifo),
    "fifo-tokenizer_config.json": ("tokenizer_config.json", _fifo),
    "fifo-chat_template.jinja": ("chat_template.jinja", _fifo),
    "dev-zero-config.json": ("config.json", lambda p: (p.unlink(), p.symlink_to("/dev/zero"))),
    "dev-zero-shard": ("model-00001-of-00003.safetensors", lambda p: (p.unlink(), p.symlink_to("/dev/zero"))),
    "folder-tokenizer.json": ("tokenizer.json", lambda p: (p.unlink(), p.mkdir())),
}


@pytest.mark.parametrize("case", SPECIAL_IN_FOLDER)
def test_special_file_in_folder(case, ckpt, dest):
    name, make = SPECIAL_IN_FOLDER[case]
    path = ckpt / name
    assert name == "chat_template.jinja" or path.exists(), f"the fixture has no {name}"
    make(path)
    refused(ckpt, dest / "model", path, "not a regular file")
