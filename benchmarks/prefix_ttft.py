"""Time to first token of a chat with a long system prompt: cold, from a prefix another session
holds, turn 2 of a session, and a session resumed from a file; edgephi and llama.cpp on the same
GGUF weights and the same token ids, in one run.

    python benchmarks/prefix_ttft.py GGUF [--system-tokens 1000] [--threads 2] [--repetitions 3]

Each start is timed from the call to the first sampled token (greedy), median over repetitions:
- cold: a fresh context prefills system + question (edgephi without a prefix cache);
- shared prefix: a second conversation with the same system prompt and another question, after a
  first one (edgephi: its PrefixCache; llama.cpp: llama-cpp-python's reuse of the common prefix of
  what its context last evaluated, as create_completion does);
- turn 2: the next question in the same conversation after a 16-token reply;
- resumed: load a saved conversation from disk (edgephi: ChatSession.save / resume=; llama.cpp:
  llama_state_save_file / llama_state_load_file) and answer its next question.
The "cold equivalent" of turn 2 and resumed starts is a cold prefill of the whole conversation.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = ["What causes rain to fall?", "Why is the sky blue on a clear day?", "And what happens at night?",
             "Can you say that again more briefly?"]
REPLY_TOKENS = 16


def system_prompt(tokenizer, n_tokens: int) -> str:
    paragraph = ("You are a patient assistant who explains the weather, the water cycle and the climate to "
                 "curious people in plain words, with short answers and concrete examples. ")
    text = ""
    while len(tokenizer.encode(text)) < n_tokens:
        text += paragraph
    return text


class EdgephiChat:
    def __init__(self, folder, threads, context, prefix_cache=None):
        import edgephi

        self.model = edgephi.load(folder, threads=threads, context=context, prefix_cache=prefix_cache)

    def session(self, system, resume=None):
        return self.model.chat_session(system=None if resume else system, resume=resume,
                                       max_new_tokens=REPLY_TOKENS, ignore_eos=True)

    @staticmethod
    def first_token(session, question) -> tuple[float, object]:
        started = time.perf_counter()
        reply = session.send(question)
        next(reply)
        seconds = time.perf_counter() - started
        return seconds, reply


class LlamaCppChat:
    """llama.cpp fed the token ids edgephi's chat template rendered (replies included), so both
    runtimes compute the same prompts and keep the same contexts."""

    def __init__(self, gguf, threads, context):
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=context,
                                   n_batch=512, verbose=False)

    def hold(self, ids) -> None:
        """Make the context hold ids: keep the common prefix with what it holds, evaluate the rest
        (eval() drops the cache past n_tokens itself)."""
        llm = self.llm
        common = 0
        for a, b in zip(llm._input_ids, ids):
            if a != b:
                break
            common += 1
        llm.n_tokens = min(common, len(ids) - 1) if len(ids) else 0
        if llm.n_tokens < len(ids):
            llm.eval(ids[llm.n_tokens:])

    def first_token(self, ids) -> float:
        started = time.perf_counter()
        self.hold(ids)
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))
        int(np.argmax(logits))
        return time.perf_counter() - started

    def save(self, path: Path) -> None:
        ids = (self.lib.llama_token * self.llm.n_tokens)(*self.llm._input_ids)
        assert self.lib.llama_state_save_file(self.llm.ctx, str(path).encode(), ids, self.llm.n_tokens)

    def load(self, path: Path) -> None:
        self.llm.reset()
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.llm.ctx), True)
        capacity = self.llm.n_ctx()
        ids = (self.lib.llama_token * capacity)()
        count = ctypes.c_size_t(0)
        assert self.lib.llama_state_load_file(self.llm.ctx, str(path).encode(), ids, capacity, ctypes.byref(count))
        self.llm.input_ids[:count.value] = ids[:count.value]
        self.llm.n_tokens = count.value


def run_edgephi(folder, args, system, tmp: Path) -> dict:
    cold = EdgephiChat(folder, args.threads, args.context, prefix_cache=0)
    warm = EdgephiChat(folder, args.threads, args.context)
    times = {k: [] for k in ("cold", "shared prefix", "turn 2", "resumed", "cold turn 2", "cold resumed")}
    from edgephi.session_file import model_identity

    started = time.perf_counter()
    model_identity(Path(folder))  # once per model file; remembered in the user cache afterwards
    info = {"identity s": time.perf_counter() - started}
    for _ in range(args.repetitions):
        warm.model.prefix_cache.clear()
        seconds, reply = cold.first_token(cold.session(system), QUESTIONS[0])
        list(reply)
        times["cold"].append(seconds)
        first = warm.session(system)
        list(first.send(QUESTIONS[0]))  # fills the prefix cache
        second = warm.session(system)
        seconds, reply = warm.first_token(second, QUESTIONS[1])
        list(reply)
        times["shared prefix"].append(seconds)
        info["shared"] = (second.last_stats.prompt_tokens, second.last_stats.cached_tokens)
        seconds, reply = warm.first_token(second, QUESTIONS[2])
        list(reply)
        times["turn 2"].append(seconds)
        info.setdefault("new", {})["turn 2"] = second.last_stats.prompt_tokens
        path = tmp / "chat.session"
        started = time.perf_counter()
        second.save(path)
        info["save s"] = time.perf_counter() - started
        info["file MiB"] = path.stat().st_size / 2**20
        fresh = EdgephiChat(folder, args.threads, args.context, prefix_cache=0)  # as a new process would
        started = time.perf_counter()
        resumed = fresh.session(None, resume=path)
        opened = time.perf_counter() - started
        seconds, reply = fresh.first_token(resumed, QUESTIONS[3])
        list(reply)
        times["resumed"].append(opened + seconds)
        info["new"]["resumed"] = resumed.last_stats.prompt_tokens
        # cold prefills of the whole conversations those two starts continue
        for name, session, question in (("cold turn 2", second, QUESTIONS[2]), ("cold resumed", resumed, QUESTIONS[3])):
            replay = cold.session(system)
            replay.messages = session.messages[:-2]
            seconds, reply = cold.first_token(replay, question)
            list(reply)
            times[name].append(seconds)
        conversations = {"turn 2": second, "resumed": resumed}
    info["ids"] = {name: session.template.encode(session.messages[:-1], add_generation_prompt=True)
                   for name, session in conversations.items()}
    info["ids"]["cold"] = first.template.encode(first.messages[:2], add_generation_prompt=True)
    info["ids"]["shared prefix"] = second.template.encode(second.messages[:2], add_generation_prompt=True)
    return {k: statistics.median(v) for k, v in times.items()}, info


def run_llamacpp(gguf, args, ids: dict, new: dict, tmp: Path) -> dict:
    """The same starts on llama.cpp: ids[start] is the prompt edgephi answered, new[start] how many
    of its tokens edgephi computed (the rest came from its cache); llama.cpp's context is brought
    to hold the others, untimed, before each timed start."""
    chat = LlamaCppChat(gguf, args.threads, args.context)
    times = {k: [] for k in ("cold", "shared prefix", "turn 2", "resumed", "cold turn 2", "cold resumed")}
    for _ in range(args.repetitions):
        chat.llm.reset()
        times["cold"].append(chat.first_token(ids["cold"]))
        times["shared prefix"].append(chat.first_token(ids["shared prefix"]))  # reuses the system prompt
        chat.hold(ids["turn 2"][:-new["turn 2"]])  # the reply, as edgephi's session holds it
        times["turn 2"].append(chat.first_token(ids["turn 2"]))
        chat.hold(ids["resumed"][:-new["resumed"]])
        path = tmp / "llama.state"
        chat.save(path)
        started = time.perf_counter()
        chat.load(path)
        opened = time.perf_counter() - started
        times["resumed"].append(opened + chat.first_token(ids["resumed"]))
        for name in ("turn 2", "resumed"):
            chat.llm.reset()
            times[f"cold {name}"].append(chat.first_token(ids[name]))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--system-tokens", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--context", type=int, default=2048)
    args = ap.parse_args()
    from edgephi.convert import convert

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "m"
        convert(args.gguf, folder, quant=None)
        import edgephi

        system = system_prompt(edgephi.load(folder, threads=1, context=8).tokenizer, args.system_tokens)
        ours, info = run_edgephi(folder, args, system, tmp)
        theirs = run_llamacpp(args.gguf, args, info["ids"], info["new"], tmp)
    prompt, cached = info["shared"]
    print(f"{args.gguf.name}, {args.threads} threads, median of {args.repetitions}; seconds to the first token. "
          f"Shared prefix: a {prompt}-token prompt, {cached} of them reused")
    print(f"{'start':16} {'edgephi':>9} {'vs cold':>8} {'llama.cpp':>10} {'vs cold':>8} {'ratio':>7}")
    for name, cold in (("cold", "cold"), ("shared prefix", "cold"), ("turn 2", "cold turn 2"),
                       ("resumed", "cold resumed")):
        print(f"{name:16} {ours[name]:9.3f} {ours[name] / ours[cold]:7.1%} {theirs[name]:10.3f} "
              f"{theirs[name] / theirs[cold]:7.1%} {theirs[name] / ours[name]:6.2f}x")
    print(f"cold equivalents: turn 2 {ours['cold turn 2']:.3f} vs {theirs['cold turn 2']:.3f} s, resumed "
          f"{ours['cold resumed']:.3f} vs {theirs['cold resumed']:.3f} s")
    print(f"edgephi session file: {info['file MiB']:.1f} MiB, saved in {info['save s']:.3f} s; hashing the weights "
          f"for the model's identity, once per model file (then remembered): {info['identity s']:.2f} s")


if __name__ == "__main__":
    main()
