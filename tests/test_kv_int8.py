"""The int8 KV cache (kv_dtype="int8": a float16 scale per 16 values, the same bytes as llama.cpp's
q8_0 cache, 0.56 of float16's) on Phi's real attention shapes over 2048 tokens, against a float32
cache. Measured: 7.5e-3 (Phi-3-mini's heads) and 8.8e-3 (Phi-4-mini's) of the logits' largest
magnitude, against 4e-4 for float16. Before, with q8_0's own layout (a float32 scale per 32
values, largest magnitude / 127), they were 0.98e-2 and 1.03e-2: each value's rounding carries
into attention's output at about its share of the block's largest, and halving the blocks and
trying 16 scales per block (kv_int8.py) cut that by a quarter. #15 asks for 1e-2. The kernels'
exactness against the dequantized cache is tests/test_kernels.py's."""

from __future__ import annotations

import numpy as np
import pytest

import edgephi
from edgephi.convert import convert
from tests.fixtures import rel_err, write_tiny_tokenizer

pytestmark = pytest.mark.integration

TOKENS = 2048
# the attention of Phi-3-mini (32 heads of 96, full rotary) and Phi-4-mini (24 query heads over 8
# KV heads of 128, rotary on 96 dims); two layers, a narrow MLP and a 512-token vocabulary
SHAPES = {
    "phi3-mini": dict(hidden_size=3072, num_attention_heads=32, num_key_value_heads=32,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "phi4-mini": dict(hidden_size=3072, num_attention_heads=24, num_key_value_heads=8,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75}),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def phi_shaped(request, tmp_path_factory):
    import torch
    import transformers

    folder = tmp_path_factory.mktemp(request.param)
    config = transformers.Phi3Config(vocab_size=512, intermediate_size=512, num_hidden_layers=2,
                                     max_position_embeddings=4096, initializer_range=0.02, bos_token_id=1,
                                     eos_token_id=2, pad_token_id=0, **SHAPES[request.param])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.Phi3ForCausalLM(config).eval()
    model.save_pretrained(folder / "hf")
    write_tiny_tokenizer(folder / "hf", 512)
    convert(folder / "hf", folder / "m", quant="q8_0")
    return folder / "m"


def test_int8_kv_logits_stay_within_a_percent_of_float32(phi_shaped):
    ids = [int(i) for i in np.random.default_rng(1).integers(3, 512, TOKENS)]
    logits = {dtype: edgephi.load(phi_shaped, context=TOKENS + 8, kv_dtype=dtype).logits(ids)
              for dtype in ("float32", "float16", "int8")}
    late = slice(TOKENS - 256, TOKENS)  # the last positions attend over the whole cache
    err_int8 = rel_err(logits["int8"][late], logits["float32"][late])
    err_f16 = rel_err(logits["float16"][late], logits["float32"][late])
    print(f"{phi_shaped.parent.name}: int8 KV {err_int8:.2e}, float16 KV {err_f16:.2e} relative to float32 KV")
    assert err_int8 < 1e-2
    assert err_int8 > err_f16  # the comparison sees the cache: int8 rounds far more than float16


def test_int8_kv_bytes_are_values_and_block_scales(phi_shaped):
    f16 = edgephi.load(phi_shaped, context=256, kv_dtype="float16")
    int8 = edgephi.load(phi_shaped, context=256, kv_dtype="int8")
    cfg = f16.config
    assert f16.kv_bytes() == 256 * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    assert int8.kv_bytes() == 256 * cfg.num_layers * 2 * cfg.num_kv_heads * (cfg.head_dim + 2 * cfg.head_dim // 16)
    sequence = int8.sequence()
    assert sequence.cache.nbytes == int8.kv_bytes()
