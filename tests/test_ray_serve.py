"""Beyond one board (#18): replicas of edgephi's OpenAI server behind Ray Serve, as
examples/ray_serve.py sets them up, on loopback: Ray's proxy balances the official openai client's
requests over two replicas, and greedy replies equal `edgephi chat`'s."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")  # the test extra installs ray[serve]
openai = pytest.importorskip("openai")

pytestmark = pytest.mark.integration  # a local Ray cluster and the real default model

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "Write a haiku about the sea.",
             "What is 12 times 12?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_replicas_behind_ray_serve_answer_like_edgephi_chat(default_model_cache):
    from ray import serve

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import ray_serve
    finally:
        sys.path.remove(str(ROOT / "examples"))
    from edgephi import models
    from edgephi.default_model import default_model_path

    env = dict(os.environ, EDGEPHI_CACHE=str(default_model_cache), PYTHONPATH=str(ROOT))
    expected = subprocess.run([sys.executable, "-c", "from edgephi.cli import main; main()", "chat", "--max-tokens",
                               "48"], input=f"{QUESTIONS[0]}\n", capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=600).stdout.splitlines()[0]
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(ray_serve.application(str(default_model_path(models.default_model())), replicas=2,
                                        model_id="smollm2"), name="edgephi", route_prefix="/")
        states = serve.status().applications["edgephi"].deployments["edgephi"].replica_states
        assert states.get("RUNNING") == 2, states
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
        assert [m.id for m in client.models.list()] == ["smollm2"]
        replies, errors = [None] * 4, []

        def ask(i):
            try:
                kwargs = dict(model="smollm2", messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0,
                              max_tokens=48)
                if i % 2:
                    chunks = client.chat.completions.create(stream=True, **kwargs)
                    replies[i] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                else:
                    replies[i] = client.chat.completions.create(**kwargs).choices[0].message.content
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not errors and replies == [expected] * 4
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    finally:
        serve.shutdown()
        ray.shutdown()
