"""GGUF import: lossless block copies, llama.cpp's Q/K permutation undone, config and phi3 GGUFs,
checked against the gguf package's reader and transformers' GGUF loader."""

import math

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader, GGUFWriter
from gguf import quants as gguf_quants

from edgephi.convert import convert
from edgephi.format import read_config
from tests.test_convert_hf import reference_weights, stored_weights, weights_by_edgephi_name

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "m"
    report = convert(smollm2_gguf, out, quant=None)
    return out, report


@pytest.mark.integration
def test_import_copies_blocks_bit_for_bit(smollm2, smollm2_gguf):
    out, report = smollm2
    assert all(t.lossless for t in report.tensors if t.format != "f32")
    from safetensors.numpy import load_file

    ours = load_file(out / "weights.safetensors")
    reader = GGUFReader(smollm2_gguf)
    blocks = {t.name: np.asarray(t.data) for t in reader.tensors}
    # Tensors llama.cpp stores unpermuted: our planes, re-interleaved, are the GGUF's bytes.
    for ours_name, gguf_name, bytes_per_block in [("embed", "token_embd.weight", 34),
                                                  ("layers.3.o", "blk.3.attn_output.weight", 20),
                                                  ("layers.29.down", "blk.29.ffn_down.weight", 20)]:
        planes = [ours[f"{ours_name}.{p}"] for p in (("d", "m", "qs") if bytes_per_block == 20 else ("d", "qs"))]
        rows = planes[0].shape[0]
        per_block = [p.reshape(rows, planes[0].shape[1], -1).view(np.uint8) for p in planes]
        interleaved = np.concatenate(per_block, axis=2).reshape(rows, -1)
        assert np.array_equal(interleaved, blocks[gguf_name]), ours_name
    assert np.array_equal(ours["layers.0.attn_norm"], blocks["blk.0.attn_norm.weight"])


@pytest.mark.integration
def test_import_matches_transformers_gguf_loader(smollm2, smollm2_transformers):
    """transformers dequantizes with gguf-py and reverses llama.cpp's Q/K permutation itself."""
    out, _ = smollm2
    ours, ref = stored_weights(out), weights_by_edgephi_name(smollm2_transformers)
    assert ours.keys() == ref.keys()
    for name in ref:
        assert np.array_equal(ours[name], ref[name]), name


@pytest.mark.integration
def test_config_matches_transformers_gguf_loader(smollm2, smollm2_transformers):
    ours, cfg = read_config(smollm2[0]), smollm2_transformers.config
    assert ours.architecture == "llama"
    assert (ours.hidden_size, ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.intermediate_size,
            ours.vocab_size) == (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                                 cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size)
    assert ours.rope_theta == cfg.rope_parameters["rope_theta"]
    assert ours.rms_norm_eps == pytest.approx(cfg.rms_norm_eps, rel=1e-6)
    assert ours.tie_word_embeddings and cfg.tie_word_embeddings
    assert ours.rotary_dim == ours.head_dim == 64


@pytest.mark.integration
def test_requantizing_a_gguf(smollm2_gguf, smollm2, tmp_path):
    """--quant q8_0 on a Q4_1 file: the reference is gguf's quantize() of gguf's dequantize()."""
    convert(smollm2_gguf, tmp_path / "m", quant="q8_0")
    lossless, requantized = stored_weights(smollm2[0]), stored_weights(tmp_path / "m")
    for name in ("layers.0.qkv", "layers.12.gate_up", "layers.29.down"):
        expected = gguf_quants.dequantize(gguf_quants.quantize(lossless[name], T.Q8_0), T.Q8_0)
        assert np.array_equal(requantized[name], expected), name
    assert np.array_equal(requantized["embed"], lossless["embed"])


def write_phi3_gguf(checkpoint, path, linear_type=T.Q8_0):
    """A phi3 GGUF written the way llama.cpp's converter (Phi3MiniModel) lays it out: fused
    attn_qkv and ffn_up, no Q/K permutation, rope factor tensors, `linear_type` linears."""
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    cfg, sd = model.config, {k: v.numpy() for k, v in model.state_dict().items()}
    rope = cfg.rope_parameters
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w = GGUFWriter(path, "phi3")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * cfg.hidden_size) // cfg.num_attention_heads)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_sliding_window(cfg.sliding_window or 0)
    orig = rope["original_max_position_embeddings"]
    w.add_rope_scaling_orig_ctx_len(orig)
    scale = cfg.max_position_embeddings / orig
    w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)))
    w.add_file_type(7)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_tokens = bytes_to_unicode()  # a bytes-only vocabulary: this test is about the weights
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([byte_tokens[b] for b in range(256)])
    w.add_token_types([1] * 256)
    w.add_token_merges([])

    def q8(name, arr, qtype=linear_type):
        blocks = gguf_quants.quantize(arr, qtype)
        w.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)

    w.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
    w.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    q8("token_embd.weight", sd["model.embed_tokens.weight"], T.Q8_0)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        q8(f"blk.{i}.attn_qkv.weight", sd[p + "self_attn.qkv_proj.weight"])
        q8(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        q8(f"blk.{i}.ffn_up.weight", sd[p + "mlp.gate_up_proj.weight"])
        q8(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert head_dim * cfg.num_attention_heads == cfg.hidden_size


@pytest.mark.parametrize("linear_type", [T.Q8_0, T.Q4_0, T.F16])
def test_phi3_gguf_with_longrope(checkpoint_factory, tmp_path, linear_type):
    src = checkpoint_factory("phi3_longrope")
    write_phi3_gguf(src, tmp_path / "phi3.gguf", linear_type)
    convert(tmp_path / "phi3.gguf", tmp_path / "m", quant=None)
    ours_cfg = read_config(tmp_path / "m")
    cfg = transformers.AutoConfig.from_pretrained(src)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    _, attention = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", 1)
    assert ours_cfg.architecture == "phi3" and ours_cfg.tie_word_embeddings
    assert ours_cfg.rotary_dim == int(cfg.rope_parameters["partial_rotary_factor"] * 16)
    # GGUF stores the factors as float32, the precision transformers computes with
    for ours_f, key in ((ours_cfg.rope_scaling.short_factor, "short_factor"),
                        (ours_cfg.rope_scaling.long_factor, "long_factor")):
        assert np.array_equal(np.float32(ours_f), np.float32(cfg.rope_parameters[key]))
    assert ours_cfg.rope_scaling.attention_factor == pytest.approx(attention, rel=1e-6)
    assert ours_cfg.original_max_position_embeddings == cfg.rope_parameters["original_max_position_embeddings"]
    ours, ref = stored_weights(tmp_path / "m"), reference_weights(src)
    for name, w in ref.items():
        qtype = T.Q8_0 if name == "embed" else linear_type
        expected = w if w.ndim == 1 else gguf_quants.dequantize(gguf_quants.quantize(w, qtype), qtype)
        assert np.array_equal(ours[name], expected), name
    assert read_config(tmp_path / "m").tensors["layers.0.qkv"]["format"] == linear_type.name.lower()
