"""edgephi vs llama.cpp on the same GGUF weights and threads, alternating runs; prints medians and ratios.

    python benchmarks/compare_llamacpp.py GGUF [--threads 2] [--prompt-tokens 512] [--gen-tokens 128]

llama-bench's convention: pp = prefill of a P-token prompt in one go; tg = G single-token decode
steps from an empty context; also tg after the prompt (decode at a context of P tokens).
Tokenization and sampling are excluded. The GGUF is converted losslessly into a temporary
edgephi folder first. Needs llama-cpp-python (a test dependency).

Then each runtime loads the model, prefills the prompt and decodes in a process of its own, and the
table's last column is that process's peak RSS (both map their weights file).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed_run(reset, feed, step, prompt, gen):
    """(pp tok/s, tg tok/s from an empty context, tg tok/s after the prompt)."""
    reset()
    t0 = time.perf_counter()
    for tok in gen:
        step(tok)
    t1 = time.perf_counter()
    reset()
    t2 = time.perf_counter()
    feed(prompt)
    t3 = time.perf_counter()
    for tok in gen:
        step(tok)
    t4 = time.perf_counter()
    return len(prompt) / (t3 - t2), len(gen) / (t1 - t0), len(gen) / (t4 - t3)


MEMORY_RUN = {
    "edgephi": """
import edgephi
m = edgephi.load(args["folder"], threads=args["threads"], context=args["context"]).sequence()
m.feed(args["prompt"])
for t in args["gen"]:
    m.step(t)
""",
    "llama.cpp": """
import llama_cpp
llm = llama_cpp.Llama(args["gguf"], n_threads=args["threads"], n_threads_batch=args["threads"],
                      n_ctx=args["context"], n_batch=len(args["prompt"]), verbose=False)
llm.eval(args["prompt"])
for t in args["gen"]:
    llm.eval([t])
""",
}
# The child reports its own peak: the ru_maxrss that wait4 returns would include this process's
# peak, both models loaded, which Linux carries into a child across exec (edgephi/rss.py).
PEAK_LINE = """
from edgephi.rss import peak_rss_mib
print(peak_rss_mib())
"""


def peak_rss_mib(runtime: str, args: dict) -> float:
    """Peak RSS of a fresh process that loads the model, prefills the prompt and decodes."""
    code = "import json, sys\nargs = json.loads(sys.stdin.read())\n" + MEMORY_RUN[runtime] + PEAK_LINE
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(args), capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise SystemExit(f"the {runtime} memory run failed:\n{done.stderr}")
    return float(done.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repetitions", type=int, default=5)
    args = ap.parse_args()

    import llama_cpp

    import edgephi
    from edgephi.convert import convert

    with tempfile.TemporaryDirectory() as tmp:
        convert(args.gguf, Path(tmp) / "m", quant=None)
        model = edgephi.load(Path(tmp) / "m", threads=args.threads, context=args.prompt_tokens + args.gen_tokens + 8)
        llm = llama_cpp.Llama(str(args.gguf), n_threads=args.threads, n_threads_batch=args.threads,
                              n_ctx=args.prompt_tokens + args.gen_tokens + 8, n_batch=args.prompt_tokens,
                              verbose=False)
        rng = np.random.default_rng(0)
        vocab = min(model.config.vocab_size, llm.n_vocab())
        prompt = [int(t) for t in rng.integers(100, vocab, args.prompt_tokens)]
        gen = [int(t) for t in rng.integers(100, vocab, args.gen_tokens)]
        sequence = model.sequence()
        runners = {"edgephi": (sequence.reset, sequence.feed, sequence.step),
                   "llama.cpp": (llm.reset, llm.eval, lambda tok: llm.eval([tok]))}
        for runner in runners.values():  # compile / warm up both
            timed_run(*runner, prompt[:64], gen[:8])
        results = {k: [] for k in runners}
        for _ in range(args.repetitions):
            for k, runner in runners.items():
                results[k].append(timed_run(*runner, prompt, gen))
        del model, sequence, llm
        run_args = {"folder": str(Path(tmp) / "m"), "gguf": str(args.gguf), "threads": args.threads,
                    "context": args.prompt_tokens + args.gen_tokens + 8, "prompt": prompt, "gen": gen}
        rss = {k: peak_rss_mib(k, run_args) for k in runners}
    med = {k: [statistics.median(r[i] for r in v) for i in range(3)] for k, v in results.items()}
    P, G = args.prompt_tokens, args.gen_tokens
    print(f"{args.gguf.name}, {args.threads} threads, median of {args.repetitions} alternating runs (tok/s)")
    print(f"{'':12} {f'pp{P}':>10} {f'tg{G}':>10} {f'tg{G}@{P}':>12} {'peak RSS MiB':>14}")
    for k, row in med.items():
        print(f"{k:12} {row[0]:10.1f} {row[1]:10.1f} {row[2]:12.1f} {rss[k]:14.0f}")
    ratios = [e / l for e, l in zip(med["edgephi"], med["llama.cpp"])]
    print(f"{'ratio':12} {ratios[0]:9.2f}x {ratios[1]:9.2f}x {ratios[2]:11.2f}x {rss['edgephi'] / rss['llama.cpp']:13.2f}x")
    print(f"the GGUF file: {args.gguf.stat().st_size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
