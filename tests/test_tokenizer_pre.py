"""Byte-level GGUF vocabularies by pre-tokenizer name (tokenizer.ggml.pre) against llama.cpp itself,
on vocabulary-only GGUFs, against its own test vectors, and against tiktoken's cl100k/o200k."""

import random
import unicodedata

import llama_cpp
import pytest
import regex

from edgephi.convert.gguf_reader import GGUFFile
from edgephi.convert.tokenizers import DEFAULT_PATTERN, spec_from_gguf
from edgephi.errors import EdgephiError
from edgephi.tokenizer import Tokenizer
from tests import fixtures
from tests.test_tokenizer_parity import fuzz_texts

# llama.cpp's DEFAULT pre-tokenizer (src/llama-vocab.cpp, llm_tokenizer_bpe): four regexes in turn
DEFAULT_SEQUENCE = [
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
]


def split_fuzz(n=3000, seed=1) -> list[str]:
    """Random strings over what the split rules tell apart: kinds of whitespace, ASCII and other
    digits, punctuation and symbols, letters of both cases inside and outside ASCII, marks."""
    alphabet = (list(" \t\n\r\x0b\x0c\u00a0\u3000\x85\u2028abAB'sTD0123456789.,!?/-_$+<=>^~|`@#\u0301éÉÖöΑαİı中😀ǅ١٢४")
                + ["'s", "'LL", "\r\n", "  ", "123", "1234", "ÉCOLE", "ʰ"])
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def texts(text_corpus):
    return text_corpus + fuzz_texts(700) + split_fuzz(2000)


@pytest.fixture(scope="module")
def vocab_pair():
    """(vocab, pre) -> (our Tokenizer, llama.cpp's tokenize) for byte_level_vocab_gguf(vocab, pre),
    each built once per module."""
    built = {}

    def get(vocab, pre):
        if (vocab, pre) not in built:
            path = fixtures.byte_level_vocab_gguf(vocab, pre)
            built[vocab, pre] = convert_vocab(path), llama(path)
        return built[vocab, pre]

    return get


def convert_vocab(path) -> Tokenizer:
    return Tokenizer(spec_from_gguf(GGUFFile(path), str(path)))


def llama(path):
    reference = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    return lambda text, special=False: reference.tokenize(text.encode(), add_bos=False, special=special)


def split_in_turn(text: str, expressions: list[str]) -> list[str]:
    """llama.cpp's unicode_regex_split: each regex cuts every piece into its matches and the
    text between them."""
    pieces = [text] if text else []
    for expression in expressions:
        out = []
        for piece in pieces:
            at = 0
            for m in regex.finditer(expression, piece):
                out += [piece[at:m.start()]] if m.start() > at else []
                out.append(m.group())
                at = m.end()
            out += [piece[at:]] if at < len(piece) else []
        pieces = out
    return pieces


def test_default_pattern_splits_as_llama_cpps_four_regexes(text_corpus):
    texts = text_corpus + split_fuzz(2000)
    assert [t for t in texts if regex.findall(DEFAULT_PATTERN, t) != split_in_turn(t, DEFAULT_SEQUENCE)] == []


@pytest.mark.integration
@pytest.mark.parametrize("vocab,pre", [("phi4", "dbrx"), ("phi4_mini", "gpt-4o"), ("smollm2", "default"),
                                       ("smollm2", "llama-bpe")])
def test_pre_tokenizer_matches_llama_cpp(vocab, pre, texts, vocab_pair):
    ours, reference = vocab_pair(vocab, pre)
    if pre == "gpt-4o":  # llama.cpp compiles this regex (std::regex) at every call: 4 ms a text
        corpus = fixtures.text_corpus()
        texts = corpus[:35] + corpus[35:-2:4] + corpus[-2:] + split_fuzz(400, seed=2)
    assert [t for t in texts if ours.encode(t) != reference(t)] == []
    special = {"phi4": "<|im_start|>user<|im_sep|>Hi<|im_end|>", "phi4_mini": "<|user|>Hi<|end|><|assistant|>",
               "smollm2": "<|im_start|>user\nHi<|im_end|>\n"}[vocab]
    assert ours.encode(special, allow_special=True) == reference(special, special=True)


@pytest.mark.integration
def test_llama_bpe_vocabulary_vectors():
    """llama.cpp's own Llama 3 vocabulary (llama-bpe) with its expected ids."""
    path = fixtures.llama_cpp_vocab("llama-bpe")
    ours, vectors = convert_vocab(path), fixtures.llama_cpp_vocab_tests(path)
    assert len(vectors) > 40 and [(t, ids) for t, ids in vectors if ours.encode(t) != ids] == []


@pytest.mark.integration
@pytest.mark.parametrize("vocab,pre,encoding", [("phi4", "dbrx", "cl100k_base"), ("phi4_mini", "gpt-4o", "o200k_base")])
def test_pre_tokenizer_against_tiktoken(vocab, pre, encoding, text_corpus, vocab_pair):
    """cl100k: llama.cpp's dbrx split gives tiktoken's ids on every text. o200k: llama.cpp's gpt-4o
    split (which edgephi follows for GGUF files, as test_pre_tokenizer_matches_llama_cpp checks)
    differs from tiktoken's o200k on text with combining marks, which it does not count as
    letters; elsewhere they agree."""
    (ours, reference), tik = vocab_pair(vocab, pre), fixtures.tiktoken_encoding(encoding)
    differ = [t for t in text_corpus if ours.encode(t) != tik.encode_ordinary(t)]
    if encoding == "cl100k_base":
        assert differ == []
    else:
        assert len(differ) == 2 and all(any(unicodedata.category(c).startswith("M") for c in t) for t in differ)
        assert [ours.encode(t) for t in differ] == [reference(t) for t in differ]


def test_unknown_pre_tokenizer_is_refused_by_name(tmp_path):
    path = fixtures.write_vocab_gguf(tmp_path / "v.gguf", name="x", model="gpt2", pre="qwen2",
                                     tokens=["a", "b", "ab"], types=[1, 1, 1], merges=["a b"])
    with pytest.raises(EdgephiError, match=r"pre-tokenizer 'qwen2' is not supported \(supported: .*dbrx.*gpt-4o"):
        spec_from_gguf(GGUFFile(path), str(path))
