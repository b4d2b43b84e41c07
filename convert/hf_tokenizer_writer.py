"""An edgephi tokenizer (tiktoken ranks + split pattern) written as a Hugging Face tokenizer.json, for
runtimes that read that format (onnxruntime-genai, transformers), e.g. after a GGUF import.

tiktoken's BPE merges the adjacent pair whose merged bytes have the lowest rank; a Hugging Face BPE
merges by merge-list order. With the merge of each token listed at the token's own rank, and whole
pieces found in the vocabulary taken as they are (`ignore_merges`, as tiktoken does), both give the
same ids. A token's merge is the last step of BPE over its own bytes with only lower ranks allowed.
A SentencePiece vocabulary (Phi-3) is written as Hugging Face writes Llama's instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgephi.tokenizer_files import TokenizerSpec, bytes_to_unicode

from .tokenizers import DIGITS_THEN_GPT2_PATTERN, GPT2_PATTERN


def pre_tokenizer(pat_str: str) -> dict:
    """The split pattern as a Hugging Face pre-tokenizer. GPT-2's pattern is written in its usual
    form (ByteLevel's own regex), which readers with a fixed set of regexes (onnxruntime-extensions)
    understand; others as Splits. The SmolLM family's single digits, then GPT-2, are two Isolated
    Splits: onnxruntime-extensions reads a Sequence's Splits in turn but ignores a Digits step
    (falling back to GPT-2's ` ?\\p{N}+`, which glues a space to the digits after it)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    if pat_str == GPT2_PATTERN:
        return {**byte_level, "use_regex": True}
    splits = [r"\p{N}", GPT2_PATTERN] if pat_str == DIGITS_THEN_GPT2_PATTERN else [pat_str]
    return {"type": "Sequence", "pretokenizers": [
        *({"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False} for p in splits),
        {**byte_level, "use_regex": False}]}


def _last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """Run BPE over `token`'s bytes with ranks below its own; the two parts left are its merge."""
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, limit
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            return None
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def tokenizer_json(spec: TokenizerSpec) -> dict:
    table = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(table[b] for b in token)

    kept = {tok: rank for tok, rank in spec.ranks.items() if rank < spec.n_vocab}
    vocab = {text(tok): rank for tok, rank in kept.items()}
    merges = []
    for tok, rank in sorted(kept.items(), key=lambda kv: kv[1]):
        if len(tok) < 2:
            continue
        pair = _last_merge(tok, kept)
        if pair is not None:
            merges.append([text(pair[0]), text(pair[1])])
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for s, i in sorted(spec.special_tokens.items(), key=lambda kv: kv[1])]
    for s, i in spec.special_tokens.items():
        vocab.setdefault(s, i)
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer(spec.pat_str),
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }


def sentencepiece_tokenizer_json(spec: TokenizerSpec) -> dict:
    """A SentencePiece BPE vocabulary (Phi-3) as Hugging Face writes Llama's: a BPE model with byte
    fallback whose merges are every split of a piece into two pieces, in the piece's priority
    order (as transformers' SentencePiece converter lists them), so that merging by merge order
    is SentencePiece's merging by score."""
    t = spec.sentencepiece
    special = set(spec.special_tokens)
    vocab: dict[str, int] = {}
    for i, piece in enumerate(t.pieces):
        if piece not in special:
            vocab.setdefault(piece, i)
    merges = []
    for ids in t.rank_ids:  # pieces by priority (partial characters stand for several ids: none merge)
        piece = t.pieces[ids[0]] if len(ids) == 1 else ""
        if len(piece) < 2 or vocab.get(piece) != ids[0]:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab]
        merges += [list(pair) for pair in sorted(splits, key=lambda p: (vocab[p[0]], vocab[p[1]]))]
    added = [{"id": i, "content": s, "single_word": False, "lstrip": s in t.lstrip, "rstrip": s in t.rstrip,
              "normalized": False, "special": True} for s, i in sorted(spec.special_tokens.items(), key=lambda kv: kv[1])]
    if t.space_prefix == "every" and not t.prefix_unless_space:
        normalizer = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                          {"type": "Replace", "pattern": {"String": " "},
                                                           "content": "▁"}]}
        pre = None
    else:
        normalizer = None
        pre = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always" if t.space_prefix == "every"
               else t.space_prefix, "split": False}
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}]
    if t.strip_leading_space:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    unknown = "<unk>" if "<unk>" in vocab or "<unk>" in special else None
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": unknown, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def write_hf_tokenizer(spec: TokenizerSpec, generation: dict, folder: Path, context_length: int) -> None:
    """tokenizer.json and tokenizer_config.json (chat template, bos/eos) into `folder`."""
    spm = spec.sentencepiece is not None
    data = sentencepiece_tokenizer_json(spec) if spm else tokenizer_json(spec)
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    by_id = {i: s for s, i in spec.special_tokens.items()}
    eos = generation.get("eos_token_ids") or []
    config = {
        "tokenizer_class": "LlamaTokenizer" if spm else "GPT2Tokenizer",
        "add_bos_token": bool(generation.get("add_bos_token")),
        "add_prefix_space": False,
        "bos_token": by_id.get(generation.get("bos_token_id")),
        "eos_token": by_id.get(eos[0]) if eos else None,
        "pad_token": by_id.get(eos[0]) if eos else None,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in data["added_tokens"]},
    }
    if generation.get("chat_template"):
        config["chat_template"] = generation["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
