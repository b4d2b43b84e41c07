"""The runtime's logits against transformers on the same weights: every Phi feature in float32,
LongRoPE across its switch, prefill + decode, quantized weights, and the real SmolLM2 model."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

import edgephi
from edgephi.convert import convert
from tests.fixtures import VARIANTS, hf_logits, random_ids, rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")




@pytest.fixture(scope="module")
def float_models(checkpoint_factory, tmp_path_factory):
    """variant -> (edgephi model with float32 KV, transformers model), converted at f32."""
    built = {}

    def get(variant):
        if variant not in built:
            src = checkpoint_factory(variant, "float32")
            out = tmp_path_factory.mktemp(variant) / "m"
            convert(src, out, quant="f32", embed_quant="f32")
            ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
            built[variant] = (edgephi.load(out, kv_dtype="float32"), ref)
        return built[variant]

    return get



@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_float_logits_match_transformers(float_models, variant):
    model, ref = float_models(variant)
    ids = random_ids(48)  # longer than phi3_longrope's 32-token switch and phi3_sliding's 8-token window
    assert rel_err(model.logits(ids), hf_logits(ref, ids)) < 1e-4


@pytest.mark.parametrize("variant", ["phi3_gqa_partial", "phi3_sliding", "llama"])
def test_prefill_plus_decode_equals_full_sequence(float_models, variant):
    model, _ = float_models(variant)
    ids = random_ids(40, seed=1)
    full = model.logits(ids)
    sequence = model.sequence()
    steps = [sequence.feed(ids[:25], all_logits=True)]
    steps += [sequence.step(t).copy() for t in ids[25:]]  # step() returns a reused buffer
    np.testing.assert_allclose(np.concatenate(steps), full, rtol=0, atol=1e-4 * np.abs(full).max())


@pytest.mark.parametrize("variant", ["phi3_gqa_partial", "llama"])
def test_prefill_in_scratch_bounded_chunks_matches_transformers(float_models, variant, monkeypatch):
    """Large models prefill in chunks bounded by scratch bytes; a budget this small splits 48
    tokens into chunks of 16 on the tiny models."""
    import edgephi.model

    model, ref = float_models(variant)
    monkeypatch.setattr(edgephi.model, "PREFILL_SCRATCH_BYTES", 1)
    monkeypatch.setattr(edgephi.model, "MIN_PREFILL_CHUNK", 16)
    assert edgephi.model.prefill_chunk_tokens(model.config) == 16
    monkeypatch.setattr(model.backend, "prefill_chunk", 16)
    ids = random_ids(48, seed=3)
    sequence = model.sequence()
    last = sequence.feed(ids).copy()
    assert sequence.next_pos == 48
    assert rel_err(model.logits(ids), hf_logits(ref, ids)) < 1e-4
    assert rel_err(last, hf_logits(ref, ids)[-1:]) < 1e-4


def test_longrope_decode_across_the_switch_matches_transformers(float_models):
    """Decoding past original_max_position_embeddings (32 here): each step equals transformers'
    full-sequence logits, which use the long factors for every position once past the switch."""
    model, ref = float_models("phi3_longrope")
    ids = random_ids(44, seed=2)
    sequence = model.sequence()
    sequence.feed(ids[:28])
    for n in range(29, 45):
        ours = sequence.step(ids[n - 1])[0]
        expected = hf_logits(ref, ids[:n])[-1]
        assert rel_err(ours, expected) < 1e-4, n
    assert sequence.cache.long_rope


@pytest.mark.parametrize("quant,ggml", [("q8_0", T.Q8_0), ("q4_0", T.Q4_0), ("q4_1", T.Q4_1)])
def test_quantized_logits_match_transformers_on_dequantized_weights(checkpoint_factory, tmp_path, quant, ggml):
    src = checkpoint_factory("phi3_gqa_partial", "float32")
    convert(src, tmp_path / "m", quant=quant, embed_quant="q8_0")
    model = edgephi.load(tmp_path / "m", kv_dtype="float32")
    exact = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():  # the same rounding, done by gguf's reference codecs
        for name, p in ref.named_parameters():
            if p.ndim == 2:
                fmt = T.Q8_0 if "embed" in name or "lm_head" in name else ggml
                p.copy_(torch.from_numpy(gguf_quants.dequantize(gguf_quants.quantize(p.numpy(), fmt), fmt)))
    ids = random_ids(40, seed=3)
    ours, expected, unquantized = model.logits(ids), hf_logits(ref, ids), hf_logits(exact, ids)
    quantization_error = rel_err(expected, unquantized)
    # quantized linears read activations as int16 per block of 32 (<= 2^-16 of the block's largest
    # value per element): about 1.5e-4 here after two layers, against 4e-2..4e-1 for the weights'
    # own rounding (llama.cpp's 8-bit activations cost 2.4% on SmolLM2)
    assert rel_err(ours, expected) < 4e-4 < quantization_error / 50


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, smollm2_transformers, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "m"
    convert(smollm2_gguf, out, quant=None)
    return edgephi.load(out), smollm2_transformers


@pytest.mark.integration
def test_smollm2_matches_transformers(smollm2):
    model, ref = smollm2
    ids = model.tokenizer.encode("<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n"
                                 "<|im_start|>assistant\n", allow_special=True)
    assert rel_err(model.logits(ids), hf_logits(ref, ids)) < 1e-2
    ours = list(model.generate_tokens(ids, max_new_tokens=32, ignore_eos=True))
    theirs = []  # greedy with transformers, never stopping early (as ignore_eos)
    for _ in range(32):
        theirs.append(int(np.argmax(hf_logits(ref, ids + theirs)[-1])))
    assert ours == theirs
