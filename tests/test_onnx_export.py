"""ONNX export against outside references: transformers (float and dequantized-quantized weights),
onnxruntime running the graph, onnxruntime-genai loading the folder with its own tokenizer, and the
Hugging Face `tokenizers` library reading the tokenizer.json we write."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime_genai as og
import pytest
import tokenizers
import torch
import transformers
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

import edgephi
from edgephi.convert.onnx_export import export_onnx, matmulnbits_q4
from edgephi.convert.pipeline import convert
from edgephi.onnx_backend import OnnxDecoder
from tests import fixtures
from tests.fixtures import hf_logits, random_ids, rel_err

VARIANTS = ["phi3_gqa_partial", "phi3_longrope", "phi3_sliding", "llama"]





@pytest.fixture(scope="module")
def exported(checkpoint_factory, tmp_path_factory):
    """(variant, quant) -> (ONNX folder, transformers model with the same, dequantized weights)."""
    built = {}

    def get(variant, quant):
        if (variant, quant) not in built:
            src = checkpoint_factory(variant, "float32")
            root = tmp_path_factory.mktemp(f"{variant}-{quant}")
            convert(src, root / "m", quant=quant, embed_quant="q8_0" if quant != "f32" else "f32")
            export_onnx(root / "m", root / "onnx", int8_compute=False)  # float activations throughout
            ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
            if quant != "f32":
                ggml = {"q4_0": T.Q4_0, "q4_1": T.Q4_1, "q8_0": T.Q8_0}[quant]
                with torch.no_grad():  # the same rounding, done by gguf's reference codecs
                    for name, p in ref.named_parameters():
                        if p.ndim == 2:
                            fmt = T.Q8_0 if "embed" in name or "lm_head" in name else ggml
                            p.copy_(torch.from_numpy(gguf_quants.dequantize(gguf_quants.quantize(p.numpy(), fmt), fmt)))
            built[(variant, quant)] = (root / "onnx", ref, root / "m")
        return built[(variant, quant)]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_float_export_matches_transformers_with_and_without_cache(exported, variant):
    folder, ref, _ = exported(variant, "f32")
    onnx.checker.check_model(str(folder / "model.onnx"))
    decoder = OnnxDecoder(folder)
    ids = random_ids(40, seed=7)  # past the LongRoPE variant's 32-position original context
    expected = hf_logits(ref, ids)
    assert rel_err(decoder.logits(ids), expected) < 1e-4  # whole sequence, no cache
    # with the cache: a prompt, then single tokens and a short chunk, at several positions
    short = ids[:30] if variant == "phi3_longrope" else ids  # see the LongRoPE test below
    expected = hf_logits(ref, short)
    past = decoder.empty_past()
    got = []
    for part in [short[:12], *([t] for t in short[12:18]), short[18:]]:
        logits, past = decoder.run(part, past)
        got.append(logits)
    assert rel_err(np.concatenate(got), expected) < 1e-4


def test_longrope_cache_crossing_the_original_context(exported):
    """Keys cached before the sequence outgrew the original context keep their short-factor
    rotation (as in onnxruntime-genai's own exports): past that point only a fresh prefill
    matches transformers. edgephi's own runtime recomputes them instead."""
    folder, ref, _ = exported("phi3_longrope", "f32")
    decoder = OnnxDecoder(folder)
    ids = random_ids(40, seed=8)
    expected = hf_logits(ref, ids)
    _, past = decoder.run(ids[:30], decoder.empty_past())
    stale = []
    for t in ids[30:]:
        logits, past = decoder.run([t], past)
        stale.append(logits[0])
    stale = np.stack(stale)
    assert rel_err(stale, expected[30:]) > 1e-3  # the documented difference is real
    assert rel_err(decoder.logits(ids)[30:], expected[30:]) < 1e-4


@pytest.mark.parametrize("quant", ["q4_0", "q4_1", "q8_0"])
def test_quantized_export_is_exact_in_the_weights(exported, quant):
    """MatMulNBits on the repacked blocks equals transformers run on gguf's dequantized weights."""
    folder, ref, _ = exported("phi3_gqa_partial", quant)
    ids = random_ids(24, seed=3)
    assert rel_err(OnnxDecoder(folder).logits(ids), hf_logits(ref, ids)) < 1e-4
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    assert any(n.op_type == "MatMulNBits" and n.domain == "com.microsoft" for n in graph.node)
    # the untied q8_0 embedding stays 8-bit (and is exact: transformers reads it dequantized above)
    assert any(n.op_type == "GatherBlockQuantized" for n in graph.node)


def test_q8_export_logits_close_to_edgephi(exported, tmp_path):
    folder, _, model_folder = exported("llama", "q8_0")
    ids = random_ids(20, seed=5)
    ours = edgephi.load(model_folder, kv_dtype="float32").logits(ids)
    assert rel_err(OnnxDecoder(folder).logits(ids), ours) < 5e-4  # edgephi's int16 activations
    # the default export: onnxruntime multiplies the 8-bit weights with int8 activations
    report = export_onnx(model_folder, tmp_path / "int8")
    assert 1e-4 < report.max_rel_diff < 0.1  # int8 activations: llama.cpp-sized differences (2-4% here)
    assert rel_err(OnnxDecoder(tmp_path / "int8").logits(ids), ours) < 0.1


def test_matmulnbits_nibble_order():
    """Element 2i in the low nibble of byte i, 2i + 1 in the high one (MatMulNBits' packing), from
    ggml's (element j low, j + 16 high)."""
    values = np.arange(32, dtype=np.uint8) % 16
    ggml = (values[:16] | (values[16:] << 4)).reshape(1, 16)
    packed = matmulnbits_q4(ggml)[0, 0]
    assert [(b & 15, b >> 4) for b in packed] == [(values[2 * i], values[2 * i + 1]) for i in range(16)]


# ---------------------------------------------------------------------------------------------
# the default model through onnxruntime-genai


def genai_greedy(folder, ids, n):
    """Up to n greedy tokens after ids, generated by onnxruntime-genai from the folder alone."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(ids, dtype=np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


@pytest.fixture(scope="module")
def smollm2_onnx(smollm2_gguf, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-onnx")
    convert(smollm2_gguf, root / "m", quant=None)
    report = export_onnx(root / "m", root / "onnx")
    return root / "m", root / "onnx", report


@pytest.mark.integration
def test_genai_greedy_tokens_equal_edgephi(smollm2_onnx):
    model_folder, folder, report = smollm2_onnx
    assert report.max_rel_diff < 1e-3 and report.check_tokens > 10
    ours = edgephi.load(model_folder)
    ids = ours.tokenizer.encode("<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n"
                                "<|im_start|>assistant\n", allow_special=True)
    theirs = genai_greedy(folder, ids, 32)
    assert len(theirs) == 32
    assert list(ours.generate_tokens(ids, max_new_tokens=32, ignore_eos=True)) == theirs


# Texts where digits meet whitespace or are not ASCII: what onnxruntime-extensions read wrongly
# while the tokenizer.json had a Digits pre-tokenizer (it ignores that step).
DIGIT_EDGES = ["a 1", "x\n2", "a  12 b", "x\t\t3", "\n\n9", "٣٤٥ and ²³", "year 2024, page  7", " 1 2  3"]


@pytest.mark.integration
def test_genai_and_hf_tokenizers_read_our_tokenizer_json(smollm2_onnx, text_corpus):
    model_folder, folder, _ = smollm2_onnx
    ours = edgephi.load(model_folder).tokenizer
    genai = og.Tokenizer(og.Model(str(folder)))
    hf = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    compared = 0
    for text in [*text_corpus, *DIGIT_EDGES]:
        want = ours.encode(text, allow_special=True)  # both libraries read special-token text
        assert hf.encode(text, add_special_tokens=False).ids == want, text
        assert [int(i) for i in genai.encode(text)] == want, text
        compared += len(want)
    assert compared > 10000
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["eos_token_id"] == [0, 2] and config["model"]["type"] == "llama"


@pytest.mark.integration
def test_phi4_tokenizers_through_genai_and_hf(checkpoint_factory, tmp_path, text_corpus):
    """cl100k (Phi-4) and o200k (Phi-4-mini) vocabularies through the tokenizer.json we write:
    onnxruntime-genai's and Hugging Face's readings equal edgephi's tiktoken encoding, every text."""
    for name in ("phi4", "phi4_mini"):
        src = checkpoint_factory("phi3_basic", "float32", tokenizer=name)
        convert(src, tmp_path / name, quant="f32", embed_quant="f32")
        export_onnx(tmp_path / name, tmp_path / f"{name}-onnx", check=False)
        hf = tokenizers.Tokenizer.from_file(str(tmp_path / f"{name}-onnx" / "tokenizer.json"))
        genai = og.Tokenizer(og.Model(str(tmp_path / f"{name}-onnx")))
        ours = edgephi.load(tmp_path / name).tokenizer
        for text in text_corpus:
            want = ours.encode(text, allow_special=True)
            assert hf.encode(text, add_special_tokens=False).ids == want, (name, text)
            assert [int(i) for i in genai.encode(text)] == want, (name, text)


@pytest.mark.integration
def test_phi3_sentencepiece_tokenizer_through_hf_and_genai(tmp_path, text_corpus):
    """Phi-3's SentencePiece vocabulary written as a Llama-style tokenizer.json (BPE with byte
    fallback): Hugging Face's reading equals edgephi's ids on every text and decodes alike.
    onnxruntime-genai's own BPE differs on a few texts: a space before a word after a run of
    spaces goes to the run, not to the word, and `<space>` is not merged; it is held to the
    texts without runs of spaces or "<"."""
    gguf = fixtures.write_tiny_phi3_gguf(tmp_path / "tiny.gguf", fixtures.llama_cpp_vocab("phi-3"))
    convert(gguf, tmp_path / "m", quant=None)
    export_onnx(tmp_path / "m", tmp_path / "onnx", check=False)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "onnx" / "tokenizer.json"))
    genai = og.Tokenizer(og.Model(str(tmp_path / "onnx")))
    ours = edgephi.load(tmp_path / "m").tokenizer
    texts = text_corpus + ["<|user|>\nHi<|end|>\n<|assistant|>\n", "\x01 control", "emoji 🙂 done", ""]
    plain = 0
    for text in texts:
        want = ours.encode(text, allow_special=True)
        assert hf.encode(text, add_special_tokens=False).ids == want, text
        assert hf.decode(want, skip_special_tokens=False) == ours.decode(want), text
        if "  " not in text and "<" not in text:
            plain += 1
            assert [int(i) for i in genai.encode(text)] == want, text
    assert plain >= 50  # genai is held to a real share of the corpus


# ---------------------------------------------------------------------------------------------
# bad input


def run_cli(*args):
    return subprocess.run([sys.executable, "-c", "from edgephi.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_export_of_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hello")
    done = run_cli("export-onnx", str(tmp_path / "junk"), str(tmp_path / "out" / "onnx"))
    assert done.returncode != 0
    assert len(done.stderr.strip().splitlines()) == 1 and "junk" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_export_of_an_uncovered_architecture(checkpoint_factory, tmp_path):
    src = checkpoint_factory("phi3_basic", "float32")
    convert(src, tmp_path / "m", quant="f32", embed_quant="f32")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architecture"] = "gpt_neox"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    done = run_cli("export-onnx", str(tmp_path / "m"), str(tmp_path / "onnx"))
    assert done.returncode != 0 and "gpt_neox" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "onnx").exists() and not list(tmp_path.glob(".onnx*"))


# ---------------------------------------------------------------------------------------------
# edgephi's onnxruntime backend


@pytest.mark.integration
def test_onnxruntime_backend_chats_like_the_numba_backend(smollm2_onnx):
    """`edgephi chat` on the exported folder: the same two-turn answers as the numba backend,
    through onnxruntime alone (numba is never imported)."""
    model_folder, folder, _ = smollm2_onnx
    turns = "What is the capital of France?\nAnd of Germany?\n"
    code = ("import sys; from edgephi.cli import main\n"
            "try:\n    main()\nfinally:\n    print('numba imported' if 'numba' in sys.modules else 'numba not imported',"
            " file=sys.stderr)")
    replies = {}
    for name, path in (("onnx", folder), ("numba", model_folder)):
        done = subprocess.run([sys.executable, "-c", code, "chat", "-m", str(path)], input=turns,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        replies[name] = done.stdout
        assert ("numba not imported" in done.stderr) == (name == "onnx"), done.stderr
    assert "Paris" in replies["onnx"] and "Berlin" in replies["onnx"]
    assert replies["onnx"] == replies["numba"]


@pytest.mark.integration
def test_onnxruntime_backend_api_and_bench(smollm2_onnx):
    model_folder, folder, _ = smollm2_onnx
    onnx_model = edgephi.load(folder)
    numba_model = edgephi.load(model_folder)
    assert onnx_model.backend.name == "onnxruntime"
    ids = onnx_model.prompt_ids("The sea is")
    assert rel_err(onnx_model.logits(ids), numba_model.logits(ids)) < 1e-3
    assert onnx_model.generate("The sea is", max_new_tokens=12) == numba_model.generate("The sea is", max_new_tokens=12)
    with pytest.raises(ValueError):
        edgephi.load(folder, backend="tensorflow")
    with pytest.raises(edgephi.errors.EdgephiError, match="not an ONNX folder"):
        edgephi.load(model_folder, backend="onnxruntime")
    done = run_cli("bench", "-m", str(folder), "--prompt-tokens", "16", "--gen-tokens", "4", "--repetitions", "1",
                   "--json")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["backend"] == "onnxruntime" and figures["decode_tok_s"] > 0 and figures["prefill_tok_s"] > 0


@pytest.mark.integration
def test_onnxruntime_backend_sessions_keep_their_own_context(smollm2_onnx):
    """Interleaved chat streams on one onnxruntime model: each reply equals its conversation run alone."""
    _, folder, _ = smollm2_onnx
    model = edgephi.load(folder)
    conversations = [["What is the capital of France?", "And of Germany?"], ["Name a prime number.", "And the next?"]]
    alone = []
    for turns in conversations:
        session = model.chat_session(max_new_tokens=16)
        alone.append([session(t) for t in turns])
    sessions = [model.chat_session(max_new_tokens=16) for _ in conversations]
    mixed = [[], []]
    for turn in range(2):
        streams = [s.send(c[turn]) for s, c in zip(sessions, conversations)]
        pieces = [list(p) for p in zip(*streams)]  # one piece of each in turn, up to the shorter reply
        texts = ["".join(p[i] for p in pieces) + "".join(stream) for i, stream in enumerate(streams)]
        for i, text in enumerate(texts):
            mixed[i].append(text)
    assert mixed == alone
    assert "Paris" in alone[0][0]


def _onnx_copy(src, dst):
    """An ONNX folder copied by hard links (the 190 MB of weights are not copied); a file is
    changed only by replacing it."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def _replace(path, data: bytes):
    path.unlink()
    path.write_bytes(data)


def _other_models_files(folder, phi3_model):
    for name in os.listdir(folder / "edgephi"):
        _replace(folder / "edgephi" / name, (phi3_model / name).read_bytes())
    return folder / "model.onnx"


HOSTILE_ONNX = {  # name -> (damage(folder) -> the file the message must name, words it must say)
    "graph-garbage": (lambda f, _: (_replace(f / "model.onnx", b"not a protobuf" * 100), f / "model.onnx")[1],
                      ["onnxruntime cannot load it"]),
    "graph-empty": (lambda f, _: (_replace(f / "model.onnx", b""), f / "model.onnx")[1], ["model.onnx"]),
    "weights-truncated": (lambda f, _: (_replace(f / "model.onnx.data", b"\0" * 1000), f / "model.onnx")[1],
                          ["onnxruntime"]),
    "edgephi-files-of-another-model": (_other_models_files, ["config.json says"]),
    "edgephi-config-list": (lambda f, _: (_replace(f / "edgephi" / "config.json", b"[]"),
                                          f / "edgephi" / "config.json")[1], ["JSON object"]),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", HOSTILE_ONNX)
def test_hostile_onnx_folder_gives_one_line(case, smollm2_onnx, checkpoint_factory, tmp_path):
    _, folder, _ = smollm2_onnx
    phi3_model = tmp_path / "phi3"
    convert(checkpoint_factory("phi3_basic"), phi3_model, quant="q8_0")
    damage, says = HOSTILE_ONNX[case]
    copy = _onnx_copy(folder, tmp_path / "onnx")
    named = damage(copy, phi3_model)
    done = run_cli("generate", "-m", str(copy), "--max-tokens", "2", "hello")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(named) in lines[0], done.stderr
    for word in says:
        assert word in lines[0], lines[0]


@pytest.mark.integration
@pytest.mark.parametrize("variant", ["phi3_gqa_partial", "phi3_sliding", "phi3_longrope"])
def test_genai_runs_phi3_exports_like_edgephi(checkpoint_factory, tmp_path, variant):
    """onnxruntime-genai on q4_0 Phi-3-architecture exports (model type phi3, Phi-4-mini's vocabulary):
    its greedy tokens are edgephi's. LongRoPE: the same until the sequence outgrows the original
    context (32 here), where the cached keys keep their short rotation (see the README)."""
    src = checkpoint_factory(variant, "float32", tokenizer="phi4_mini")
    convert(src, tmp_path / "m", quant="q4_0", embed_quant="q8_0")
    export_onnx(tmp_path / "m", tmp_path / "onnx")
    ids = random_ids(20, seed=1, vocab=500)
    want = list(edgephi.load(tmp_path / "m").generate_tokens(ids, max_new_tokens=24, ignore_eos=True))
    got = genai_greedy(tmp_path / "onnx", ids, 24)
    if variant == "phi3_longrope":
        assert got[:12] == want[:12] and got != want  # positions 20..31, then the documented difference
    else:
        assert got == want
    assert json.loads((tmp_path / "onnx" / "genai_config.json").read_text())["model"]["type"] == "phi3"


def test_q4_0_embedding_gathered_quantized_and_exact(checkpoint_factory, tmp_path):
    src = checkpoint_factory("phi3_gqa_partial", "float32")  # untied output
    convert(src, tmp_path / "m", quant="q4_0", embed_quant="q4_0")
    export_onnx(tmp_path / "m", tmp_path / "onnx", check=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for _, p in ref.named_parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(gguf_quants.dequantize(gguf_quants.quantize(p.numpy(), T.Q4_0), T.Q4_0)))
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    gather = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(gather) == 1
    assert {a.name: onnx.helper.get_attribute_value(a) for a in gather[0].attribute}["bits"] == 4
    ids = random_ids(16, seed=9)
    assert rel_err(OnnxDecoder(tmp_path / "onnx").logits(ids), hf_logits(ref, ids)) < 1e-4
