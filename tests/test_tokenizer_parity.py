"""Our tiktoken-built tokenizers against outside references: Hugging Face `tokenizers` on the
checkpoint's tokenizer.json, tiktoken's own cl100k_base/o200k_base, and llama.cpp on a GGUF."""

import json
import random

import pytest

from edgephi.convert import convert
from edgephi.convert.tokenizers import spec_from_tokenizer_json
from edgephi.errors import EdgephiError
from edgephi.tokenizer import Tokenizer

tokenizers = pytest.importorskip("tokenizers")


def fuzz_texts(n=1500, seed=0) -> list[str]:
    """Random strings over the characters that split and merge rules care about."""
    alphabet = (list("aeiouAEIOU bcdxyzBCDXYZ") + list("0123456789") + [" ", "  ", "\t", "\n", "\r\n", "'s", "'LL"]
                + list(".,;:!?-_/\\'\"()[]{}<>|=+*&^%$#@~`") + list("éßøçñüÅİıЖжλΩ中文日本한국ع١२") +
                ["😀", "👍🏽", "👨‍👩‍👧", "\u0301", "\u200b", "\u00a0", "\x00", "\x04", "\x7f", "<|im_start|>"])
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def texts(text_corpus):
    return text_corpus + fuzz_texts()


@pytest.fixture(scope="module")
def phi4(checkpoint_factory, tmp_path_factory):
    src = checkpoint_factory("phi3_basic", tokenizer="phi4")
    out = tmp_path_factory.mktemp("phi4") / "m"
    convert(src, out, quant="q8_0")
    return src, Tokenizer.from_folder(out)


@pytest.fixture(scope="module")
def phi4_mini(checkpoint_factory, tmp_path_factory):
    src = checkpoint_factory("phi3_longrope", tokenizer="phi4_mini")
    out = tmp_path_factory.mktemp("phi4mini") / "m"
    convert(src, out, quant="q8_0")
    return src, Tokenizer.from_folder(out)


def mismatches(ours, reference, texts):
    return [(t, ours(t), reference(t)) for t in texts if ours(t) != reference(t)]


def has_special_text(text, specials):
    return any(s in text for s in specials)


@pytest.mark.integration
@pytest.mark.parametrize("model", ["phi4", "phi4_mini"])
def test_matches_hugging_face_tokenizers(model, request, texts):
    src, ours = request.getfixturevalue(model)
    hf = tokenizers.Tokenizer.from_file(str(src / "tokenizer.json"))
    # Hugging Face always turns special-token text into special ids: compare those texts with
    # specials allowed, the rest as ordinary text.
    ordinary = [t for t in texts if not has_special_text(t, ours.special_tokens)]
    special = [t for t in texts if has_special_text(t, ours.special_tokens)]
    assert len(ordinary) > 1500 and special
    hf_ids = lambda t: hf.encode(t, add_special_tokens=False).ids  # noqa: E731
    assert mismatches(ours.encode, hf_ids, ordinary) == []
    assert mismatches(lambda t: ours.encode(t, allow_special=True), hf_ids, special) == []


@pytest.mark.integration
@pytest.mark.parametrize("model,encoding", [("phi4", "cl100k"), ("phi4_mini", "o200k")])
def test_matches_tiktoken_on_ordinary_text(model, encoding, request, texts):
    _, ours = request.getfixturevalue(model)
    reference = request.getfixturevalue(encoding)
    assert mismatches(ours.encode, reference.encode_ordinary, texts) == []
    for t in texts[:300]:
        assert ours.decode(ours.encode(t)) == t


@pytest.mark.integration
def test_special_token_text_stays_text_unless_allowed(phi4, cl100k):
    _, ours = phi4
    text = "<|im_start|>user<|im_sep|>hi<|im_end|>"
    assert ours.encode(text) == cl100k.encode_ordinary(text)
    assert 100264 not in ours.encode(text)
    assert ours.encode(text, allow_special=True) == [100264, *cl100k.encode_ordinary("user"), 100266,
                                                     *cl100k.encode_ordinary("hi"), 100265]
    # Microsoft's own Phi-4 tokenizer test (Microsoft.ML.Tokenizers TestPhi4SpecialCases)
    assert ours.encode("<|im_start|>Hello<|im_sep|> World<|im_end|><|dummy_85|>", allow_special=True) == [
        100264, 9906, 100266, 4435, 100265, 100349]


@pytest.mark.integration
def test_gguf_tokenizer_matches_llama_cpp(smollm2_gguf, tmp_path, texts):
    llama_cpp = pytest.importorskip("llama_cpp")
    reference = llama_cpp.Llama(str(smollm2_gguf), vocab_only=True, verbose=False)
    convert(smollm2_gguf, tmp_path / "m", quant=None)
    ours = Tokenizer.from_folder(tmp_path / "m")

    def llama_ids(text):
        return reference.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    assert mismatches(ours.encode, llama_ids, texts) == []
    special = "<|im_start|>user\nHi<|im_end|>\n"
    assert ours.encode(special, allow_special=True) == reference.tokenize(special.encode(), add_bos=False,
                                                                          special=True)


def test_byte_fallback_vocabulary_without_byte_tokens_is_refused_clearly(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "byte_fallback": True, "vocab": {"<unk>": 0}, "merges": []},
        "normalizer": None, "pre_tokenizer": None, "added_tokens": []}))
    with pytest.raises(EdgephiError, match=r"tokenizer\.json: SentencePiece vocabulary not supported: it lacks the "
                                           r"byte token <0x00>"):
        spec_from_tokenizer_json(tmp_path / "tokenizer.json")
