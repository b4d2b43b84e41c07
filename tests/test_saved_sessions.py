"""Saved chat sessions: a resumed session goes on exactly as the uninterrupted one (tokens and
cache), the file is refused in one line when it is truncated, foreign or from another model, and a
failed save or resume leaves the files as they were."""

import json
import os
import struct

import numpy as np
import pytest

import edgephi
from edgephi.convert import convert
from edgephi.errors import EdgephiError
from edgephi.session_file import SessionFileError


@pytest.fixture(scope="module")
def folders(checkpoint_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("sessions")
    one, other = root / "llama-q4_1", root / "gqa-q4_0"
    convert(checkpoint_factory("llama"), one, quant="q4_1")
    convert(checkpoint_factory("phi3_gqa_partial"), other, quant="q4_0")
    return one, other


@pytest.fixture(scope="module")
def model(folders):
    return edgephi.load(folders[0], context=512)


def next_logits(session):
    """The logits the session's cache gives one more token, without changing the session."""
    sequence = session.sequence
    logits = sequence.feed([5]).copy()
    sequence.truncate(sequence.next_pos - 1)
    return logits


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.9, seed=4)])
@pytest.mark.parametrize("kv_dtype", ["float16", "int8"])
def test_a_resumed_session_goes_on_as_the_uninterrupted_one(folders, tmp_path, settings, kv_dtype):
    model = edgephi.load(folders[0], context=512, kv_dtype=kv_dtype)
    path = tmp_path / "chat.session"
    whole = model.chat_session(system="be brief", max_new_tokens=12, **settings)
    whole("tell me about the fox")
    whole.save(path)
    later = [whole("and the dog"), whole("why")]
    resumed = model.chat_session(resume=path, max_new_tokens=12, **settings)
    assert resumed.messages == whole.messages[:len(resumed.messages)]
    assert [resumed("and the dog"), resumed("why")] == later
    assert resumed.messages == whole.messages
    assert np.array_equal(next_logits(resumed), next_logits(whole))


def test_a_session_saved_after_its_ring_wrapped_resumes_exactly(model, tmp_path):
    """A 64-token ring that has overwritten its oldest turns: only the used slots and the
    counters that place them are saved, and the resumed ring goes on as the original."""
    path = tmp_path / "wrapped.session"
    whole = model.chat_session(system="sys", max_new_tokens=10, context=64, ignore_eos=True)
    for text in ("one two three four", "five six seven", "eight nine ten"):
        whole(text)
    assert whole.sequence.cache.lost_below > 0, "precondition: the ring wrapped"
    whole.save(path)
    resumed = model.chat_session(resume=path, max_new_tokens=10, ignore_eos=True)
    assert resumed.sequence.capacity == 64
    assert resumed("eleven") == whole("eleven")
    assert np.array_equal(next_logits(resumed), next_logits(whole))


def test_a_resumed_sessions_prompt_is_shared(model, tmp_path):
    """Another session starting with the resumed one's prompt takes it from the prefix cache."""
    path = tmp_path / "shared.session"
    system = " ".join(["a long shared system prompt about foxes and dogs"] * 8)
    first = edgephi.load(model.folder, context=512).chat_session(system=system, max_new_tokens=4)
    first("hello")
    first.save(path)
    fresh = edgephi.load(model.folder, context=512)
    fresh.chat_session(resume=path)
    other = fresh.chat_session(system=system, max_new_tokens=4)
    other("something else")
    assert other.last_stats.cached_tokens > 0.8 * other.last_stats.prompt_tokens


def saved(model, path):
    session = model.chat_session(max_new_tokens=5)
    session("hello")
    session.save(path)
    return path.read_bytes()


def rewrite_metadata(data: bytes, change) -> bytes:
    """The session file with its safetensors header's __metadata__ passed through change()."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    change(header["__metadata__"])
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def test_bad_session_files_are_one_line_errors_and_stay_untouched(model, folders, tmp_path):
    good = saved(model, tmp_path / "good.session")
    other_model = edgephi.load(folders[1], context=512)
    foreign = saved(other_model, tmp_path / "foreign.session")

    def state(change):
        return rewrite_metadata(good, lambda meta: meta.update(state=json.dumps(change(json.loads(meta["state"])))))

    cases = {
        "truncated": (good[:len(good) // 2], "truncated"),
        "empty": (b"", "not a readable session file"),
        "another model": (foreign, "saved with another model"),
        "not a session": (rewrite_metadata(good, lambda m: m.update(format="something")), "not an edgephi session"),
        "newer version": (rewrite_metadata(good, lambda m: m.update(version="9")), "version '9'"),
        "kv type": (rewrite_metadata(good, lambda m: m.update(kv_dtype="int8")), "kv_dtype"),
        "bad json": (rewrite_metadata(good, lambda m: m.update(state="{")), "corrupt session state"),
        "counters": (state(lambda s: {**s, "next_pos": -3}), "ring counters"),
        "capacity": (state(lambda s: {**s, "capacity": 2}), "ring sizes"),
        "messages": (state(lambda s: {**s, "messages": [{"role": "robot", "content": 1}]}), "messages"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.session"
        path.write_bytes(data)
        before = os.stat(path)
        with pytest.raises(SessionFileError) as caught:
            model.chat_session(resume=path)
        text = str(caught.value)
        assert message in text and str(path) in text and "\n" not in text, (name, text)
        after = os.stat(path)
        assert path.read_bytes() == data and after.st_mtime_ns == before.st_mtime_ns, name
    with pytest.raises(SessionFileError, match="saved with another model"):
        other_model.chat_session(resume=tmp_path / "good.session")


def test_version_1_files_resume_unless_they_hold_the_old_int8_kv(model, folders, tmp_path):
    """Version 2 changed only the int8 KV's layout (float16 scales per 16 values, were float32 per
    32): a version-1 file of a float cache resumes as before, a version-1 int8 one is refused."""
    old_float = tmp_path / "float.session"
    old_float.write_bytes(rewrite_metadata(saved(model, tmp_path / "f.session"), lambda m: m.update(version="1")))
    assert model.chat_session(resume=old_float, max_new_tokens=3).messages[0]["content"] == "hello"
    int8_model = edgephi.load(folders[0], context=512, kv_dtype="int8")
    old_int8 = tmp_path / "int8.session"
    data = rewrite_metadata(saved(int8_model, tmp_path / "i.session"), lambda m: m.update(version="1"))
    old_int8.write_bytes(data)
    with pytest.raises(SessionFileError, match="version 1 holds an int8 KV cache in the old blocks of 32"):
        int8_model.chat_session(resume=old_int8)
    assert old_int8.read_bytes() == data


def test_hostile_slots_and_ids_are_refused(model, tmp_path):
    """Arrays that would place slots outside the ring or ids outside the vocabulary."""
    from safetensors.numpy import load_file, save_file

    path = tmp_path / "good.session"
    saved(model, path)
    meta = edgephi.safetensors_io.SafetensorsFile(path).metadata
    for name, value in (("slots", 10_000), ("tokens", 10_000), ("fed", -1), ("positions", 10_000)):
        tensors = load_file(str(path))
        tensors[name] = tensors[name].copy()
        tensors[name][0] = value
        bad = tmp_path / f"{name}.session"
        save_file(tensors, str(bad), metadata=meta)
        with pytest.raises(SessionFileError):
            model.chat_session(resume=bad)
    tensors = load_file(str(path))
    tensors["k"] = tensors["k"][:, :1]
    save_file(tensors, str(tmp_path / "short.session"), metadata=meta)
    with pytest.raises(SessionFileError, match="corrupt session file"):
        model.chat_session(resume=tmp_path / "short.session")


def test_saving_is_atomic(model, tmp_path):
    """A save that fails (here: the target is a folder) raises one line and leaves no temporary
    file; a save over an existing session replaces it whole."""
    path = tmp_path / "chat.session"
    first = saved(model, path)
    session = model.chat_session(max_new_tokens=5)
    session("something longer than the first one, to change the file")
    (tmp_path / "folder.session").mkdir()
    with pytest.raises(EdgephiError, match="cannot save the session"):
        session.save(tmp_path / "folder.session")
    session.save(path)
    assert path.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.session", "folder.session"]
    assert model.chat_session(resume=path).messages == session.messages


def test_resume_arguments_are_checked(model, tmp_path):
    path = tmp_path / "chat.session"
    saved(model, path)
    with pytest.raises(ValueError, match="keeps the system prompt"):
        model.chat_session(resume=path, system="other")
    with pytest.raises(ValueError, match="context of 512"):
        model.chat_session(resume=path, context=128)
    with pytest.raises(SessionFileError, match="missing"):
        model.chat_session(resume=tmp_path / "missing.session")


def test_a_changed_weights_file_is_another_model(folders, tmp_path):
    """The model's identity is remembered between runs, keyed by the files' sizes and times: a
    weights file rewritten in place (same size) is still seen as another model."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(folders[0], folder)
    path = tmp_path / "chat.session"
    saved(edgephi.load(folder, context=512), path)
    assert edgephi.load(folder, context=512).chat_session(resume=path).messages  # the remembered identity
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last byte of the last tensor's data
    weights.write_bytes(bytes(data))
    with pytest.raises(SessionFileError, match="saved with another model"):
        edgephi.load(folder, context=512).chat_session(resume=path)


def test_kv_from_other_kernels_is_resumed_but_not_shared(model, tmp_path):
    """A session saved by another edgephi version or ISA (which may round differently) goes on,
    but its KV never reaches the prefix cache, which promises a cold prefill's bits."""
    path = tmp_path / "chat.session"
    system = " ".join(["a long shared system prompt about foxes and dogs"] * 8)
    session = model.chat_session(system=system, max_new_tokens=4)
    session("hello")
    session.save(path)
    path.write_bytes(rewrite_metadata(path.read_bytes(), lambda meta: meta.update(kernels="edgephi 0.0.1 avx2")))
    fresh = edgephi.load(model.folder, context=512)
    resumed = fresh.chat_session(resume=path, max_new_tokens=4)
    assert resumed.sequence.cache.exact_prefix == 0 and len(fresh.prefix_cache) == 0
    assert resumed("again") == session("again")
