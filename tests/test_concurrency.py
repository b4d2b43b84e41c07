"""One loaded model shared by threads and by interleaved conversations (#12): every generation
owns its KV cache, so results equal the same runs made one after another, and no conversation
sees another's context. The reference is the sequential run on the real SmolLM2 chat model."""

from __future__ import annotations

import gc
import threading
import weakref

import numba
import pytest

import edgephi
from edgephi.convert import convert
from edgephi.errors import EdgephiError

pytestmark = pytest.mark.integration  # the real SmolLM2 model

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colours are"]
CONVERSATIONS = [["What is the capital of France?", "And of Germany?", "Which one is larger?"],
                 ["Name a prime number.", "And the next one?", "Is 91 prime?"],
                 ["Write a haiku about the sea.", "Now one about mountains.", "Which do you prefer?"]]


@pytest.fixture(scope="module")
def model(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("concurrency") / "smollm2"
    convert(smollm2_gguf, out, quant=None)
    return edgephi.load(out, context=512)


def run_in_threads(work: list) -> list:
    """Runs each callable in its own thread, all released at once; returns their results in order."""
    start = threading.Barrier(len(work))
    results, errors = [None] * len(work), []

    def runner(i):
        start.wait()
        try:
            results[i] = work[i]()
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    return results


def converse(model, turns: list[str]) -> list[str]:
    session = model.chat_session(max_new_tokens=24)
    return [session(turn) for turn in turns]


def test_threads_generating_at_once_equal_sequential_runs(model):
    sequential = [model.generate_tokens(model.prompt_ids(p), max_new_tokens=24, ignore_eos=True) for p in PROMPTS]
    sequential = [list(tokens) for tokens in sequential]
    assert len({tuple(t) for t in sequential}) == len(PROMPTS)  # distinct outputs: a mix-up would show
    together = run_in_threads([lambda p=p: list(model.generate_tokens(model.prompt_ids(p), max_new_tokens=24,
                                                                        ignore_eos=True)) for p in PROMPTS])
    assert together == sequential


def test_chats_in_threads_equal_sequential_chats(model):
    sequential = [converse(model, turns) for turns in CONVERSATIONS]
    together = run_in_threads([lambda t=turns: converse(model, t) for turns in CONVERSATIONS])
    assert together == sequential
    assert "Paris" in sequential[0][0]  # a real answer, so a leak between conversations would show


def test_interleaved_chat_streams_keep_conversations_apart(model):
    alone = [converse(model, turns) for turns in CONVERSATIONS[:2]]
    a, b = model.chat_session(max_new_tokens=24), model.chat_session(max_new_tokens=24)
    replies = [[], []]
    for turn in range(3):
        streams = [a.send(CONVERSATIONS[0][turn]), b.send(CONVERSATIONS[1][turn])]
        pieces = [[], []]
        live = [True, True]
        while any(live):  # one piece of each in turn, in one thread
            for i, stream in enumerate(streams):
                if live[i]:
                    piece = next(stream, None)
                    live[i] = piece is not None
                    if piece is not None:
                        pieces[i].append(piece)
        for i in range(2):
            replies[i].append("".join(pieces[i]))
    assert replies == alone
    # switching between the sessions re-fed nothing: turn 3 fed only its own turn's tokens
    assert a.last_stats.prompt_tokens < 30 and b.last_stats.prompt_tokens < 30


def test_generate_between_chat_turns_changes_nothing(model):
    alone = converse(model, CONVERSATIONS[0])
    session = model.chat_session(max_new_tokens=24)
    mixed = []
    for turn in CONVERSATIONS[0]:
        mixed.append(session(turn))
        model.generate("Unrelated text about the weather", max_new_tokens=8)
    assert mixed == alone


def test_models_keep_their_own_thread_counts(model, monkeypatch):
    """Model(threads=...) no longer sets a process-wide count: each step runs with its model's,
    and the calling thread's own count is left as it was."""
    import edgephi.model

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two cores to tell one thread count from another")
    one = edgephi.load(model.folder, threads=1, context=64)
    two = edgephi.load(model.folder, threads=2, context=64)
    seen = []

    def recording(real):
        def run(*args):
            seen.append(numba.get_num_threads())
            return real(*args)
        return run

    monkeypatch.setattr(edgephi.model, "forward", recording(edgephi.model.forward))  # prefill steps
    for m in (one, two):  # decode steps call the compiled code directly
        monkeypatch.setattr(m.backend, "_decode_step", recording(m.backend._decode_step))
    app_count = numba.get_num_threads()
    one.generate("Hi", max_new_tokens=2, ignore_eos=True)
    two.generate("Hi", max_new_tokens=2, ignore_eos=True)
    run_in_threads([lambda: one.generate("Hi", max_new_tokens=2, ignore_eos=True)])
    assert seen == [1, 1, 2, 2, 1, 1]
    assert numba.get_num_threads() == app_count


def test_a_sequence_stepping_in_one_thread_refuses_a_second(model, monkeypatch):
    import edgephi.model

    inside, release = threading.Event(), threading.Event()
    real = edgephi.model.forward

    def held(*args):  # the first thread stays inside its step until the second has tried
        inside.set()
        release.wait(60)
        return real(*args)

    sequence = model.sequence()
    monkeypatch.setattr(edgephi.model, "forward", held)
    first = threading.Thread(target=sequence.feed, args=([1, 2, 3],))
    first.start()
    assert inside.wait(60)
    try:
        with pytest.raises(EdgephiError, match="already stepping in another thread"):
            sequence.step(4)
    finally:
        release.set()
        first.join(60)
    monkeypatch.setattr(edgephi.model, "forward", real)
    assert sequence.next_pos == 3  # the refused step changed nothing
    assert sequence.step(4).shape == (1, model.config.vocab_size)


def test_closed_session_is_refused_and_frees_its_cache(model):
    session = model.chat_session(max_new_tokens=4)
    session("Hello")
    cache = weakref.ref(session.sequence.cache)
    session.close()
    gc.collect()
    assert cache() is None  # nothing else holds the KV arrays
    with pytest.raises(EdgephiError, match="closed"):
        session("Hello again")


def test_an_interrupted_reply_leaves_the_next_turn_exact(model, monkeypatch):
    """Ctrl-C lands inside a step, after the token entered the cache but before the session
    recorded it: the next turn still equals the whole conversation fed to a fresh context."""
    import edgephi.model

    session = model.chat_session(max_new_tokens=24)
    calls = []

    def interrupted(real):
        def run(*args):
            result = real(*args)
            calls.append(1)
            if len(calls) == 6:
                raise KeyboardInterrupt
            return result
        return run

    monkeypatch.setattr(edgephi.model, "forward", interrupted(edgephi.model.forward))  # prefill steps
    monkeypatch.setattr(model.backend, "_decode_step", interrupted(model.backend._decode_step))  # decode steps
    with pytest.raises(KeyboardInterrupt):
        session("What is the capital of France?")
    monkeypatch.undo()
    reply = session("And of Germany?")
    ids = session.template.encode(session.messages[:-1], add_generation_prompt=True)
    assert reply == model.generate(ids, max_new_tokens=24)
    tokens, _, _ = session.sequence.cache.cached_tokens()
    assert tokens.tolist()[:len(ids)] == ids


def test_reset_while_a_reply_streams_is_refused(model):
    session = model.chat_session(max_new_tokens=8)
    reply = session.send("Hello")
    next(reply)
    with pytest.raises(EdgephiError, match="is answering"):
        session.reset()
    "".join(reply)
    session.reset()
    assert session.messages == [] and session.sequence.next_pos == 0


def test_a_session_answers_one_turn_at_a_time(model):
    session = model.chat_session(max_new_tokens=8)
    first = session.send("What is the capital of France?")
    next(first)  # the reply has started
    with pytest.raises(EdgephiError, match="is answering"):
        next(session.send("And of Germany?"))
    rest = "".join(first)
    assert session.messages[-1]["role"] == "assistant" and rest in session.messages[-1]["content"]
    assert [m["role"] for m in session.messages] == ["user", "assistant"]  # the refused turn left no trace
    session("And of Germany?")  # once the first reply is done, the next turn runs
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
