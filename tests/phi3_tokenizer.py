"""Phi-3's SentencePiece tokenizer files (tokenizer.model, tokenizer.json, tokenizer_config.json),
rebuilt from llama.cpp's copy of its vocabulary (models/ggml-vocab-phi-3.gguf), for the Phi-3
checkpoints that llama.cpp's converter turns into GGUFs (tests/gguf_fixtures.py)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tests import fixtures

PHI3_ADDED = ("<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>")


def phi3_vocab_gguf() -> Path:
    """llama.cpp's models/ggml-vocab-phi-3.gguf: Phi-3's 32064 pieces, scores and token types as
    llama.cpp's converter wrote them from microsoft/Phi-3-mini-4k-instruct (no tensors)."""
    return fixtures.llama_cpp_source() / "models" / "ggml-vocab-phi-3.gguf"


@functools.cache
def phi3_vocab() -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, llama.cpp token types) of ggml-vocab-phi-3.gguf."""
    import gguf

    reader = gguf.GGUFReader(phi3_vocab_gguf())
    return tuple(list(reader.fields[f"tokenizer.ggml.{k}"].contents()) for k in ("tokens", "scores", "token_type"))


def _phi3_sentencepiece_model() -> bytes:
    """Phi-3's tokenizer.model (Llama 2's 32000 pieces): BPE with byte fallback, a dummy prefix,
    digits split, whitespace kept. The GGUF's types of ids 0-2 are what llama.cpp's converter made
    of tokenizer_config.json's added tokens; SentencePiece itself has <unk> UNKNOWN, <s> and </s>
    CONTROL, with score 0."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    pieces, scores, types = phi3_vocab()
    Piece = pb.ModelProto.SentencePiece
    m = pb.ModelProto()
    for i in range(32000):
        p = m.pieces.add()
        p.piece = pieces[i]
        if i == 0:
            p.type, p.score = Piece.UNKNOWN, 0.0
        elif i in (1, 2):
            p.type, p.score = Piece.CONTROL, 0.0
        elif types[i] == 6:  # llama.cpp BYTE
            p.type, p.score = Piece.BYTE, 0.0
        else:
            assert types[i] == 1, (i, types[i])
            p.type, p.score = Piece.NORMAL, scores[i]
    t = m.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = 32000
    t.byte_fallback = True
    t.split_digits = True
    t.allow_whitespace_only_pieces = True
    t.split_by_unicode_script = t.split_by_number = t.split_by_whitespace = True
    t.max_sentencepiece_length = 16
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = 0, 1, 2, -1
    t.unk_surface = " \u2047 "
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = True
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    return m.SerializeToString()


def _phi3_added_tokens() -> dict[int, dict]:
    """tokenizer_config.json's added_tokens_decoder of microsoft/Phi-3-mini-4k-instruct."""
    def token(content, rstrip, special):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": rstrip,
                "single_word": False, "special": special}

    added = {0: token("<unk>", False, True), 1: token("<s>", False, True), 2: token("</s>", True, False)}
    for i, content in enumerate(PHI3_ADDED):
        added[32000 + i] = token(content, content != "<|endoftext|>", True)
    return added


def _bpe_merges(pieces: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The merge list equivalent to SentencePiece BPE: every split of a piece into two pieces,
    by the merged piece's score (higher first), then by the halves' ids (as transformers'
    SentencePieceExtractor orders them)."""
    ids = {p: i for i, p in enumerate(pieces)}
    merges = []
    for piece, score in zip(pieces, scores):
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                merges.append((-score, ids[left], ids[right], left, right))
    merges.sort(key=lambda m: m[:3])
    return [(left, right) for *_, left, right in merges]


def _phi3_tokenizer_json(add_bos_token: bool) -> dict:
    """tokenizer.json in the layout of Phi-3's (a legacy Llama tokenizer): BPE with byte fallback,
    normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer, the added tokens,
    and a post-processor adding <s> when the tokenizer adds BOS."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    pieces, scores, types = phi3_vocab()
    pieces, scores = pieces[:32000], [0.0 if i < 3 or types[i] == 6 else s for i, s in enumerate(scores[:32000])]
    tok = Tokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, _bpe_merges(pieces, scores),
                               unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    added = _phi3_added_tokens()
    for i, t in sorted(added.items()):
        token = AddedToken(t["content"], rstrip=t["rstrip"], lstrip=False, normalized=False, special=t["special"])
        if t["special"]:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
    if add_bos_token:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s>:1 $B:1",
                                                           special_tokens=[("<s>", 1)])
    data = json.loads(tok.to_str())
    assert [t["id"] for t in data["added_tokens"]] == sorted(added)
    return data


def write_phi3_tokenizer(folder, *, add_bos_token: bool, chat_template: str) -> Path:
    """Phi-3's tokenizer files: tokenizer.model (SentencePiece, what llama.cpp's converter reads),
    tokenizer.json, tokenizer_config.json and special_tokens_map.json as in the Hub's folders.

    Checked on the way: SentencePiece and the tokenizer.json give llama.cpp's expected ids for
    every test string beside ggml-vocab-phi-3.gguf."""
    import sentencepiece
    import tokenizers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_file = folder / "tokenizer.model"
    model_file.write_bytes(_phi3_sentencepiece_model())
    tokenizer_json = _phi3_tokenizer_json(add_bos_token)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json, indent=2, ensure_ascii=False) + "\n")
    config = {
        "add_bos_token": add_bos_token, "add_eos_token": False,
        "added_tokens_decoder": {str(i): t for i, t in _phi3_added_tokens().items()},
        "bos_token": "<s>", "chat_template": chat_template, "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>", "legacy": False, "model_max_length": 4096, "pad_token": "<|endoftext|>",
        "padding_side": "left", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"},
        indent=2) + "\n")

    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    fast = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text, want in fixtures.llama_cpp_vocab_tests(phi3_vocab_gguf()):
        ids = {"sentencepiece": sp.encode(text), "tokenizer.json": fast.encode(text, add_special_tokens=False).ids}
        for who, got in ids.items():
            if got != want:
                raise RuntimeError(f"rebuilt Phi-3 {who} encodes {text!r} as {got}, llama.cpp expects {want}")
    return folder
