"""The ring-buffer KV cache: constant memory for endless generation, sinks and a chat's system
prompt kept, and attention over the ring equal to attention over the same tokens with a mask."""

import numpy as np
import pytest

import edgephi
from edgephi.convert import convert
from edgephi.generate import token_stream
from edgephi.kv_cache import KVCache
from edgephi.sampling import SamplingParams

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny(checkpoint_factory, tmp_path_factory):
    src = checkpoint_factory("llama", "float32")
    out = tmp_path_factory.mktemp("ring") / "m"
    convert(src, out, quant="f32", embed_quant="f32")
    return src, out


@pytest.mark.integration
def test_two_thousand_tokens_through_a_128_slot_ring_in_flat_memory(tiny):
    model = edgephi.load(tiny[1], context=128)
    sequence = model.sequence()
    cache_bytes = sequence.cache.nbytes
    tokens = token_stream(model, sequence, [5, 6, 7], params=SamplingParams(temperature=0.9, seed=0),
                          max_new_tokens=2000, ignore_eos=True)
    rss = []
    for i, _ in enumerate(tokens):
        if i % 250 == 0:
            rss.append(_rss_mib())
    assert i == 1999
    assert sequence.next_pos == 2002  # 3 prompt tokens + 1999 fed (the last sampled is not fed)
    assert sequence.cache.nbytes == cache_bytes
    # the resident set grows by less than 20 MB after warm-up (the current one: this process's
    # peak, with torch loaded, is far above anything a tiny model adds)
    assert max(rss[1:]) - rss[1] < 20
    assert set(sequence.cache.slot_pos[:4]) == {0, 1, 2, 3}  # attention sinks are never overwritten


def test_ring_attention_equals_masked_attention_in_transformers(tiny):
    """Once the ring wraps, a token attends to the sinks plus the last C - sinks positions. That
    is a mask over the full sequence, which transformers applies given a 4-D attention mask."""
    src, out = tiny
    C, sinks, n = 24, 4, 40
    model = edgephi.load(out, context=C, kv_dtype="float32")
    ids = [int(i) for i in np.random.default_rng(0).integers(3, 500, n)]
    sequence = model.sequence()
    ours = np.concatenate([sequence.step(t).copy() for t in ids])
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, attn_implementation="eager")
    q = torch.arange(n)[:, None]
    k = torch.arange(n)[None, :]
    visible = (k <= q) & ((k < sinks) | (k > q - (C - sinks)))
    mask = torch.where(visible, 0.0, float("-inf"))[None, None]
    with torch.no_grad():
        expected = ref(torch.tensor([ids]), attention_mask=mask).logits[0].numpy()
    assert np.abs(ours - expected).max() / np.abs(expected).max() < 1e-4


@pytest.mark.integration
def test_chat_keeps_the_system_prompt_when_the_ring_wraps(tiny):
    model = edgephi.load(tiny[1], context=64)
    session = model.chat_session(system="You are terse.", max_new_tokens=30, ignore_eos=True)
    system_ids = session.template.encode(session.messages[:1], add_generation_prompt=False)
    for turn in range(6):
        session(f"turn {turn}")
    assert session.sequence.next_pos > 3 * 64
    tokens, positions, _ = session.sequence.cache.cached_tokens()
    assert list(tokens[:len(system_ids)]) == system_ids
    assert list(positions[:len(system_ids)]) == list(range(len(system_ids)))


@pytest.mark.integration
def test_ten_thousand_token_chat_in_a_256_slot_ring_keeps_memory_flat(tiny):
    """#12: a long chat costs constant memory (within 5 MB once warm) and keeps its system prompt."""
    model = edgephi.load(tiny[1], context=256)
    session = model.chat_session(system="You are a patient storyteller.", max_new_tokens=200, ignore_eos=True,
                                 temperature=0.8, seed=1)
    system_ids = session.template.encode(session.messages[:1], add_generation_prompt=False)
    rss, generated, turn = [], 0, 0
    while generated < 10_000:
        session(f"go on ({turn})")
        generated += session.last_stats.generated_tokens
        turn += 1
        rss.append(_rss_mib())
    assert session.sequence.next_pos > 10_000
    warm = rss[2]  # after two turns the ring has wrapped and every buffer exists
    assert max(rss[2:]) - warm < 5, rss
    tokens, positions, _ = session.sequence.cache.cached_tokens()
    assert list(tokens[:len(system_ids)]) == system_ids
    assert list(positions[:len(system_ids)]) == list(range(len(system_ids)))


def _cache(capacity, sinks):
    from edgephi.format import ModelConfig

    cfg = ModelConfig("llama", 8, 32, 1, 1, 1, 32, 32, 1e-5, 1e4, 32, 64, 64)
    return KVCache(cfg, capacity, sinks=sinks)


def test_truncating_a_wrapped_ring():
    """A ring of 10 slots with 2 sinks holds positions 0, 1 and the last 8. Cutting back keeps
    the positions below the cut that are still held; a cut below every held ring position is
    refused (the cache would jump from the sinks straight to it), a cut into the sinks is exact."""
    cache = _cache(10, 2)
    cache.append(np.arange(12))  # positions 0..11; 2 and 3 overwritten by 10 and 11
    held = lambda: cache.cached_tokens()[1].tolist()  # noqa: E731
    assert held() == [0, 1, 4, 5, 6, 7, 8, 9, 10, 11]
    assert cache.truncate(9)
    assert held() == [0, 1, 4, 5, 6, 7, 8] and cache.next_pos == 9
    assert not cache.truncate(3)  # position 2 is gone: nothing would lie between the sinks and 3
    assert held() == [0, 1, 4, 5, 6, 7, 8]
    cache.append(np.arange(9, 13))  # 9, 10, 11 take free slots; 12 overwrites position 4
    assert held() == [0, 1, 5, 6, 7, 8, 9, 10, 11, 12]
    assert not cache.truncate(5)  # 2, 3 and 4 are gone
    assert cache.truncate(6) and held() == [0, 1, 5]
    assert cache.truncate(1) and held() == [0]
    cache.append(np.arange(1, 5))
    assert held() == [0, 1, 2, 3, 4]  # below the sinks the cut is exact: the ring starts afresh


def _rss_mib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024


def test_kv_cache_memory_grows_with_use_not_capacity():
    """A large cache costs memory only for the slots written: one token in each of 30 layers of a
    2 x 120 MiB cache must not map huge pages (2 MiB per layer and per K/V, as np.zeros did)."""
    from edgephi.kv_cache import lazy_zeros

    before = _rss_mib()
    k = lazy_zeros((30, 8192, 256), np.uint16)
    v = lazy_zeros((30, 8192, 256), np.uint16)
    k[:, 0, :] = 1
    v[:, 0, :] = 2
    grown = _rss_mib() - before
    assert k.sum() == 30 * 256 and v[:, 1:].max() == 0
    assert grown < 8, f"{grown:.1f} MiB mapped for 60 written rows"
