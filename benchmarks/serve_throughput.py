"""Throughput of `edgephi serve` under concurrent requests (#18): 1, 2, 4 and 8 clients each stream
greedy completions of a fixed length from one server process, started here on a free port.

    python benchmarks/serve_throughput.py [MODEL] [--tokens 64] [--rounds 3] [--clients 1,2,4,8]

Prints, per number of clients: total tokens/s, tokens/s per request, p50/p95 time to first token,
the decode steps' mean batch size, and the server's resident memory; then the ratio of 4 clients'
total to one client's (#18 asks for >= 2.5). Each client sends its own prompt (different lengths),
with ignore_eos so every reply is exactly --tokens long. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The history of the printing press begins", "Here is a recipe for bread:", "def parse_config(path):",
           "Dear team, this week we", "The water cycle is", "In 1905 Albert Einstein published",
           "A short story about a lighthouse keeper:", "The rules of chess are"]


def start_server(model: str | None, context: int, sessions: int) -> tuple[subprocess.Popen, int]:
    args = [sys.executable, "-c", "from edgephi.cli import main; main()", "serve", "--port", "0",
            "--context", str(context), "--max-sessions", str(sessions)] + (["-m", model] if model else [])
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    for line in proc.stderr:
        found = re.search(r"at http://127\.0\.0\.1:(\d+)/v1", line)
        if found:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining
            return proc, int(found.group(1))
        print(line, end="", file=sys.stderr)
    raise SystemExit("the server did not start")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def one_request(port: int, prompt: str, tokens: int) -> tuple[float, float, int]:
    """(time to first token, total seconds, tokens) of one streamed greedy completion."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
                       "ignore_eos": True, "stream_options": {"include_usage": True}})
    started = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    first, count = None, 0
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            count = chunk["usage"]["completion_tokens"]
        elif first is None and chunk["choices"][0]["text"]:
            first = time.perf_counter() - started
    conn.close()
    return first, time.perf_counter() - started, count


def decode_counts(port: int) -> tuple[int, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/health")
    health = json.loads(conn.getresponse().read())
    conn.close()
    return health["decode_steps"], health["decode_batches"]


def run_clients(port: int, clients: int, tokens: int, rounds: int, pid: int) -> dict:
    ttfts, per_request, peak = [], [], [0.0]
    done_tokens = [0]
    lock = threading.Lock()
    stop = threading.Event()

    def sample_rss():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mib(pid))
            time.sleep(0.05)

    def client(i):
        for r in range(rounds):
            ttft, total, count = one_request(port, PROMPTS[(i + r) % len(PROMPTS)], tokens)
            with lock:
                ttfts.append(ttft)
                per_request.append(count / total)
                done_tokens[0] += count

    steps0, batches0 = decode_counts(port)
    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    stop.set()
    sampler.join()
    ttfts.sort()
    steps, batches = decode_counts(port)
    return {"clients": clients, "mean_batch": (steps - steps0) / max(1, batches - batches0), "total_tok_s": done_tokens[0] / wall, "per_request_tok_s": statistics.mean(per_request),
            "ttft_p50_s": statistics.median(ttfts), "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))],
            "peak_rss_mib": peak[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--context", type=int, default=1024)
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    proc, port = start_server(args.model, args.context, max(counts))
    try:
        one_request(port, PROMPTS[0], 8)  # warm: the first steps map pages and fill caches
        idle = rss_mib(proc.pid)
        rows = []
        print(f"{'clients':>7} {'total tok/s':>11} {'per request':>11} {'TTFT p50':>9} {'TTFT p95':>9} "
              f"{'batch':>5} {'peak RSS MiB':>12}")
        for n in counts:
            row = run_clients(port, n, args.tokens, args.rounds, proc.pid)
            rows.append(row)
            print(f"{n:>7} {row['total_tok_s']:>11.1f} {row['per_request_tok_s']:>11.1f} {row['ttft_p50_s']:>8.3f}s "
                  f"{row['ttft_p95_s']:>8.3f}s {row['mean_batch']:>5.2f} {row['peak_rss_mib']:>12.0f}", flush=True)
        by = {r["clients"]: r for r in rows}
        if 1 in by and 4 in by:
            print(f"4 clients / 1 client, total tokens/s: {by[4]['total_tok_s'] / by[1]['total_tok_s']:.2f}x")
        most = max(counts)
        print(f"server RSS idle {idle:.0f} MiB; with {most} sessions {by[most]['peak_rss_mib']:.0f} MiB "
              f"({(by[most]['peak_rss_mib'] - idle) / most:.1f} MiB per session beyond idle)")
        print(json.dumps({"rows": rows, "idle_rss_mib": idle}))
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
