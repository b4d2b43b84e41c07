"""Hugging Face checkpoints -> edgephi folders, checked against transformers' own loading."""

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants
from safetensors.numpy import load_file

from edgephi.convert import convert
from edgephi.format import read_config
from edgephi.quant import FORMATS, dequantize
from tests.fixtures import VARIANTS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def reference_weights(folder) -> dict[str, np.ndarray]:
    """transformers' float32 weights under edgephi's names (q/k/v and gate/up stacked)."""
    return weights_by_edgephi_name(transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))


def weights_by_edgephi_name(model) -> dict[str, np.ndarray]:
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = {"embed": sd["model.embed_tokens.weight"], "norm": sd["model.norm.weight"]}
    if not model.config.tie_word_embeddings:
        out["output"] = sd["lm_head.weight"]
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        out[f"layers.{i}.attn_norm"] = sd[p + "input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm"] = sd[p + "post_attention_layernorm.weight"]
        out[f"layers.{i}.o"] = sd[attn + "o_proj.weight"]
        out[f"layers.{i}.down"] = sd[p + "mlp.down_proj.weight"]
        if attn + "qkv_proj.weight" in sd:
            out[f"layers.{i}.qkv"] = sd[attn + "qkv_proj.weight"]
            out[f"layers.{i}.gate_up"] = sd[p + "mlp.gate_up_proj.weight"]
        else:
            out[f"layers.{i}.qkv"] = np.concatenate([sd[attn + f"{x}_proj.weight"] for x in "qkv"])
            out[f"layers.{i}.gate_up"] = np.concatenate([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
    return out


def stored_weights(folder) -> dict[str, np.ndarray]:
    """Our weights read back with the safetensors package and dequantized per the recipe."""
    raw = load_file(folder / "weights.safetensors")
    cfg = read_config(folder)
    out = {}
    for name, recipe in cfg.tensors.items():
        fmt = FORMATS[recipe["format"]]
        planes = {p: raw[f"{name}.{p}" if p else name] for p, _, _ in fmt.planes}
        out[name] = dequantize(planes, fmt)
    return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_float_conversion_is_exact(checkpoint_factory, tmp_path, variant, dtype):
    src = checkpoint_factory(variant, dtype)
    convert(src, tmp_path / "m", quant="f32", embed_quant="f32")
    ours, ref = stored_weights(tmp_path / "m"), reference_weights(src)
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name].shape == ref[name].shape, name
        assert np.array_equal(ours[name], ref[name]), name


@pytest.mark.parametrize("quant,embed", [("q4_0", "q8_0"), ("q4_1", "q8_0"), ("q8_0", "q4_0"), ("f16", "f16")])
def test_quantized_conversion_matches_gguf_reference(checkpoint_factory, tmp_path, quant, embed):
    src = checkpoint_factory("phi3_gqa_partial", "bfloat16")
    report = convert(src, tmp_path / "m", quant=quant, embed_quant=embed)
    ours, ref = stored_weights(tmp_path / "m"), reference_weights(src)
    ggml = {"q4_0": T.Q4_0, "q4_1": T.Q4_1, "q8_0": T.Q8_0, "f16": T.F16}
    for name, w in ref.items():
        kind = name.rsplit(".", 1)[-1]
        want = {"embed": embed, "output": embed}.get(kind, "f32" if "norm" in kind else quant)
        expected = w if want == "f32" else gguf_quants.dequantize(gguf_quants.quantize(w, ggml[want]), ggml[want])
        assert np.array_equal(ours[name], expected), name
    errors = {t.name: t.rel_error for t in report.tensors}
    for name, w in ref.items():
        assert errors[name] == pytest.approx(np.linalg.norm(ours[name] - w) / np.linalg.norm(w), rel=1e-6)


def _transformers_rope(folder):
    cfg = transformers.AutoConfig.from_pretrained(folder)
    params = cfg.rope_parameters
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg, params, int(head_dim * params.get("partial_rotary_factor", 1.0))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("hub_style", [False, True])
def test_config_matches_transformers(checkpoint_factory, tmp_path, variant, hub_style):
    src = checkpoint_factory(variant, "float32", hub_style=hub_style)
    convert(src, tmp_path / "m", quant="q8_0")
    ours = read_config(tmp_path / "m")
    # transformers 5.24 cannot read the Hub's "su" configs; its reading of the same model's
    # transformers-5 config is the reference there.
    cfg, params, rotary_dim = _transformers_rope(checkpoint_factory(variant, "float32"))
    assert ours.architecture == {"Phi3ForCausalLM": "phi3", "LlamaForCausalLM": "llama"}[cfg.architectures[0]]
    assert (ours.hidden_size, ours.num_layers, ours.num_heads, ours.num_kv_heads, ours.intermediate_size,
            ours.vocab_size) == (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
                                 cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size)
    assert ours.rotary_dim == rotary_dim
    assert ours.rope_theta == params["rope_theta"]
    assert ours.rms_norm_eps == cfg.rms_norm_eps
    assert ours.tie_word_embeddings == cfg.tie_word_embeddings
    assert ours.sliding_window == getattr(cfg, "sliding_window", None)
    assert ours.max_position_embeddings == cfg.max_position_embeddings
    if params["rope_type"] == "longrope":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        orig = params["original_max_position_embeddings"]
        assert ours.original_max_position_embeddings == orig
        exponent = np.arange(0, rotary_dim, 2) / rotary_dim
        for seq_len, factors in ((orig, ours.rope_scaling.short_factor), (orig + 1, ours.rope_scaling.long_factor)):
            inv_freq, attention = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", seq_len)
            ours_inv = 1.0 / (np.array(factors) * ours.rope_theta ** exponent)
            np.testing.assert_allclose(ours_inv, inv_freq.numpy(), rtol=1e-6)
            assert ours.rope_scaling.attention_factor == pytest.approx(attention, rel=1e-12)
    else:
        assert ours.rope_scaling is None


@pytest.mark.integration
def test_generation_file_lists_every_end_of_turn_id(checkpoint_factory, tmp_path):
    src = checkpoint_factory("phi3_basic", tokenizer="phi4")
    convert(src, tmp_path / "m", quant="q4_0")
    gen = json.loads((tmp_path / "m" / "generation.json").read_text())
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    assert gen["bos_token_id"] == 100257
    assert {100265, 100257} <= set(gen["eos_token_ids"])  # <|im_end|> ends a turn, <|endoftext|> a text
    assert gen["chat_template"] == tok_cfg["chat_template"]


def test_single_file_checkpoint(checkpoint_factory, tmp_path):
    src = checkpoint_factory("llama", "float16", shards=False)
    assert (src / "model.safetensors").is_file()
    convert(src, tmp_path / "m", quant="f32", embed_quant="f32")
    ours, ref = stored_weights(tmp_path / "m"), reference_weights(src)
    assert all(np.array_equal(ours[k], ref[k]) for k in ref)


@pytest.mark.integration
def test_preset_sets_template_stops_and_quant(checkpoint_factory, tmp_path):
    from edgephi import models

    src = checkpoint_factory("phi3_longrope", tokenizer="phi4_mini")
    report = convert(src, tmp_path / "m", quant=None, preset="phi-4-mini-instruct")
    gen = json.loads((tmp_path / "m" / "generation.json").read_text())
    preset = models.presets()["phi-4-mini-instruct"]
    assert gen["chat_template"] == preset.chat_template
    assert {200020, 199999} <= set(gen["eos_token_ids"])  # <|end|>, <|endoftext|> at Phi-4-mini's ids
    assert {t.format for t in report.tensors if t.name.endswith("qkv")} == {preset.recommended_quant}
