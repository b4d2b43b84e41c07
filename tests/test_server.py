"""`edgephi serve` (#18) as apps reach it: the official `openai` client (and raw HTTP for what a
client library would not send) against a server on a free loopback port, on the real default
model. References from outside the server: `edgephi chat` / `edgephi generate` in subprocesses for
the replies, transformers' tokenizer for the usage counts, torch's log_softmax for the logprobs."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")  # the test extra installs it; a bare install has no server tests

import edgephi  # noqa: E402
from edgephi.server import bound_socket, create_app, make_server  # noqa: E402

pytestmark = pytest.mark.integration  # a real server on the real default model

ROOT = Path(__file__).resolve().parents[1]
EDGEPHI = [sys.executable, "-c", "from edgephi.cli import main; main()"]
CONTEXT = 512
QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "Write a haiku about the sea.",
             "What is 12 times 12?"]


@pytest.fixture(scope="module")
def model_dir(default_model_cache) -> Path:
    from edgephi import models
    from edgephi.default_model import default_model_path

    return default_model_path(models.default_model())


@pytest.fixture(scope="module")
def model(model_dir):
    return edgephi.load(model_dir, context=CONTEXT)


@contextlib.contextmanager
def serving(model, **options):
    """A server for `model` in a thread of this process; yields (base URL, the app's state)."""
    app = create_app(model, model_id="smollm2", **options)
    sock = bound_socket("127.0.0.1", 0)
    server = make_server(app, sock, log_level="error")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.edgephi
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def server(model):
    with serving(model) as (url, state):
        yield url, state


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=300)


def cli(args, home, stdin=""):
    env = dict(os.environ, EDGEPHI_CACHE=str(home), PYTHONPATH=str(ROOT))
    done = subprocess.run(EDGEPHI + args, input=stdin, capture_output=True, text=True, env=env, timeout=600,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, headers, parsed JSON body) of one plain HTTP request."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read() or b"null")
    finally:
        conn.close()


def chat(client, question, **options):
    return client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": question}],
                                          **{"temperature": 0, "max_tokens": 64, **options})


def streamed_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_greedy_chat_equals_edgephi_chat_streaming_or_not(client, default_model_cache):
    replies = cli(["chat", "--max-tokens", "64", "--context", str(CONTEXT)], default_model_cache,
                  stdin="".join(q + "\n" for q in QUESTIONS[:2])).splitlines()
    # each stdin line is a turn of one conversation: the second answer follows the first, as the
    # server's second request must say with the history
    first = chat(client, QUESTIONS[0])
    assert first.choices[0].message.content == replies[0]
    assert first.choices[0].message.role == "assistant" and first.object == "chat.completion"
    history = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": replies[0]},
               {"role": "user", "content": QUESTIONS[1]}]
    second = client.chat.completions.create(model="smollm2", messages=history, temperature=0, max_tokens=64)
    assert second.choices[0].message.content == replies[1]
    text, chunks = streamed_text(chat(client, QUESTIONS[0], stream=True))
    assert text == replies[0]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks][-1] == first.choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_completions_equal_edgephi_generate(client, default_model_cache):
    prompt = "The three primary colours are"
    expected = cli(["generate", "--max-tokens", "24", "--context", str(CONTEXT), prompt], default_model_cache)
    done = client.completions.create(model="smollm2", prompt=prompt, max_tokens=24, temperature=0)
    assert done.choices[0].text == expected.removesuffix("\n")
    chunks = list(client.completions.create(model="smollm2", prompt=prompt, max_tokens=24, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    echoed = client.completions.create(model="smollm2", prompt=prompt, max_tokens=24, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + done.choices[0].text


def test_usage_counts_are_exact(client, smollm2_gguf):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": QUESTIONS[2]}]
    done = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=5)
    reference = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    reference = reference["input_ids"] if isinstance(reference, dict) or hasattr(reference, "keys") else reference
    assert done.usage.prompt_tokens == len(reference)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 5
    assert done.usage.total_tokens == len(reference) + 5
    stream = chat(client, QUESTIONS[2], max_tokens=7, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])
    prompt = "Once upon a time, in a small village,"
    done = client.completions.create(model="smollm2", prompt=prompt, max_tokens=9, temperature=0)
    assert done.usage.prompt_tokens == len(tok(prompt)["input_ids"]) and done.usage.completion_tokens == 9
    # the prompt as token ids: the same request
    ids = client.completions.create(model="smollm2", prompt=tok(prompt)["input_ids"], max_tokens=9, temperature=0)
    assert ids.choices[0].text == done.choices[0].text


def test_logprobs_are_the_models_log_softmax(client, model):
    import torch

    prompt = "def fibonacci(n):"
    done = client.completions.create(model="smollm2", prompt=prompt, max_tokens=6, temperature=0, logprobs=5)
    lp = done.choices[0].logprobs
    ids = model.prompt_ids(prompt)
    generated = [model.tokenizer.encode(t, allow_special=True) for t in lp.tokens]
    assert all(len(g) == 1 for g in generated), lp.tokens
    generated = [g[0] for g in generated]
    logits = torch.tensor(model.logits(ids + generated[:-1])[len(ids) - 1:], dtype=torch.float64)
    reference = torch.log_softmax(logits[:, :model.tokenizer.n_vocab], dim=-1)
    for step, token in enumerate(generated):
        assert lp.token_logprobs[step] == pytest.approx(reference[step, token].item(), abs=2e-3)
        top = reference[step].topk(5)
        assert [model.tokenizer.encode(t, allow_special=True)[0] for t in lp.top_logprobs[step]] == \
            top.indices.tolist()
        assert list(lp.top_logprobs[step].values()) == pytest.approx(top.values.tolist(), abs=2e-3)
        assert token == top.indices[0].item()  # greedy
    assert "".join(lp.tokens) == done.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    answer = chat(client, QUESTIONS[0], logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert "".join(c.token for c in content) == answer.choices[0].message.content
    assert all(bytes(c.bytes).decode() == c.token and len(c.top_logprobs) == 3 for c in content)
    assert all(c.top_logprobs[0].token == c.token and c.logprob <= 0 for c in content)
    assert chat(client, QUESTIONS[0]).choices[0].logprobs is None


def test_stop_seed_and_sampling_options(client, model):
    whole = chat(client, QUESTIONS[1]).choices[0].message.content
    word = re.findall(r"[a-z]{4,}", whole)[1]
    cut = chat(client, QUESTIONS[1], stop=[word, "zzzz"])
    assert cut.choices[0].message.content == whole[:whole.index(word)]
    assert cut.choices[0].finish_reason == "stop"
    sampled = [chat(client, QUESTIONS[2], temperature=1.0, seed=seed).choices[0].message.content
               for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]
    # the same options through the Python API draw the same tokens
    direct = "".join(model.chat_stream([{"role": "user", "content": QUESTIONS[2]}], temperature=1.0, seed=7,
                                       max_new_tokens=64))
    assert sampled[0] == direct
    extra = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTIONS[2]}],
                                           temperature=0.8, seed=3, max_tokens=32,
                                           extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1})
    assert extra.choices[0].message.content == "".join(model.chat_stream(
        [{"role": "user", "content": QUESTIONS[2]}], temperature=0.8, seed=3, max_new_tokens=32, top_k=20,
        min_p=0.05, repetition_penalty=1.1))


def test_four_concurrent_clients_get_their_solo_tokens(client, server):
    solo = [chat(client, q).choices[0].message.content for q in QUESTIONS]
    results, errors = [None] * 4, []
    start = threading.Barrier(4)

    def ask(i):
        try:
            start.wait()
            if i % 2:
                results[i] = streamed_text(chat(client, QUESTIONS[i], stream=True))[0]
            else:
                results[i] = chat(client, QUESTIONS[i]).choices[0].message.content
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    batcher = server[1].model.backend.batcher
    before = (batcher.batches, batcher.steps)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and results == solo
    batches, steps = batcher.batches - before[0], batcher.steps - before[1]
    assert batches < 0.7 * steps, (batches, steps)  # their decode steps ran together


def wait_for_free_slots(state, timeout=60.0) -> None:
    deadline = time.monotonic() + timeout
    while state.slots.used:
        assert time.monotonic() < deadline, "a slot was not given back"
        time.sleep(0.02)


def open_stream(url: str, body: dict) -> http.client.HTTPConnection:
    """Starts a streaming request and reads its first two events; returns the open connection."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    events = 0
    while events < 2:
        line = response.fp.readline()
        events += line.startswith(b"data: ")
    return conn


COUNTING = {"model": "smollm2", "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 400, "temperature": 0}


def test_disconnect_mid_stream_stops_the_generation_and_frees_the_slot(model):
    with serving(model, max_sessions=1) as (url, state):
        conn = open_stream(url, COUNTING)
        status, headers, body = raw(url, "POST", "/v1/completions", json.dumps(COUNTING).encode())
        assert status == 429 and body["error"]["type"] == "rate_limit_error" and headers.get("retry-after") == "1"
        conn.sock.shutdown(2)
        conn.close()
        wait_for_free_slots(state)
        assert state.cancelled == 1  # stopped by the disconnect, long before its 400 tokens
        status, _, body = raw(url, "POST", "/v1/completions", json.dumps({**COUNTING, "max_tokens": 3}).encode())
        assert status == 200 and body["usage"]["completion_tokens"] == 3


def test_a_client_that_leaves_a_plain_request_frees_its_slot(model):
    with serving(model, max_sessions=1) as (url, state):
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        conn.request("POST", "/v1/completions", body=json.dumps(COUNTING), headers={"Content-Type": "application/json"})
        deadline = time.monotonic() + 60
        while not state.slots.used:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        conn.sock.shutdown(2)
        conn.close()
        wait_for_free_slots(state)
        assert state.cancelled == 1


BAD = [
    ("malformed JSON", b'{"model": "smollm2", "messages": [', 400, "invalid_request_error", None),
    ("not an object", b'[1, 2]', 400, "invalid_request_error", None),
    ("unknown model", {"model": "gpt-4o"}, 404, "invalid_request_error", "model"),
    ("negative max_tokens", {"max_tokens": -1}, 400, "invalid_request_error", "max_tokens"),
    ("max_tokens not a number", {"max_tokens": "many"}, 400, "invalid_request_error", "max_tokens"),
    ("no messages", {"messages": []}, 400, "invalid_request_error", "messages"),
    ("bad role", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_request_error", "messages"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "invalid_request_error", "messages"),
    ("negative temperature", {"temperature": -0.5}, 400, "invalid_request_error", "temperature"),
    ("top_p zero", {"top_p": 0}, 400, "invalid_request_error", "top_p"),
    ("two choices", {"n": 2}, 400, "invalid_request_error", "n"),
    ("top_logprobs alone", {"top_logprobs": 2}, 400, "invalid_request_error", "top_logprobs"),
    ("too many top_logprobs", {"logprobs": True, "top_logprobs": 21}, 400, "invalid_request_error", "top_logprobs"),
    ("presence penalty", {"presence_penalty": 0.5}, 400, "invalid_request_error", "presence_penalty"),
    ("tools on a template without them", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "invalid_request_error", "tools"),
    ("unknown response format", {"response_format": {"type": "yaml"}}, 400, "invalid_request_error",
     "response_format"),
    ("schema the engine cannot compile", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "(unclosed"}}}}, 400, "invalid_request_error",
     "response_format"),
    ("stop not strings", {"stop": [1, 2]}, 400, "invalid_request_error", "stop"),
    ("prompt over the context", {"messages": [{"role": "user", "content": "word " * 600}]}, 400,
     "invalid_request_error", "messages"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_chat_requests_get_openai_error_bodies(server, case):
    _, body, status, kind, param = case
    if isinstance(body, dict):
        body = json.dumps({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], **body}).encode()
    got, _, reply = raw(server[0], "POST", "/v1/chat/completions", body)
    assert got == status, reply
    assert set(reply) == {"error"} and reply["error"]["type"] == kind and reply["error"]["param"] == param
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
    assert server[1].slots.used == 0


def test_the_openai_client_sees_its_own_exceptions(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        chat(client, "hi", max_tokens=-3)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="smollm2", prompt="word " * 600)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model="smollm2", prompt=[10 ** 9])


def test_limits_paths_and_keys(model):
    with serving(model, api_key="s3cret", max_body=4096) as (url, state):
        status, _, body = raw(url, "POST", "/v1/chat/completions", b"x" * 5000, {"Authorization": "Bearer s3cret"})
        assert status == 413 and body["error"]["code"] == "request_too_large"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            status, _, body = raw(url, "GET", "/v1/models", headers=headers)
            assert status == 401 and body["error"]["type"] == "authentication_error"
        locked = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            locked.models.list()
        keyed = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in keyed.models.list()] == ["smollm2"]
        assert chat(keyed, QUESTIONS[0], max_tokens=4).usage.completion_tokens == 4
        status, _, body = raw(url, "GET", "/health")  # health needs no key
        assert status == 200 and body["status"] == "ok" and body["sessions"] == 0
        status, _, body = raw(url, "GET", "/v1/nothing")
        assert status == 404 and "error" in body
        status, _, body = raw(url, "GET", "/v1/chat/completions", headers={"Authorization": "Bearer s3cret"})
        assert status == 405 and "error" in body


def current_rss() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_200_sequential_requests_keep_rss_flat(client, server):
    def ask(i):
        if i % 2:
            return chat(client, QUESTIONS[i % 4], max_tokens=2)
        return list(chat(client, QUESTIONS[i % 4], max_tokens=2, stream=True))

    for i in range(20):
        ask(i)
    before = current_rss()
    for i in range(200):
        ask(i)
    grown = (current_rss() - before) / 2 ** 20
    assert grown < 8, f"RSS grew {grown:.1f} MiB over 200 requests"
    assert server[1].slots.used == 0


def served_line(proc) -> str:
    """The server's "edgephi serve: model ... at URL" line (after any first-run compile notice)."""
    for line in proc.stderr:
        if line.startswith("edgephi serve:"):
            return line
    raise AssertionError("the server exited without serving")


def test_serve_command(default_model_cache, model_dir, tmp_path):
    """The CLI as a user starts it: a free port, a key, a clean stop on SIGINT."""
    env = dict(os.environ, EDGEPHI_CACHE=str(default_model_cache), PYTHONPATH=str(ROOT), EDGEPHI_API_KEY="k1")
    proc = subprocess.Popen(EDGEPHI + ["serve", "--port", "0", "--context", str(CONTEXT), "--name", "local"],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = served_line(proc)
        found = re.search(r"model 'local' at http://127\.0\.0\.1:(\d+)/v1 .*API key required", line)
        assert found, line
        url = f"http://127.0.0.1:{found.group(1)}"
        keyed = openai.OpenAI(base_url=url + "/v1", api_key="k1", max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                models = keyed.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert [m.id for m in models] == ["local"]
        reply = keyed.chat.completions.create(model="local", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                              temperature=0, max_tokens=16)
        assert "Paris" in reply.choices[0].message.content
        taken = subprocess.run(EDGEPHI + ["serve", "--port", found.group(1)], capture_output=True, text=True,
                               env=env, cwd=ROOT, timeout=120)
        assert taken.returncode == 1 and taken.stderr.count("\n") == 1 and "cannot listen on" in taken.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        rest = proc.stderr.read()
        proc.stderr.close()
    assert proc.returncode == 0 and rest.endswith("edgephi serve: stopped\n"), rest


def test_sigterm_stops_the_server_cleanly(default_model_cache):
    """What a service manager sends: the server shuts down and exits 0."""
    env = dict(os.environ, EDGEPHI_CACHE=str(default_model_cache), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(EDGEPHI + ["serve", "--port", "0", "--host", "127.0.0.1"], stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT)
    try:
        line = served_line(proc)
        assert "edgephi serve: model 'smollm2-135m-instruct' at http://127.0.0.1:" in line, line
        assert "API key" not in line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        rest = proc.stderr.read()
        proc.stderr.close()
    assert proc.returncode == 0 and rest == "edgephi serve: stopped\n", rest


def test_without_the_serve_extra_one_line_says_what_to_install(default_model_cache):
    blocked = "import sys; sys.modules['uvicorn'] = None; from edgephi.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", blocked, "serve", "--port", "0"], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=120)
    assert done.returncode == 1 and done.stderr == "Error: edgephi serve needs its extra: pip install 'edgephi[serve]'\n"


JSON_SCHEMAS = [
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                      "population": {"type": "integer", "minimum": 0}},
     "required": ["city", "population"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                      "reasons": {"type": "array", "items": {"type": "string", "maxLength": 30},
                                                  "maxItems": 3}},
     "required": ["answer", "reasons"], "additionalProperties": False},
]


def test_response_format_json_schema_and_json_object(client):
    import jsonschema

    for i, schema in enumerate(JSON_SCHEMAS):
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}
        for options in ({}, {"temperature": 1.0, "seed": 5}):
            done = chat(client, QUESTIONS[0], response_format=fmt, max_tokens=200, **options)
            jsonschema.validate(json.loads(done.choices[0].message.content), schema)
            assert done.choices[0].finish_reason == "stop"
        text, _ = streamed_text(chat(client, QUESTIONS[1], response_format=fmt, max_tokens=200, stream=True))
        jsonschema.validate(json.loads(text), schema)
    anything = chat(client, QUESTIONS[3], response_format={"type": "json_object"}, max_tokens=200)
    assert isinstance(json.loads(anything.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError, match="cannot be compiled"):
        chat(client, "hi", response_format={"type": "json_schema", "json_schema": {
            "name": "bad", "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}}})
