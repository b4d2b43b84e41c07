"""Phi-3's SentencePiece BPE vocabulary (byte fallback), from GGUF and from tokenizer.json, against
llama.cpp (its ggml-vocab-phi-3.gguf, test vectors and tokenize/detokenize) and against Hugging
Face (tokenizers on the tokenizer.json transformers converts that GGUF into; transformers' decode)."""

import json
import random

import llama_cpp
import pytest
import tokenizers
import transformers

from edgephi.chat_template import ChatTemplate
from edgephi.convert import convert
from edgephi.convert.gguf_reader import GGUFFile
from edgephi.convert.tokenizers import spec_from_gguf, spec_from_tokenizer_json
from edgephi.errors import EdgephiError
from edgephi.generate import text_stream
from edgephi.model_folder import read_model_folder
from edgephi.tokenizer import Tokenizer
from edgephi.tokenizer_files import bytes_to_unicode
from tests import fixtures
from tests.test_tokenizer_parity import fuzz_texts

PHI3_SPECIALS = ["<|user|>", "<|end|>", "<|assistant|>", "<|system|>", "<|endoftext|>", "<s>", "</s>", "<unk>",
                 "[PAD32011]"]


def hard_cases() -> list[str]:
    """Where SentencePiece's space prefix, whitespace runs, byte fallback and special tokens meet."""
    cases = ["", " ", "  ", "\t", "\n", "\n\n\n", " \n ", "\r\n", "\t\tx", "▁", "▁▁a", " ▁ ", "a▁b", "trailing  ",
             "  leading", "中文文本，包含标点。日本語のテキスト", "😀🎉👍🏽", "\x00\x01\x1f\x7f", "a\u200bb\ufeff",
             "\U0010fffd\U000e0001", "<|user|>", "<|user|>\nHi<|end|>\n<|assistant|>\n", "x<|end|> y", "x <|end|>y",
             "<|end|>\u3000y", "<|end|>\u00a0y", "<|end|>\t\n y", "<s>hi", "<s> hi", "a</s> b", "[PAD32011] x",
             "<|endoftext|> x", "<unk>  x", "<|user|><|end|>", "<|user|> <|end|>", "<|not_a_token|>"]
    cases += [" " * k for k in range(1, 81)] + [" " * k + "x" for k in range(1, 41)]
    cases += ["x" + " " * k + "y" for k in range(1, 41)] + ["\t" * k for k in (1, 2, 5)]
    return cases


def spm_fuzz(n=1500, seed=3) -> list[str]:
    """Random strings mixing special tokens with whitespace of every kind, on both sides."""
    alphabet = (list(" \t\n\r\u3000\u00a0\u2003▁aZé中😀\x00,.!") + ["  ", "Hi", " the", "123"]
                + PHI3_SPECIALS + ["<|", "|>", "<s", "/s>"])
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25))) for _ in range(n)]


@pytest.fixture(scope="module")
def texts(text_corpus):
    return hard_cases() + text_corpus + fuzz_texts(500) + spm_fuzz()


@pytest.fixture(scope="module")
def phi3():
    return fixtures.llama_cpp_vocab("phi-3")


@pytest.fixture(scope="module")
def llama(phi3):
    reference = llama_cpp.Llama(str(phi3), vocab_only=True, verbose=False)
    return lambda text, special=False: reference.tokenize(text.encode(), add_bos=False, special=special)


def saved(spec, folder) -> Tokenizer:
    """The tokenizer as a model folder holds it: saved, then loaded back."""
    folder.mkdir(parents=True, exist_ok=True)
    spec.check(str(folder))
    spec.save(folder)
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def from_gguf(phi3, tmp_path_factory):
    return saved(spec_from_gguf(GGUFFile(phi3), str(phi3)), tmp_path_factory.mktemp("phi3-gguf"))


@pytest.fixture(scope="module")
def from_json(tmp_path_factory):
    """flags -> (ours, tokenizers' Tokenizer, transformers' tokenizer) for the tokenizer.json that
    transformers makes of ggml-vocab-phi-3.gguf, with its own strip flags ("transformers": none)
    or with Microsoft's ("microsoft": rstrip on the chat tokens)."""
    built = {}

    def get(flags):
        if flags not in built:
            folder = fixtures.phi3_tokenizer_json(tmp_path_factory.mktemp(f"phi3-{flags}"), flags == "microsoft")
            ours = saved(spec_from_tokenizer_json(folder / "tokenizer.json"), folder / "edgephi")
            built[flags] = (ours, tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")),
                            transformers.TokenizersBackend(tokenizer_file=str(folder / "tokenizer.json"),
                                                           bos_token="<s>", eos_token="<|endoftext|>"))
        return built[flags]

    return get


def has_special(text: str) -> bool:
    return any(s in text for s in PHI3_SPECIALS)


# ---------------------------------------------------------------------------------------------
# GGUF: llama.cpp


@pytest.mark.parametrize("name", ["phi-3", "llama-spm"])
def test_llama_cpp_test_vectors(name, tmp_path):
    path = fixtures.llama_cpp_vocab(name)
    ours, vectors = saved(spec_from_gguf(GGUFFile(path), str(path)), tmp_path), fixtures.llama_cpp_vocab_tests(path)
    assert len(vectors) > 40 and [(t, ids) for t, ids in vectors if ours.encode(t) != ids] == []


@pytest.mark.integration
def test_gguf_matches_llama_cpp(from_gguf, llama, texts):
    """Ordinary text as llama.cpp tokenizes it with special=False (it then splits no token of
    this vocabulary), and with special tokens allowed as with special=True (Phi-3's chat tokens
    swallow the whitespace after them)."""
    assert [t for t in texts if from_gguf.encode(t) != llama(t)] == []
    assert [t for t in texts if from_gguf.encode(t, allow_special=True) != llama(t, special=True)] == []
    specials = set(from_gguf.special_tokens.values())
    assert not any(specials & set(from_gguf.encode(t)) for t in texts)


def test_chat_text_after_special_tokens(from_gguf, llama):
    text = "<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert from_gguf.encode(text, allow_special=True) == llama(text, special=True) == [32010, 6324, 32007, 32001]


# ---------------------------------------------------------------------------------------------
# tokenizer.json: Hugging Face


@pytest.mark.integration
@pytest.mark.parametrize("flags", ["transformers", "microsoft"])
def test_tokenizer_json_matches_hugging_face(flags, from_json, llama, texts):
    ours, hf, _ = from_json(flags)
    hf_ids = lambda t: hf.encode(t, add_special_tokens=False).ids  # noqa: E731
    assert [t for t in texts if ours.encode(t, allow_special=True) != hf_ids(t)] == []
    # Hugging Face always splits added tokens out: ordinary text with special-token strings in it
    # is compared with llama.cpp, which splits none of them with special=False
    assert [t for t in texts if not has_special(t) and ours.encode(t) != hf_ids(t)] == []
    assert [t for t in texts if has_special(t) and ours.encode(t) != llama(t)] == []


@pytest.mark.integration
def test_where_llama_cpp_and_hugging_face_disagree(from_gguf, from_json, llama, texts):
    """With Microsoft's flags the two agree but for two things, where each edgephi tokenizer
    follows its own source: llama.cpp also splits out the [PAD...] tokens (unknown type in the
    GGUF, plain vocabulary in tokenizer.json), and llama.cpp's rstrip drops ASCII whitespace only
    (C isspace), Hugging Face's all Unicode whitespace."""
    ours_json, hf, _ = from_json("microsoft")
    differ = [t for t in texts if llama(t, special=True) != hf.encode(t, add_special_tokens=False).ids]
    assert differ and all("[PAD32011]" in t or any(c in t for c in "\u3000\u00a0\u2003") for t in differ)
    assert [t for t in differ if from_gguf.encode(t, allow_special=True) != llama(t, special=True)] == []
    hf_ids = [hf.encode(t, add_special_tokens=False).ids for t in differ]
    assert [t for t, ids in zip(differ, hf_ids) if ours_json.encode(t, allow_special=True) != ids] == []


@pytest.mark.integration
@pytest.mark.parametrize("scheme,split", [("first", True), ("never", False)])
def test_metaspace_pre_tokenizer(scheme, split, from_json, tmp_path):
    """Phi-3's vocabulary with a Metaspace pre-tokenizer (as newer Llama-style tokenizer.json have)
    in place of the normalizer: a prefix only where a fragment does not start with a space, only
    on the first fragment ("first"), or never; split cuts before every "▁"."""
    data = json.loads(from_json("microsoft")[1].to_str())
    data.update(normalizer=None, pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme,
                                                "split": split})
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    ours, hf = Tokenizer(spec_from_tokenizer_json(path)), tokenizers.Tokenizer.from_file(str(path))
    texts = hard_cases() + spm_fuzz(400)
    assert [t for t in texts if ours.encode(t, allow_special=True) != hf.encode(t, add_special_tokens=False).ids] == []


# ---------------------------------------------------------------------------------------------
# Decoding and streaming: transformers


def decodable_slices(ids: list[int], hf_tokens, rng, n=3):
    """ids and a few slices of it that do not cut a character's byte tokens (transformers'
    ByteFallback turns a run of byte tokens that is not valid UTF-8 into one U+FFFD per byte,
    where edgephi, as Python's decoder, replaces only the invalid part)."""
    out = [ids]
    for _ in range(n):
        a = rng.randint(0, len(ids))
        b = rng.randint(a, len(ids))
        run, ok = b"", True
        for token in hf_tokens(ids[a:b]) + ["end"]:
            if token.startswith("<0x") and len(token) == 6:
                run += bytes([int(token[3:5], 16)])
                continue
            try:
                run.decode("utf-8")
            except UnicodeDecodeError:
                ok = False
            run = b""
        if ok:
            out.append(ids[a:b])
    return out


@pytest.mark.integration
@pytest.mark.parametrize("source", ["gguf", "json"])
def test_decode_and_stream_match_transformers(source, from_gguf, from_json, text_corpus):
    ours = from_gguf if source == "gguf" else from_json("microsoft")[0]
    hf = from_json("transformers")[2]
    rng = random.Random(0)
    for text in hard_cases() + text_corpus:
        ids = ours.encode(text, allow_special=True)
        for piece in decodable_slices(ids, hf.convert_ids_to_tokens, rng):
            want = hf.decode(piece)
            assert ours.decode(piece) == want, (text, piece)
            assert "".join(text_stream(ours, iter(piece))) == want, (text, piece)


# ---------------------------------------------------------------------------------------------
# The Phi-3 presets end to end: convert, chat template, stops


@pytest.fixture(scope="module")
def phi3_model(phi3, tmp_path_factory):
    """preset -> a model folder converted from a tiny phi3 GGUF carrying Phi-3's vocabulary (None:
    no preset, the GGUF's own chat template and stops)."""
    tmp = tmp_path_factory.mktemp("phi3-model")
    gguf = fixtures.write_tiny_phi3_gguf(tmp / "tiny.gguf", phi3)
    built = {}

    def get(preset):
        if preset not in built:
            convert(gguf, tmp / str(preset), quant=None, preset=preset)
            built[preset] = read_model_folder(tmp / str(preset))
        return built[preset]

    return get


CONVERSATION = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."},
                {"role": "user", "content": "  And of Germany?\n"}]


@pytest.mark.parametrize("preset", ["phi-3-mini-4k-instruct", "phi-3.5-mini-instruct", None])
def test_preset_prompt_ids(preset, phi3_model, llama, from_json):
    """The chat template (a preset's, or with None the GGUF's own, which starts with {{ bos_token }})
    renders as transformers renders it, and its text tokenizes as llama.cpp and Hugging Face
    tokenize it (without a BOS of their own, as transformers' apply_chat_template adds none);
    <|end|> ends a turn."""
    model = phi3_model(preset)
    source = model.generation["chat_template"]
    template = ChatTemplate(source, model.tokenizer, model.generation)
    text = template.render(CONVERSATION, add_generation_prompt=True)
    hf = from_json("microsoft")[2]
    assert text == hf.apply_chat_template(CONVERSATION, chat_template=source, add_generation_prompt=True,
                                          tokenize=False)
    ids = model.tokenizer.encode(text, allow_special=True)
    assert ids == llama(text, special=True)
    assert ids == hf.apply_chat_template(CONVERSATION, chat_template=source, add_generation_prompt=True,
                                         tokenize=True, return_dict=False)
    assert (ids[0] == 1) == (preset is None)  # <s> only where the template writes it
    assert model.tokenizer.special_tokens["<|end|>"] in model.generation["eos_token_ids"]


@pytest.mark.parametrize("preset", ["phi-3-mini-4k-instruct"])
def test_chat_session_prompt_ids(preset, phi3_model, llama):
    model = phi3_model(preset)
    template = ChatTemplate(model.generation["chat_template"], model.tokenizer, model.generation)
    text = template.render(CONVERSATION, add_generation_prompt=True)
    assert template.encode(CONVERSATION, add_generation_prompt=True) == llama(text, special=True)


# ---------------------------------------------------------------------------------------------
# Refusals and the file format


BYTES = [f"<0x{b:02X}>" for b in range(256)]


def tiny_json(tmp_path, merges=(("▁", "a"), ("a", "b"), ("▁a", "b"), ("▁", "ab")), **changes):
    """A small tokenizer.json of Phi-3's layout: <unk>, <s>, the byte tokens, a few pieces."""
    data = {"model": {"type": "BPE", "byte_fallback": True, "vocab": {t: i for i, t in enumerate(
        ["<unk>", "<s>", *BYTES, "▁", "a", "b", "▁a", "ab", "▁ab"])}, "merges": [list(m) for m in merges]},
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": None, "added_tokens": [{"id": 1, "content": "<s>", "special": True}], **changes}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    return tmp_path / "tokenizer.json"


def test_bad_vocabularies_are_refused_in_one_line(tmp_path):
    tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab"]
    path = fixtures.write_vocab_gguf(tmp_path / "v.gguf", name="x", model="llama", tokens=tokens,
                                     types=[2, 3, 3, 1, 1, 1], scores=[0.0, 0.0, 0.0, -1.0, -2.0, -0.5])
    with pytest.raises(EdgephiError, match=r"^[^\n]*v\.gguf: SentencePiece vocabulary not supported: it lacks the "
                                           r"byte token <0x00>[^\n]*$"):
        spec_from_gguf(GGUFFile(path), str(path))
    spec_from_tokenizer_json(tiny_json(tmp_path))  # the tiny vocabulary itself is fine
    refusals = {
        "is normalized": dict(added_tokens=[{"id": 1, "content": "<s>", "normalized": True}]),
        "merges making '▁a' are not consecutive": dict(merges=[("▁", "a"), ("a", "b"), ("▁", "a")]),
        "merges lack '▁' \\+ 'ab'": dict(merges=[("▁", "a"), ("a", "b"), ("▁a", "b")]),
        "normalizer": dict(normalizer={"type": "NFKC"}),
    }
    for problem, change in refusals.items():
        with pytest.raises(EdgephiError, match=rf"^[^\n]*tokenizer\.json: [^\n]*{problem}[^\n]*$"):
            spec_from_tokenizer_json(tiny_json(tmp_path, **change))


def test_byte_level_files_keep_format_version_1(phi3, from_gguf, tmp_path):
    """Folders converted before SentencePiece support still load, and byte-level folders written
    now still load in an edgephi that predates it (it refuses version 2, which SentencePiece
    folders carry, rather than misreading them)."""
    path = fixtures.write_vocab_gguf(tmp_path / "v.gguf", name="x", model="gpt2", pre="gpt-2", merges=[],
                                     tokens=list(bytes_to_unicode().values()), types=[1] * 256)
    saved(spec_from_gguf(GGUFFile(path), str(path)), tmp_path / "smollm2")
    spec = json.loads((tmp_path / "smollm2" / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["version"] == 1 and "kind" not in spec
    saved(spec_from_gguf(GGUFFile(phi3), str(phi3)), tmp_path / "phi3")
    spec = json.loads((tmp_path / "phi3" / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["version"] == 2 and spec["kind"] == "sentencepiece-bpe"
