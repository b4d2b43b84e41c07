"""Vocabularies (Hugging Face tokenizer.json, GGUF metadata) -> a tiktoken spec.

Byte-level BPE (tokenizer.json ByteLevel, GGUF gpt2): tiktoken merges the adjacent pair whose
concatenated bytes has the lowest id, which equals Hugging Face's merge-list priority when every
merge's result has a higher id than the merges before it; the converter checks that and refuses
vocabularies where it fails. The split regex comes from the pre-tokenizer (GGUF: its llama.cpp name).
SentencePiece BPE with byte fallback (tokenizer.json BPE with byte_fallback, GGUF llama; Phi-3/3.5)
is read here into a SentencePieceVocab, which edgephi/tokenizer_spm_build.py turns into a spec.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from edgephi.errors import EdgephiError
from edgephi.files import Fields, brief, parse_json, read_text
from edgephi.tokenizer_files import BYTE_DECODER, TokenizerSpec
from edgephi.tokenizer_spm_build import (SPACE, SentencePieceVocab, build_spec, order_from_merges, order_from_scores,
                                         refuse)

MAX_TOKEN_ID = (1 << 31) - 1  # tiktoken keeps ranks in 32 bits
# Hugging Face ByteLevel(use_regex=True) and llama.cpp's "gpt-2" pre-tokenizer.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits(individual_digits) then GPT-2 as one regex: each digit is its own piece, and the
# whitespace rule treats a digit like the end of the text, as the two-pass split does.
DIGITS_THEN_GPT2_PATTERN = (
    r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
)
# Llama 3's split as llama.cpp writes it, for "llama-bpe", "llama3" and "dbrx" (Phi-4's GGUFs): it is
# cl100k_base's split without possessive quantifiers (which Oniguruma, in Hugging Face tokenizers,
# misreads), and the tests check it gives tiktoken's cl100k pieces.
LLAMA3_PATTERN = (
    r"""(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# llama.cpp's "gpt-4o" (Phi-4-mini's GGUFs): o200k's split as llama.cpp adapts it, which is not
# tiktoken's o200k: its letter runs are `(?=\p{L})[^a-z]` / `(?=\p{L})[^A-Z]`, so combining marks
# (\p{M}) are not letters and a non-ASCII letter counts as upper and lower case alike. The class
# intersections below say the same without lookarounds. Follows llama.cpp, which runs these files.
_CONTRACTION = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
GPT4O_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{L}&&[^a-z]]*[\p{L}&&[^A-Z]]+" + _CONTRACTION,
    r"[^\r\n\p{L}\p{N}]?[\p{L}&&[^a-z]]+[\p{L}&&[^A-Z]]*" + _CONTRACTION,
    r"\p{N}{1,3}", r" ?[^\s\p{L}\p{N}]+[\r\n/]*", r"\s*[\r\n]+", r"\s+(?!\S)", r"\s+",
])
# llama.cpp's "default" (gpt2-type vocabularies without a known pre-tokenizer) splits with four
# regexes in turn, each cutting every piece into its matches and the text between them:
#   1. [\p{P}$+<=>^~|]+   2. GPT-2's regex without its final \s+   3. \p{N}+   4. [0-9][0-9][0-9]
# As one regex: punctuation runs (1) come first, so a contraction's ' is cut off and no other
# piece holds punctuation; whitespace before punctuation ends a piece as the end of the text does
# (\s+(?!\S) at the end of a piece from 1); a space before a number, which 2 joins to it and 3 cuts
# off, is a piece of its own; a number is cut into runs of three ASCII digits and what lies between
# them (4); the last \s is the single whitespace character 2 leaves unmatched.
_PUNCT = r"\p{P}$+<=>^~|"
DEFAULT_PATTERN = (
    rf"[{_PUNCT}]+| ?\p{{L}}+| (?=\p{{N}})|[0-9]{{3}}|(?:(?![0-9]{{3}})\p{{N}})+| ?[^\s\p{{L}}\p{{N}}{_PUNCT}]+"
    rf"|\s+(?![^\s{_PUNCT}])|\s"
)
# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) whose split this spec can express.
GGUF_PRE_PATTERNS = {
    "default": DEFAULT_PATTERN,
    "gpt-2": GPT2_PATTERN,
    "dbrx": LLAMA3_PATTERN,
    "llama-bpe": LLAMA3_PATTERN,
    "llama3": LLAMA3_PATTERN,
    "gpt-4o": GPT4O_PATTERN,
    **{name: DIGITS_THEN_GPT2_PATTERN
       for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")},
}


# str.translate table: each byte-level character -> the Latin-1 character of its byte; the other
# Latin-1 characters are deleted, so that a token holding one comes out shorter than it went in
_TO_LATIN1 = {**{b: None for b in range(256)}, **{ord(c): b for c, b in BYTE_DECODER.items()}}


def token_bytes(token: str, where: str) -> bytes:
    latin1 = token.translate(_TO_LATIN1)
    try:
        if len(latin1) == len(token):
            return latin1.encode("latin-1")
    except UnicodeEncodeError:
        pass
    raise EdgephiError(f"{where}: token {brief(token)} is not in the byte-level alphabet")


def ranks_from_vocab(vocab: dict[str, int], merges: list[tuple[str, str]], where: str) -> dict[bytes, int]:
    """Byte-level vocab + merge list -> tiktoken ranks, checking that ids follow merge priority."""
    if not vocab:
        raise EdgephiError(f"{where}: the vocabulary is empty")
    ranks: dict[bytes, int] = {}
    for token, tid in vocab.items():
        b = token_bytes(token, where)
        if b in ranks:
            raise EdgephiError(f"{where}: two tokens decode to the same bytes {b!r}"[:300])
        ranks[b] = tid
    if len(set(ranks.values())) != len(ranks):  # tiktoken needs one token per id
        raise EdgephiError(f"{where}: two tokens share one id")
    last = -1
    for i, (left, right) in enumerate(merges):
        merged = vocab.get(left + right)
        if merged is None:
            raise EdgephiError(f"{where}: merge {i} ({brief(left)} {brief(right)}) makes a token not in the "
                               "vocabulary")
        if merged < last:  # several merges may make one token (TikTokenConverter lists every split)
            raise EdgephiError(
                f"{where}: token ids do not follow merge order (merge {i} makes id {merged} after id {last}); "
                "tiktoken cannot express this vocabulary")
        last = merged
    return ranks


def make_spec(name: str, pattern: str, ranks: dict[bytes, int], special: dict[str, int]) -> TokenizerSpec:
    """tiktoken needs every single byte; bytes the vocabulary lacks get ids past its end, which
    the runtime drops (Hugging Face tokenizers and llama.cpp drop such bytes too)."""
    n_vocab = max(max(ranks.values()), max(special.values(), default=-1)) + 1
    ranks = dict(ranks)
    for b in range(256):
        ranks.setdefault(bytes([b]), n_vocab + b)
    return TokenizerSpec(name, pattern, ranks, special, n_vocab)


def _merge_pairs(raw, where: str, strings_only: bool = False) -> list[tuple[str, str]]:
    # tokenizers < 0.20 wrote "a b" strings, newer versions write ["a", "b"] pairs; GGUF has strings.
    if not isinstance(raw, list):
        raise EdgephiError(f"{where}: merges must be a list, got {type(raw).__name__}")
    if all(type(m) is str for m in raw):  # the common case, checked in bulk
        pairs = [tuple(m.split(" ", 1)) for m in raw]
        if all(len(p) == 2 for p in pairs):
            return pairs
    pairs = []
    for i, m in enumerate(raw):
        pair = tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) if isinstance(m, list) else ()
        if (strings_only and not isinstance(m, str)) or len(pair) != 2 or not all(isinstance(x, str) for x in pair):
            raise EdgephiError(f"{where}: malformed merges list (entry {i} is {brief(m)})")
        pairs.append(pair)
    return pairs


def _step(value, where: str, what: str) -> Fields:
    """One pre-tokenizer step: a JSON object with a string `type`."""
    step = Fields(value, where, f"{what}.")
    step.string("type")
    return step


def _hf_pattern(pre, where: str) -> str:
    """The tiktoken regex equivalent to a Hugging Face byte-level pre-tokenizer (a JSON object or null)."""
    if pre is None:
        raise EdgephiError(f"{where}: pre-tokenizer None is not byte-level BPE")
    top = _step(pre, where, "pre_tokenizer")
    if top.data["type"] == "Sequence":
        steps = [_step(s, where, f"pre_tokenizer.pretokenizers[{i}]")
                 for i, s in enumerate(top.array("pretokenizers", []))]
    else:
        steps = [top]
    kinds = [s.data["type"] for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None:
        raise EdgephiError(f"{where}: pre-tokenizer {brief(kinds or None)} is not byte-level BPE")
    if byte_level.boolean("add_prefix_space", False):
        raise EdgephiError(f"{where}: ByteLevel add_prefix_space is not supported")
    regex_in_byte_level = byte_level.boolean("use_regex", True)
    head = steps[:-1]
    if not head and regex_in_byte_level:
        return GPT2_PATTERN
    if (len(head) == 1 and kinds[0] == "Digits" and head[0].boolean("individual_digits", False)
            and regex_in_byte_level):
        return DIGITS_THEN_GPT2_PATTERN
    if len(head) == 1 and kinds[0] == "Split" and not regex_in_byte_level:
        split = head[0]
        pattern = split.object("pattern")
        if ("Regex" in pattern.data and split.string("behavior", None, optional=True) == "Isolated"
                and not split.boolean("invert", False)):
            return pattern.string("Regex")
    raise EdgephiError(f"{where}: pre-tokenizer sequence {brief(kinds)} is not supported")


def _added_tokens(data: Fields) -> dict[str, int]:
    """added_tokens: [{"content": str, "id": int, ...}] -> content -> id."""
    added = {}
    for i, entry in enumerate(data.array("added_tokens", [])):
        token = Fields(entry, data.where, f"added_tokens[{i}].")
        content = token.string("content")
        added[content] = token.integer("id", low=0, high=MAX_TOKEN_ID)
    return added


def _vocab(model: Fields) -> dict[str, int]:
    vocab = model.object("vocab").data
    for token, tid in vocab.items():
        if not isinstance(tid, int) or isinstance(tid, bool) or not 0 <= tid <= MAX_TOKEN_ID:
            model.fail(f"vocab[{brief(token)}]", f"must be a token id (an integer from 0), got {brief(tid)}")
    return vocab


def spec_from_tokenizer_json(path: Path) -> TokenizerSpec:
    where = str(path)
    data = Fields(parse_json(read_text(path), f"{where}: cannot read tokenizer", dict), where)
    model = data.object("model")
    kind, byte_fallback = model.data.get("type"), model.data.get("byte_fallback")
    if byte_fallback not in (None, False, True):
        model.fail("byte_fallback", f"must be true or false, got {brief(byte_fallback)}")
    if kind != "BPE":
        raise EdgephiError(f"{where}: tokenizer model {brief(kind)} is not BPE")
    if byte_fallback:
        return build_spec(_spm_vocab_from_json(data, model, Path(path).parent.name or "tokenizer"), where)
    normalizer = data.data.get("normalizer")
    if normalizer is not None and not isinstance(normalizer, dict):
        data.fail("normalizer", f"must be a JSON object or null, got {type(normalizer).__name__}")
    if normalizer:
        kind = normalizer.get("type")
        raise EdgephiError(f"{where}: tokenizer normalizer {kind[:60] if isinstance(kind, str) else brief(kind)} "
                           "is not supported")
    pattern = _hf_pattern(data.data.get("pre_tokenizer"), where)
    added = _added_tokens(data)
    vocab = {tok: i for tok, i in _vocab(model).items() if tok not in added}
    ranks = ranks_from_vocab(vocab, _merge_pairs(model.data.get("merges", []), where), where)
    return make_spec(Path(path).parent.name or "tokenizer", pattern, ranks, added)


def _string_list(gguf, key: str, where: str) -> list[str]:
    values = gguf.get(key)
    if values is None:
        return []
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise EdgephiError(f"{where}: GGUF metadata {key} must be an array of strings")
    return values


def _token_types(gguf, tokens: list[str], where: str) -> list[int]:
    types = gguf.get("tokenizer.ggml.token_type")
    if types is None:
        types = [1] * len(tokens)
    if (not isinstance(types, list) or len(types) != len(tokens)
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in types)):
        raise EdgephiError(f"{where}: GGUF metadata tokenizer.ggml.token_type must be an array of "
                           f"{len(tokens)} integers, one per token")
    return types


def spec_from_gguf(gguf, where: str) -> TokenizerSpec:
    kind = gguf.get("tokenizer.ggml.model")
    if kind == "llama":
        return build_spec(_spm_vocab_from_gguf(gguf, where), where)
    if kind != "gpt2":
        raise EdgephiError(f"{where}: tokenizer type {brief(kind)} is not supported")
    pre = gguf.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str) or pre not in GGUF_PRE_PATTERNS:
        raise EdgephiError(f"{where}: pre-tokenizer {brief(pre)} is not supported "
                           f"(supported: {', '.join(sorted(GGUF_PRE_PATTERNS))})")
    tokens = _string_list(gguf, "tokenizer.ggml.tokens", where)
    types = _token_types(gguf, tokens, where)
    special = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (3, 4)}  # control, user
    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind not in (3, 4)}
    merges = _merge_pairs(_string_list(gguf, "tokenizer.ggml.merges", where), where, strings_only=True)
    ranks = ranks_from_vocab(vocab, merges, where)
    name = gguf.get("general.name", "gguf")
    return make_spec(name if isinstance(name, str) else "gguf", GGUF_PRE_PATTERNS[pre], ranks, special)



# ---------------------------------------------------------------------------------------------
# SentencePiece BPE with byte fallback (Phi-3/3.5)

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's token types
C_SPACE = " \t\n\v\f\r"  # C's isspace: what llama.cpp's lstrip/rstrip drop
# Unicode White_Space (Rust's char::is_whitespace): what Hugging Face's lstrip/rstrip drop
UNICODE_SPACE = C_SPACE + "\x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-F]{2})>")  # as llama.cpp and Hugging Face spell them


def _byte_tokens(pieces: dict[int, str], where: str) -> list[int]:
    """The ids of <0x00> .. <0xFF> (byte fallback needs all 256)."""
    found = {}
    for i, text in pieces.items():
        m = _BYTE_TOKEN.fullmatch(text)
        if m:
            found.setdefault(int(m.group(1), 16), i)
    missing = [b for b in range(256) if b not in found]
    if missing:
        raise refuse(where, f"it lacks the byte token <0x{missing[0]:02X}> (byte fallback needs all 256)")
    return [found[b] for b in range(256)]


def _spm_vocab_from_gguf(gguf, where: str) -> SentencePieceVocab:
    """llama.cpp's SPM vocabulary: pieces merge by score, any non-normal token but a byte token
    is special, and Phi-3's chat tokens swallow the whitespace after them (llama.cpp sets RSTRIP
    by general.name, so this reads the same key)."""
    tokens = _string_list(gguf, "tokenizer.ggml.tokens", where)
    types = _token_types(gguf, tokens, where)
    scores = gguf.get("tokenizer.ggml.scores")
    if (not isinstance(scores, list) or len(scores) != len(tokens)
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in scores)):
        raise refuse(where, f"tokenizer.ggml.scores must be {len(tokens)} finite numbers, one per token")
    byte_tokens = _byte_tokens({i: t for i, t in enumerate(tokens) if types[i] == BYTE}, where)
    special = {t: i for i, t in enumerate(tokens) if types[i] in (UNKNOWN, CONTROL, USER_DEFINED)}
    chars = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL and len(t) == 1}
    odd = [t for i, t in enumerate(tokens) if types[i] != NORMAL and len(t) == 1]
    if odd:
        raise refuse(where, f"single-character token {brief(odd[0])} is not a normal token")
    _refuse_formable_specials(tokens, types, where)
    multi = [i for i, t in enumerate(tokens) if types[i] == NORMAL and len(t) > 1]
    order = order_from_scores(tokens, multi, scores, where)
    name = gguf.get("general.name", "gguf")
    name = name if isinstance(name, str) else "gguf"
    rstrip = set()
    if "phi-3" in name.lower() or "phi3" in name.lower():  # llama.cpp's rule (llama-vocab.cpp)
        rstrip = {t for t in special if t not in ("<unk>", "<s>", "<|endoftext|>")}
        rstrip |= {"</s>"} & set(special)
    prefix = gguf.get("tokenizer.ggml.add_space_prefix", True)
    if not isinstance(prefix, bool):
        raise refuse(where, "tokenizer.ggml.add_space_prefix must be true or false")
    return SentencePieceVocab(name, tokens, chars, order, byte_tokens, special, rstrip=rstrip, strip_chars=C_SPACE,
                              space_prefix="every" if prefix else "none", strip_leading_space=prefix)


def _refuse_formable_specials(tokens: list[str], types: list[int], where: str) -> None:
    """llama.cpp merges toward any token, so a special or byte token made of two tokens could
    come out of ordinary text; edgephi never lets it (no Phi-3 token is such)."""
    known = set(tokens)
    for t, kind in zip(tokens, types):
        if kind != NORMAL and any(t[:k] in known and t[k:] in known for k in range(1, len(t))):
            raise refuse(where, f"token {brief(t)} (type {kind}) can be merged from two tokens")


def _spm_vocab_from_json(data: Fields, model: Fields, name: str) -> SentencePieceVocab:
    """Hugging Face BPE with byte fallback: pieces merge in merge-list order (a piece's rank is its
    first merge), added tokens are special and carry their own lstrip/rstrip flags."""
    where = data.where
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.data.get(key) not in (None, ""):
            raise refuse(where, f"model.{key} is {brief(model.data[key])}, not null")
    if model.data.get("ignore_merges"):
        raise refuse(where, "model.ignore_merges is true")
    vocab = _vocab(model)
    added, lstrip, rstrip = {}, set(), set()
    for i, entry in enumerate(data.array("added_tokens", [])):
        token = Fields(entry, where, f"added_tokens[{i}].")
        content = token.string("content")
        added[content] = token.integer("id", low=0, high=MAX_TOKEN_ID)
        if token.boolean("normalized", False) or token.boolean("single_word", False):
            raise refuse(where, f"added token {brief(content)} is normalized or single_word (edgephi "
                                 "matches added tokens in the raw text only)")
        if token.boolean("lstrip", False):
            lstrip.add(content)
        if token.boolean("rstrip", False):
            rstrip.add(content)
    n = max([*vocab.values(), *added.values()], default=-1) + 1
    if n > 1 << 22:
        raise refuse(where, f"token ids up to {n - 1}, more than {1 << 22}")
    pieces = [""] * n
    for text, i in vocab.items():
        pieces[i] = text
    for text, i in added.items():
        pieces[i] = text
    byte_tokens = _byte_tokens(dict(enumerate(pieces)), where)
    plain = {t: i for t, i in vocab.items() if t not in added}
    chars = {t: i for t, i in plain.items() if len(t) == 1}
    order = order_from_merges(plain, chars, _merge_pairs(model.data.get("merges", []), where), where)
    space_prefix, unless_space, split = _spm_spaces(data, where)
    return SentencePieceVocab(name, pieces, chars, order, byte_tokens, added, lstrip, rstrip, UNICODE_SPACE,
                              space_prefix, unless_space, split, _decoder_strips(data, space_prefix != "none"))


def _spm_spaces(data: Fields, where: str) -> tuple[str, bool, bool]:
    """(space_prefix, prefix_unless_space, split_on_space) from the normalizer and pre-tokenizer:
    Prepend("▁") + Replace(" ", "▁") (Phi-3's, a legacy Llama tokenizer), Replace alone, or a
    Metaspace pre-tokenizer."""
    normalizer, pre = data.data.get("normalizer"), data.data.get("pre_tokenizer")
    steps = []
    if normalizer is not None:
        norm = Fields(normalizer, where, "normalizer.")
        steps = norm.array("normalizers") if norm.data.get("type") == "Sequence" else [normalizer]
    kinds = []
    for i, step in enumerate(steps):
        f = Fields(step, where, f"normalizer[{i}].")
        kind = f.data.get("type")
        if kind == "Prepend" and f.data.get("prepend") == SPACE:
            kinds.append("prepend")
        elif kind == "Replace" and f.data.get("pattern") == {"String": " "} and f.data.get("content") == SPACE:
            kinds.append("replace")
        else:
            raise refuse(where, f"normalizer step {brief(kind)}")
    if pre is None and sorted(kinds) in (["prepend", "replace"], ["replace"]):
        return ("every" if "prepend" in kinds else "none"), False, False
    if pre is not None and not kinds:
        meta = Fields(pre, where, "pre_tokenizer.")
        if meta.data.get("type") == "Metaspace" and meta.data.get("replacement", SPACE) == SPACE:
            legacy = "always" if meta.boolean("add_prefix_space", True) else "never"
            scheme = meta.string("prepend_scheme", legacy)
            prefixes = {"always": "every", "first": "first", "never": "none"}
            if scheme in prefixes:
                return prefixes[scheme], True, meta.boolean("split", True)
    raise refuse(where, f"normalizer {brief(kinds or None)} with pre-tokenizer "
                         f"{brief(pre.get('type') if isinstance(pre, dict) else pre)}")


def _decoder_strips(data: Fields, default: bool) -> bool:
    """Whether the decoder drops the space that starts the text: Strip(" ", 1, 0) in a Sequence
    (Phi-3's), or a Metaspace decoder that prepends; without a decoder, as the prefix is added."""
    decoder = data.data.get("decoder")
    if not isinstance(decoder, dict):
        return default
    steps = decoder.get("decoders") if decoder.get("type") == "Sequence" else [decoder]
    for step in steps if isinstance(steps, list) else []:
        if not isinstance(step, dict):
            continue
        if step.get("type") == "Strip" and step.get("content") == " ":
            return step.get("start") == 1
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never") != "never"
    return False
