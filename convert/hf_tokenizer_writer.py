"""An edgephi tokenizer (tiktoken ranks + split pattern) written as a Hugging Face tokenizer.json, for
runtimes that read that format (onnxruntime-genai, transformers), e.g. after a GGUF import.

tiktoken's BPE merges the adjacent pair whose merged bytes have the lowest rank; a Hugging Face BPE
merges by merge-list order. With the merge of each token listed at the token's own rank, and whole
pieces found in the vocabulary taken as they are (`ignore_merges`, as tiktoken does), both give the
same ids. A token's merge is the last step of BPE over its own bytes with only lower ranks allowed.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgephi.errors import EdgephiError
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


def check_writable(spec: TokenizerSpec, where) -> None:
    if spec.sentencepiece is not None:
        raise EdgephiError(f"{where}: the model's SentencePiece vocabulary (Phi-3/3.5) cannot be written as a "
                           "tokenizer.json yet, so it cannot be exported to ONNX; byte-level vocabularies can")


def write_hf_tokenizer(spec: TokenizerSpec, generation: dict, folder: Path, context_length: int) -> None:
    """tokenizer.json and tokenizer_config.json (chat template, bos/eos) into `folder`."""
    check_writable(spec, folder)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json(spec), ensure_ascii=False), encoding="utf-8")
    by_id = {i: s for s, i in spec.special_tokens.items()}
    eos = generation.get("eos_token_ids") or []
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "add_bos_token": bool(generation.get("add_bos_token")),
        "add_prefix_space": False,
        "bos_token": by_id.get(generation.get("bos_token_id")),
        "eos_token": by_id.get(eos[0]) if eos else None,
        "pad_token": by_id.get(eos[0]) if eos else None,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_length,
        "added_tokens_decoder": {str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for s, i in spec.special_tokens.items()},
    }
    if generation.get("chat_template"):
        config["chat_template"] = generation["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
