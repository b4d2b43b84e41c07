"""Byte-level BPE vocabularies (Hugging Face tokenizer.json, GGUF gpt2) -> a tiktoken spec.

tiktoken merges the adjacent pair whose concatenated bytes has the lowest id, which equals
Hugging Face's merge-list priority when every merge's result has a higher id than the merges
before it; the converter checks that and refuses vocabularies where it fails.
SentencePiece vocabularies (Phi-3/3.5, `tokenizer.ggml.model = llama`) are refused for now.
"""

from __future__ import annotations

from pathlib import Path

from edgephi.errors import EdgephiError
from edgephi.files import Fields, brief, parse_json, read_text
from edgephi.tokenizer_files import BYTE_DECODER, TokenizerSpec

MAX_TOKEN_ID = (1 << 31) - 1  # tiktoken keeps ranks in 32 bits
# Hugging Face ByteLevel(use_regex=True) and llama.cpp's "gpt-2" pre-tokenizer.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits(individual_digits) then GPT-2 as one regex: each digit is its own piece, and the
# whitespace rule treats a digit like the end of the text, as the two-pass split does.
DIGITS_THEN_GPT2_PATTERN = (
    r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
)
# llama.cpp pre-tokenizer names (tokenizer.ggml.pre) whose split this spec can express.
GGUF_PRE_PATTERNS = {
    "gpt-2": GPT2_PATTERN,
    **{name: DIGITS_THEN_GPT2_PATTERN
       for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")},
}


def token_bytes(token: str, where: str) -> bytes:
    try:
        return bytes(BYTE_DECODER[c] for c in token)
    except KeyError:
        raise EdgephiError(f"{where}: token {brief(token)} is not in the byte-level alphabet") from None


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
    if kind != "BPE" or byte_fallback:
        raise EdgephiError(
            f"{where}: {brief(kind)} tokenizer with byte fallback (SentencePiece style, as in "
            "Phi-3/3.5) is not supported yet; edgephi supports byte-level BPE (Phi-4, Phi-4-mini, Llama 3, SmolLM)"
            if byte_fallback else f"{where}: tokenizer model {brief(kind)} is not BPE")
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


def spec_from_gguf(gguf, where: str) -> TokenizerSpec:
    kind = gguf.get("tokenizer.ggml.model")
    if kind == "llama":
        raise EdgephiError(f"{where}: SentencePiece vocabulary (as in Phi-3/3.5) is not supported yet; "
                           "edgephi supports byte-level BPE vocabularies (tokenizer.ggml.model = gpt2)")
    if kind != "gpt2":
        raise EdgephiError(f"{where}: tokenizer type {brief(kind)} is not supported")
    pre = gguf.get("tokenizer.ggml.pre", "default")
    if not isinstance(pre, str) or pre not in GGUF_PRE_PATTERNS:
        raise EdgephiError(f"{where}: pre-tokenizer {brief(pre)} is not supported "
                           f"(supported: {', '.join(sorted(GGUF_PRE_PATTERNS))})")
    tokens = _string_list(gguf, "tokenizer.ggml.tokens", where)
    types = gguf.get("tokenizer.ggml.token_type")
    if types is None:
        types = [1] * len(tokens)
    if (not isinstance(types, list) or len(types) != len(tokens)
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in types)):
        raise EdgephiError(f"{where}: GGUF metadata tokenizer.ggml.token_type must be an array of "
                           f"{len(tokens)} integers, one per token")
    special = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (3, 4)}  # control, user
    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind not in (3, 4)}
    merges = _merge_pairs(_string_list(gguf, "tokenizer.ggml.merges", where), where, strings_only=True)
    ranks = ranks_from_vocab(vocab, merges, where)
    name = gguf.get("general.name", "gguf")
    return make_spec(name if isinstance(name, str) else "gguf", GGUF_PRE_PATTERNS[pre], ranks, special)

