"""`edgephi perplexity`: llama.cpp's chunking checked against transformers' perplexity of the same
tokens, the KL figures against torch's on the same logits, and bad input as one line."""

import json
import subprocess
import sys

import numpy as np
import pytest

import edgephi
from edgephi.convert import convert
from edgephi.perplexity import evaluate, text_chunks
from tests import texts

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CTX, CHUNKS = 128, 4
FIRST, SCORED = CTX // 2, CTX - 1 - CTX // 2


@pytest.fixture(scope="module")
def pride() -> str:
    return texts.evaluation_text().read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def smollm2_f32(smollm2_gguf, tmp_path_factory):
    """SmolLM2's weights dequantized to float32 (the float model), with a float32 KV cache."""
    out = tmp_path_factory.mktemp("smollm2-f32") / "m"
    convert(smollm2_gguf, out, quant="f32", embed_quant="f32")
    return out


@pytest.fixture(scope="module")
def smollm2_q4_0(smollm2_gguf, tmp_path_factory):
    """SmolLM2's weights re-quantized to q4_0 (another grid than the GGUF's q4_1: a real loss)."""
    out = tmp_path_factory.mktemp("smollm2-q4_0") / "m"
    convert(smollm2_gguf, out, quant="q4_0", embed_quant="q8_0")
    return out


def hf_chunks(pride: str, smollm2_gguf) -> np.ndarray:
    """The text's first CHUNKS x CTX tokens by transformers' own tokenizer of the GGUF, which adds no BOS
    (SmolLM2's vocabulary does not): llama.cpp's chunks."""
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    assert tok.bos_token_id is None or not getattr(tok, "add_bos_token", False)
    ids = tok(pride[:CTX * CHUNKS * 8], add_special_tokens=False)["input_ids"]
    return np.asarray(ids[:CTX * CHUNKS]).reshape(CHUNKS, CTX)


@pytest.mark.integration
def test_float_perplexity_matches_transformers_on_the_same_chunks(smollm2_f32, smollm2_transformers, smollm2_gguf,
                                                                   pride):
    model = edgephi.load(smollm2_f32, kv_dtype="float32")
    ours = evaluate(model, pride, ctx=CTX, chunks=CHUNKS)
    chunks = hf_chunks(pride, smollm2_gguf)
    assert np.array_equal(text_chunks(model, pride, CTX, CHUNKS, "text")[0], chunks)
    nll = []
    with torch.no_grad():
        for chunk in chunks:
            logits = smollm2_transformers(torch.tensor(chunk[None])).logits[0].double()
            logp = torch.log_softmax(logits[FIRST:CTX - 1], dim=-1)
            nll.append(-logp[torch.arange(SCORED), torch.tensor(chunk[FIRST + 1:])])
    expected = float(torch.exp(torch.cat(nll).mean()))
    assert ours.scored_tokens == CHUNKS * SCORED
    assert abs(ours.ppl / expected - 1) < 1e-3
    assert 5 < expected < 100  # a trained model reading English, not a random one


@pytest.mark.integration
def test_kl_figures_match_torch_and_a_model_against_itself_is_zero(smollm2_f32, smollm2_q4_0, pride):
    base, quantized = edgephi.load(smollm2_f32, kv_dtype="float32"), edgephi.load(smollm2_q4_0)
    report = evaluate(quantized, pride, ctx=CTX, chunks=CHUNKS, base=base)
    chunks = text_chunks(quantized, pride, CTX, CHUNKS, "text")[0]
    logp_q, logp_b, targets = [], [], []
    for chunk in chunks:  # whole-chunk logits in a fresh context, scored rows only
        logp_q.append(torch.log_softmax(torch.from_numpy(quantized.logits(chunk)[FIRST:CTX - 1]).double(), -1))
        logp_b.append(torch.log_softmax(torch.from_numpy(base.logits(chunk)[FIRST:CTX - 1]).double(), -1))
        targets.append(torch.from_numpy(chunk[FIRST + 1:]))
    logp_q, logp_b, targets = torch.cat(logp_q), torch.cat(logp_b), torch.cat(targets)
    kl = torch.nn.functional.kl_div(logp_q, logp_b, log_target=True, reduction="none").sum(-1)
    rows = torch.arange(len(targets))
    nll_q, nll_b = -logp_q[rows, targets], -logp_b[rows, targets]
    k = report.kl
    assert k.kl_mean == pytest.approx(float(kl.mean()), rel=1e-4)
    assert k.kl_p99 == pytest.approx(float(torch.quantile(kl, 0.99)), rel=1e-3)
    assert k.ppl_ratio == pytest.approx(float(torch.exp((nll_q - nll_b).mean())), rel=1e-5)
    assert k.base_ppl == pytest.approx(float(torch.exp(nll_b.mean())), rel=1e-5)
    dp = torch.exp(-nll_q) - torch.exp(-nll_b)
    assert k.rms_dp == pytest.approx(float(dp.pow(2).mean().sqrt()), rel=1e-4)
    same = (logp_q.argmax(-1) == logp_b.argmax(-1)).double().mean()
    assert k.same_top1 == pytest.approx(float(same), abs=1.5 / len(targets))
    assert 1e-3 < k.kl_mean < 1.0 and k.same_top1 < 1  # q4_0 loses something measurable

    itself = evaluate(quantized, pride, ctx=CTX, chunks=CHUNKS, base=quantized).kl
    assert (itself.kl_mean, itself.kl_max, itself.rms_dp, itself.same_top1, itself.ppl_ratio) == (0, 0, 0, 1, 1)


def run_cli(*args):
    return subprocess.run([sys.executable, "-c", "from edgephi.cli import main; main()", "perplexity", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_cli_prints_the_figures_and_json(smollm2_f32, smollm2_q4_0, tmp_path, pride):
    text = tmp_path / "pride.txt"
    text.write_text(pride[:20000], encoding="utf-8")
    done = run_cli("-m", smollm2_q4_0, "--text", text, "--ctx", 64, "--chunks", 3, "--kl-base", smollm2_f32, "--json")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["chunks"] == 3 and figures["scored_tokens"] == 3 * 31
    assert figures["kl"]["kl_mean"] > 0 and "mean KL" in done.stdout and "same top-1" in done.stdout


@pytest.fixture(scope="module")
def other_vocabulary(checkpoint_factory, tmp_path_factory):
    """A phi3 model whose vocabulary is not SmolLM2's."""
    out = tmp_path_factory.mktemp("phi3") / "m"
    convert(checkpoint_factory("phi3_basic", tokenizer=True), out, quant="q4_0", embed_quant="q8_0")
    return out


@pytest.mark.integration
@pytest.mark.parametrize("case", ["empty", "blank", "too short", "not utf-8", "missing", "vocabulary", "ctx"])
def test_bad_input_is_one_line(case, smollm2_q4_0, other_vocabulary, tmp_path, pride):
    text = tmp_path / "text.txt"
    text.write_text({"empty": "", "blank": " \n\n\t\n", "too short": pride[:300]}.get(case, pride[:20000]),
                    encoding="utf-8")
    args = ["-m", smollm2_q4_0, "--text", text, "--ctx", 64]
    if case == "not utf-8":
        text.write_bytes(b"It is a truth universally acknowledged \xff\xfe")
    elif case == "missing":
        text.unlink()
    elif case == "vocabulary":
        args += ["--kl-base", other_vocabulary]
    elif case == "ctx":
        args[-1] = 3
    done = run_cli(*args)
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    expected = {"empty": "text is empty", "blank": "text is empty", "too short": "needs at least 128 (two chunks)",
                "not utf-8": "not UTF-8 text", "missing": "No such file", "vocabulary": "vocabulary differs",
                "ctx": "at least 4 tokens"}[case]
    assert expected in lines[0]
    named = other_vocabulary if case == "vocabulary" else text if case != "ctx" else None
    assert named is None or str(named) in lines[0]


def test_calibration_and_evaluation_texts_never_overlap():
    calibration = texts.calibration_text().read_text(encoding="utf-8")
    evaluation = texts.evaluation_text().read_text(encoding="utf-8")
    assert len(calibration) > 1_500_000 and len(evaluation) > 650_000
    assert calibration.startswith("SENSE AND SENSIBILITY") and evaluation.startswith("PRIDE AND PREJUDICE")
    long_lines = {line for line in evaluation.splitlines() if len(line) > 60}
    assert len(long_lines) > 5000
    assert not long_lines & {line for line in calibration.splitlines() if len(line) > 60}
    assert "It is a truth universally acknowledged, that a single man in possession" in evaluation
