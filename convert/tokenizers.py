"""Byte-level BPE vocabularies (Hugging Face tokenizer.json, GGUF gpt2) -> a tiktoken spec.

tiktoken merges the adjacent pair whose concatenated bytes has the lowest id, which equals
Hugging Face's merge-list priority when every merge's result has a higher id than the merges
before it; the converter checks that and refuses vocabularies where it fails.
SentencePiece vocabularies (Phi-3/3.5, `tokenizer.ggml.model = llama`) are refused for now.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgephi.errors import EdgephiError
from edgephi.tokenizer_files import TokenizerSpec

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


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes: printable bytes map to themselves, the rest to 256+n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + n)] = b
            n += 1
    return table


BYTE_DECODER = _byte_decoder()


def token_bytes(token: str, where: str) -> bytes:
    try:
        return bytes(BYTE_DECODER[c] for c in token)
    except KeyError:
        raise EdgephiError(f"{where}: token {token!r} is not in the byte-level alphabet") from None


def ranks_from_vocab(vocab: dict[str, int], merges: list[tuple[str, str]], where: str) -> dict[bytes, int]:
    """Byte-level vocab + merge list -> tiktoken ranks, checking that ids follow merge priority."""
    ranks: dict[bytes, int] = {}
    for token, tid in vocab.items():
        b = token_bytes(token, where)
        if b in ranks:
            raise EdgephiError(f"{where}: two tokens decode to the same bytes {b!r}")
        ranks[b] = tid
    last = -1
    for i, (left, right) in enumerate(merges):
        merged = vocab.get(left + right)
        if merged is None:
            raise EdgephiError(f"{where}: merge {i} ({left!r} {right!r}) makes a token not in the vocabulary")
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


def _merge_pairs(raw, where: str) -> list[tuple[str, str]]:
    # tokenizers < 0.20 wrote "a b" strings, newer versions write ["a", "b"] pairs.
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) if isinstance(m, list) else ()
             for m in (raw if isinstance(raw, list) else [None])]
    if not all(len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs):
        raise EdgephiError(f"{where}: malformed merges list")
    return pairs


def _hf_pattern(pre: dict | None, where: str) -> str:
    """The tiktoken regex equivalent to a Hugging Face byte-level pre-tokenizer."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None:
        raise EdgephiError(f"{where}: pre-tokenizer {kinds or None} is not byte-level BPE")
    if byte_level.get("add_prefix_space"):
        raise EdgephiError(f"{where}: ByteLevel add_prefix_space is not supported")
    regex_in_byte_level = byte_level.get("use_regex", True)
    head = steps[:-1]
    if not head and regex_in_byte_level:
        return GPT2_PATTERN
    if len(head) == 1 and kinds[0] == "Digits" and head[0].get("individual_digits") and regex_in_byte_level:
        return DIGITS_THEN_GPT2_PATTERN
    if len(head) == 1 and kinds[0] == "Split" and not regex_in_byte_level:
        split = head[0]
        pattern = split.get("pattern", {})
        if "Regex" in pattern and split.get("behavior") == "Isolated" and not split.get("invert"):
            return pattern["Regex"]
    raise EdgephiError(f"{where}: pre-tokenizer sequence {kinds} is not supported")


def spec_from_tokenizer_json(path: Path) -> TokenizerSpec:
    where = str(path)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise EdgephiError(f"{where}: cannot read tokenizer ({exc})") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("vocab"), dict):
        raise EdgephiError(f"{where}: malformed tokenizer.json (no model vocabulary)")
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise EdgephiError(
            f"{where}: {model.get('type')} tokenizer with byte fallback (SentencePiece style, as in "
            "Phi-3/3.5) is not supported yet; edgephi supports byte-level BPE (Phi-4, Phi-4-mini, Llama 3, SmolLM)"
            if model.get("byte_fallback") else f"{where}: tokenizer model {model.get('type')!r} is not BPE")
    if data.get("normalizer"):
        raise EdgephiError(f"{where}: tokenizer normalizer {data['normalizer'].get('type')} is not supported")
    pattern = _hf_pattern(data.get("pre_tokenizer"), where)
    try:
        added = {t["content"]: int(t["id"]) for t in data.get("added_tokens") or []}
    except (KeyError, TypeError, ValueError):
        raise EdgephiError(f"{where}: malformed added_tokens") from None
    vocab = {tok: i for tok, i in model["vocab"].items() if tok not in added}
    ranks = ranks_from_vocab(vocab, _merge_pairs(model.get("merges", []), where), where)
    return make_spec(Path(path).parent.name or "tokenizer", pattern, ranks, added)


def spec_from_gguf(gguf, where: str) -> TokenizerSpec:
    kind = gguf.get("tokenizer.ggml.model")
    if kind == "llama":
        raise EdgephiError(f"{where}: SentencePiece vocabulary (as in Phi-3/3.5) is not supported yet; "
                           "edgephi supports byte-level BPE vocabularies (tokenizer.ggml.model = gpt2)")
    if kind != "gpt2":
        raise EdgephiError(f"{where}: tokenizer type {kind!r} is not supported")
    pre = gguf.get("tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_PATTERNS:
        raise EdgephiError(f"{where}: pre-tokenizer {pre!r} is not supported "
                           f"(supported: {', '.join(sorted(GGUF_PRE_PATTERNS))})")
    tokens = gguf.get("tokenizer.ggml.tokens") or []
    types = gguf.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    special = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind in (3, 4)}  # control, user
    vocab = {t: i for i, (t, kind) in enumerate(zip(tokens, types)) if kind not in (3, 4)}
    merges = _merge_pairs(gguf.get("tokenizer.ggml.merges") or [], where)
    ranks = ranks_from_vocab(vocab, merges, where)
    return make_spec(gguf.get("general.name", "gguf"), GGUF_PRE_PATTERNS[pre], ranks, special)
