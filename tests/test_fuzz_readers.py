"""Seeded mutation fuzzing of the converter's readers (issue #12): a mutated GGUF file or
safetensors checkpoint is either read or refused with an EdgephiError naming a file, in one line;
any other exception, a hang or a memory blow-up is a finding.

Seeds: tiny complete llama and phi3 GGUFs (tests/hostile.py) and the phi3_basic checkpoint
(four shards, a 512-token tokenizer.json). Each iteration draws its mutations from
random.Random(f"{seed}:{iteration}"), so any iteration replays alone. "Reading" is what
`edgephi convert` does before it writes: open_source, the tokenizer, every tensor's parts (first
and last rows), the generation settings, and the config as strict JSON.

The loop runs in a child process under a 4 GiB address-space limit and a timeout. CI runs
FUZZ_ITERATIONS iterations (5000, 20-30 s on 2 cores); longer runs and replays:

    EDGEPHI_FUZZ_ITERATIONS=200000 EDGEPHI_FUZZ_SEED=7 python -m pytest tests/test_fuzz_readers.py -q
    python -m tests.test_fuzz_readers --iterations 200000 --seed 7      # about 10 minutes
    python -m tests.test_fuzz_readers --seeds DIR --replay 7:1234 [--keep OUT]   # one case, its traceback

A failing test prints the seed folder to pass as --seeds, so that a replay mutates the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgephi.convert.pipeline import open_source
from edgephi.errors import EdgephiError
from tests.hostile import (ADDRESS_SPACE, ARRAY, BOOL, F32, F64, I32, I64, STRING, U8, U32, U64, GGUF,
                           limit_memory, tiny_model)

FUZZ_ITERATIONS = int(os.environ.get("EDGEPHI_FUZZ_ITERATIONS", "5000"))
FUZZ_SEED = int(os.environ.get("EDGEPHI_FUZZ_SEED", "12"))
CASE_SECONDS = 20  # one reading of a file of a few hundred kB takes milliseconds
MAX_MESSAGE = 1000  # characters in one error line

# ---------------------------------------------------------------------------
# Mutations

INTERESTING_BYTES = (0x00, 0xFF, 0x7F, 0x80)
INTERESTING_U64 = (0, 1, 2, 7, 32, 2**31, 2**32, 2**63, 2**64 - 1)
INTERESTING_U32 = (0, 1, 5, 8, 9, 12, 13, 31, 99, 2**31, 2**32 - 1)
GGUF_VALUES = [
    (U8, 0), (U32, 0), (U32, 1), (U32, 3), (U32, 2**32 - 1), (I32, -1), (I32, -2**31), (U64, 2**63),
    (U64, 2**64 - 1), (I64, -2**63), (F32, math.inf), (F32, -math.inf), (F32, math.nan), (F32, 3.5),
    (F32, 0.0), (F32, -1.0), (F64, 1e308), (F64, 64.0), (BOOL, True), (BOOL, False), (STRING, ""),
    (STRING, "llama"), (STRING, "phi3"), (STRING, "gpt2"), (STRING, "x" * 5000), (STRING, "\ud800"),
    (ARRAY, (U32, [])), (ARRAY, (U32, [64])), (ARRAY, (STRING, ["a", "b"])), (ARRAY, (F32, [math.inf, 1.0])),
    (ARRAY, (ARRAY, [(U8, [1])])), (ARRAY, (I32, [-1] * 10)),
]
INF_TEXT, DEEP_TEXT = "\x00inf\x00", "\x00deep\x00"  # placeholders for what json.dumps cannot write
JSON_VALUES = [0, -1, 1, 2, 3.5, -0.0, 2**31, 2**63, 2**64, 10**30, INF_TEXT, DEEP_TEXT, True, False, None, "",
               "x", "y" * 5000, "F32", "BF16", "BPE", "ByteLevel", "longrope", "../x", "/etc/hostname", [], [0],
               [1.0] * 8, [2**32, 2**32], {}, {"type": "ByteLevel"}]


def mutate_bytes(data: bytes, rng: random.Random, fields=(), hot: int | None = None) -> tuple[bytes, str]:
    """1-3 of: bit flips, interesting bytes, integer fields set to edge values, truncation,
    chunk duplication or deletion. `hot`: most positions fall in data[:hot] (the header)."""
    out, done = bytearray(data), []
    for _ in range(rng.randint(1, 3)):
        if not out:
            break
        hot_end = min(len(out), hot or len(out))

        def pos():
            return rng.randrange(hot_end if rng.random() < 0.85 else len(out))
        op = rng.choice(["flip", "byte", "field", "field", "truncate", "duplicate", "delete"])
        if op == "flip":
            p = pos()
            out[p] ^= 1 << rng.randrange(8)
        elif op == "byte":
            p = pos()
            out[p] = rng.choice(INTERESTING_BYTES)
        elif op == "field":
            p, width = rng.choice(fields) if fields and rng.random() < 0.8 else (pos() & ~7, 8)
            value = rng.choice(INTERESTING_U64 if width == 8 else INTERESTING_U32) if rng.random() < 0.8 \
                else rng.randrange(64)
            out[p:p + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        elif op == "truncate":
            p = pos()
            del out[p:]
        else:
            a = pos()
            b = min(len(out), a + rng.choice([1, 4, 8, 16, 64, 1024]))
            if op == "duplicate":
                out[a:a] = out[a:b]
            else:
                del out[a:b]
        done.append(op)
    return bytes(out), "bytes:" + ",".join(done)


def mutate_gguf(g: GGUF, rng: random.Random) -> str:
    """One change to the model's metadata or tensor infos, as values."""
    op = rng.choice(["value", "value", "value", "drop-key", "dup-key", "dims", "dims", "type", "offset",
                     "tensor-dup", "tensor-drop", "tensor-rename", "ndim", "counts", "version", "list"])
    if op in ("value", "drop-key", "dup-key", "list"):
        i = rng.randrange(len(g.kv))
        key, vtype, value = g.kv[i]
        if op == "value":
            g.kv[i] = (key, *rng.choice(GGUF_VALUES))
        elif op == "drop-key":
            del g.kv[i]
        elif op == "dup-key":
            g.kv.insert(rng.randrange(len(g.kv)), g.kv[i])
        elif vtype == ARRAY:  # shorten, lengthen or retype an array's items
            etype, items = value
            items = list(items)
            if rng.random() < 0.5 and items:
                del items[rng.randrange(len(items)):]
            else:
                items += items[:rng.randint(1, 8)]
            g.kv[i] = (key, ARRAY, (etype, items))
        return f"gguf:{op}:{key}"
    t = rng.choice(g.tensors)
    if op == "dims":
        j = rng.randrange(len(t.dims))
        t.dims = [*t.dims]
        t.dims[j] = rng.choice([0, 1, 2, 31, 32, 33, 2**31, 2**32, 2**63, 2**64 - 1, t.dims[j] * 2, t.dims[j] // 2])
    elif op == "type":
        t.ggml_type = rng.choice([0, 1, 2, 3, 6, 8, 12, 24, 30, 31, 99, 2**32 - 1])
    elif op == "offset":
        g.to_bytes()
        t.offset = rng.choice([0, 1, 31, 2**63, 2**64 - 1, *g.offsets.values()])
    elif op == "tensor-dup":
        g.tensors.append(t)
    elif op == "tensor-drop":
        g.tensors.remove(t)
    elif op == "tensor-rename":
        t.name = rng.choice([*(x.name for x in g.tensors), "", "n" * 5000])
    elif op == "ndim":
        t.ndim = rng.choice([0, len(t.dims) + 1, 5, 2**32 - 1])
    elif op == "counts":
        g.counts = (rng.choice([0, len(g.tensors) + 1, 2**64 - 1]), rng.choice([0, len(g.kv) + 1, 2**64 - 1]))
    else:
        g.version = rng.choice([0, 1, 2, 4, 2**32 - 1])
    return f"gguf:{op}:{t.name}"


def _random_node(doc, rng: random.Random):
    """(container, key) of a random node under `doc` (a dict or list), descending at random."""
    parent, key = None, None
    node = doc
    while isinstance(node, (dict, list)) and node and (parent is None or rng.random() < 0.7):
        keys = list(node) if isinstance(node, dict) else range(len(node))
        parent, key = node, rng.choice(list(keys))
        node = parent[key]
    return parent, key


def mutate_json(doc, rng: random.Random) -> tuple[object, str]:
    """One change at a random node: replaced by an edge value, deleted, wrapped or retyped."""
    parent, key = _random_node(doc, rng)
    if parent is None:
        return rng.choice(JSON_VALUES), "json:root"
    op = rng.choice(["value", "value", "value", "delete", "wrap", "string", "number"])
    old = parent[key]
    if op == "delete":
        del parent[key]
    elif op == "wrap":
        parent[key] = [old]
    elif op == "string":
        parent[key] = json.dumps(old)
    elif op == "number" and isinstance(old, (int, float)) and not isinstance(old, bool):
        parent[key] = rng.choice([old + 1, old - 1, -old, old * 2**32, float(old) + 0.5, INF_TEXT])
    else:
        parent[key] = rng.choice(JSON_VALUES)
    return doc, f"json:{op}:{str(key)[:40]}"


def mutate_header(header: dict, rng: random.Random) -> str:
    """A safetensors-specific change: overlapping, shifted or retyped offsets, odd shapes and dtypes."""
    names = [n for n in header if n != "__metadata__"]
    a, b = rng.choice(names), rng.choice(names)
    op = rng.choice(["copy-offsets", "swap-offsets", "offset", "shape", "dtype", "metadata", "rename"])
    if op == "copy-offsets":
        header[b]["data_offsets"] = list(header[a]["data_offsets"])
    elif op == "swap-offsets":
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    elif op == "offset":
        offsets = header[a]["data_offsets"]
        k = rng.randrange(2)
        offsets[k] = rng.choice([0, -1, offsets[k] + 1, offsets[k] - 4, offsets[k] + 4, 2**63, 2**64, 10**30,
                                 float(offsets[k]), INF_TEXT, None, str(offsets[k])])
    elif op == "shape":
        shape = header[a]["shape"]
        header[a]["shape"] = rng.choice([shape[::-1], shape + [1], shape[:-1], [0] + shape, [2**32, 2**32],
                                         [2**63, 2], [-d for d in shape], [1] * 40])
    elif op == "dtype":
        header[a]["dtype"] = rng.choice(["F32", "F16", "BF16", "I8", "U8", "F64", "BOOL", "F8_E4M3", "", "f32"])
    elif op == "metadata":
        header["__metadata__"] = rng.choice(JSON_VALUES)
    else:
        header[rng.choice([b, "", "n" * 5000, "__metadata__"])] = header.pop(a)
    return f"header:{op}"


def json_text(doc) -> bytes:
    text = json.dumps(doc)
    return text.replace(json.dumps(INF_TEXT), "1e999").replace(json.dumps(DEEP_TEXT), "[" * 100_000 + "]" * 100_000) \
        .encode()


# ---------------------------------------------------------------------------
# Cases: a seed, its mutated files


@dataclass
class Case:
    kind: str  # "gguf" or "checkpoint"
    what: str  # the mutations, for the report
    files: dict[str, bytes]  # relative path -> contents (for a checkpoint: only the changed files)


SIDE_FILES = ["config.json"] * 4 + ["model.safetensors.index.json"] * 2 + ["tokenizer.json"] * 3 + \
    ["tokenizer_config.json", "generation_config.json"]


def make_case(seeds: Path, seed: int, iteration: int) -> Case:
    rng = random.Random(f"{seed}:{iteration}")
    target = rng.choices(["gguf-bytes", "gguf-values", "shard-bytes", "shard-header", "side-json"],
                         weights=[30, 20, 15, 20, 15])[0]
    if target.startswith("gguf"):
        arch = rng.choice(["llama", "phi3"])
        g = tiny_model(arch)
        if target == "gguf-values":
            what = mutate_gguf(g, rng)
            return Case("gguf", f"{arch} {what}", {"model.gguf": g.to_bytes()})
        data = g.to_bytes()
        header_end = max(p + w for p, w in g.fields)
        data, what = mutate_bytes(data, rng, g.fields, header_end)
        return Case("gguf", f"{arch} {what}", {"model.gguf": data})
    ckpt = seeds / "ckpt"
    if target == "side-json":
        name = rng.choice(SIDE_FILES)
        doc, what = mutate_json(json.loads((ckpt / name).read_text()), rng)
        return Case("checkpoint", f"{name} {what}", {name: json_text(doc)})
    shard = rng.choice(sorted(p.name for p in ckpt.glob("*.safetensors")))
    data = (ckpt / shard).read_bytes()
    n = int.from_bytes(data[:8], "little")
    if target == "shard-bytes":
        data, what = mutate_bytes(data, rng, [(0, 8)], 8 + n)
        return Case("checkpoint", f"{shard} {what}", {shard: data})
    header = json.loads(data[8:8 + n])
    if rng.random() < 0.5:
        what = mutate_header(header, rng)
    else:
        header, what = mutate_json(header, rng)
    text = json_text(header)
    length = len(text) if rng.random() < 0.85 else rng.choice([n, len(text) + 1, len(text) - 1, 2**63])
    return Case("checkpoint", f"{shard} {what}", {shard: length.to_bytes(8, "little") + text + data[8 + n:]})


# ---------------------------------------------------------------------------
# Reading, as `edgephi convert` does before it writes


def read_source(path: Path) -> None:
    source = open_source(path)
    tokenizer = source.tokenizer()
    for t in source.tensors():
        rows = t.shape[0]
        for start, stop in {(0, min(rows, 4)), (rows - 1, rows)}:
            t.floats(start, stop)
            if t.stored_format is not None and not t.stored_format.is_float:
                t.planes(start, stop)
    generation = source.generation(tokenizer.special_tokens)
    json.dumps(source.config.to_json(), allow_nan=False)  # config.json must stay strict JSON
    json.dumps(generation, allow_nan=False)


class Hang(BaseException):
    """One case ran past CASE_SECONDS (a BaseException, so that no reader's handler swallows it)."""


def _alarm(signum, frame):
    raise Hang(f"no result after {CASE_SECONDS} s")


class Workspace:
    """A GGUF path and a checkpoint folder of links to the seed files; a case replaces some links
    with its own files, and restore() puts the links back."""

    def __init__(self, seeds: Path, work: Path, copies: bool = False):
        self.seeds, self.gguf, self.ckpt = seeds, work / "model.gguf", work / "ckpt"
        self.ckpt.mkdir(parents=True, exist_ok=True)
        for p in (seeds / "ckpt").iterdir():  # copies outlive a temporary seed folder (--keep)
            shutil.copy(p, self.ckpt / p.name) if copies else (self.ckpt / p.name).symlink_to(p)
        self.changed: list[Path] = []

    def apply(self, case: Case) -> Path:
        base = self.gguf.parent if case.kind == "gguf" else self.ckpt
        for name, data in case.files.items():
            path = base / name
            path.unlink(missing_ok=True)
            path.write_bytes(data)
            self.changed.append(path)
        return self.gguf if case.kind == "gguf" else self.ckpt

    def restore(self) -> None:
        for path in self.changed:
            path.unlink()
            if path.parent == self.ckpt:
                path.symlink_to(self.seeds / "ckpt" / path.name)
        self.changed = []


def check_case(path: Path, where: Path) -> tuple[str, str | None]:
    """("read" | "refused", None) when the property holds, else ("finding", description)."""
    signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
    try:
        read_source(path)
    except EdgephiError as exc:
        msg = str(exc)
        if "\n" in msg or len(msg) > MAX_MESSAGE or str(where) not in msg:
            return "finding", f"EdgephiError that is not one short line naming a file: {msg[:300]!r}"
        return "refused", None
    except (Exception, Hang) as exc:  # MemoryError and RecursionError included
        tb = traceback.extract_tb(exc.__traceback__)[-3:]
        frames = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb))
        return "finding", f"{type(exc).__name__}: {str(exc)[:200]} at {frames}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return "read", None


# ---------------------------------------------------------------------------
# The loop (in the child process) and its driver


def build_seeds(folder: Path, checkpoint: Path) -> Path:
    """folder/ckpt: a copy of the checkpoint (the GGUF seeds are built in each case)."""
    shutil.copytree(checkpoint, folder / "ckpt", symlinks=False)
    return folder


def worker(seeds: Path, work: Path, seed: int, iterations: int) -> int:
    """Prints one JSON line per finding and a summary; exit status 1 when anything was found."""
    signal.signal(signal.SIGALRM, _alarm)
    warnings.simplefilter("ignore", RuntimeWarning)  # numpy on NaN blocks of mutated tensor data
    space = Workspace(seeds, work)
    progress = os.open(work / "progress", os.O_WRONLY | os.O_CREAT, 0o644)
    seeds_unmutated = [Case("gguf", "llama", {"model.gguf": tiny_model("llama").to_bytes()}),
                       Case("gguf", "phi3", {"model.gguf": tiny_model("phi3").to_bytes()}), Case("checkpoint", "", {})]
    for case in seeds_unmutated:  # must read, or every refusal below means nothing
        outcome, finding = check_case(space.apply(case), work)
        space.restore()
        if outcome != "read":
            print(json.dumps({"seed_does_not_read": case.what or case.kind, "error": finding}), flush=True)
            return 2
    counts = {f"{kind} {outcome}": 0 for kind in ("gguf", "checkpoint") for outcome in ("read", "refused", "finding")}
    started = time.perf_counter()
    for i in range(iterations):
        os.pwrite(progress, f"{i:<12}".encode(), 0)  # the last case begun, should the process die
        case = make_case(seeds, seed, i)
        try:
            outcome, finding = check_case(space.apply(case), work)
        finally:
            space.restore()
        counts[f"{case.kind} {outcome}"] += 1
        if finding:
            print(json.dumps({"finding": finding, "replay": f"{seed}:{i}", "case": case.what}), flush=True)
    seconds = time.perf_counter() - started
    print(json.dumps({"summary": counts, "iterations": iterations, "seconds": round(seconds, 1),
                      "address_space": resource.getrlimit(resource.RLIMIT_AS)[0]}), flush=True)
    return 1 if any(k.endswith("finding") and v for k, v in counts.items()) else 0


@dataclass
class Run:
    returncode: int
    findings: list[dict]
    summary: dict | None
    output: str


def run_worker(seeds: Path, work: Path, seed: int, iterations: int) -> Run:
    """The loop in a child process under the address-space limit and a timeout."""
    timeout = 120 + iterations * 0.1
    cmd = [sys.executable, "-m", "tests.test_fuzz_readers", "--worker", "--seeds", str(seeds), "--work", str(work),
           "--seed", str(seed), "--iterations", str(iterations)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=limit_memory,
                              cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        last = (work / "progress").read_text().strip()
        return Run(-1, [{"finding": f"the run passed {timeout:.0f} s", "replay": f"{seed}:{last}"}], None, "")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    findings = [x for x in lines if "finding" in x or "seed_does_not_read" in x]
    summary = next((x for x in lines if "summary" in x), None)
    if proc.returncode not in (0, 1, 2):  # killed: out of memory, a crash in native code
        last = (work / "progress").read_text().strip()
        findings.append({"finding": f"the process died (status {proc.returncode})", "replay": f"{seed}:{last}"})
    return Run(proc.returncode, findings, summary, proc.stdout + proc.stderr[-3000:])


# ---------------------------------------------------------------------------
# pytest


@pytest.mark.integration
def test_readers_survive_mutations(checkpoint_factory, tmp_path):
    seeds = build_seeds(tmp_path / "seeds", checkpoint_factory("phi3_basic"))
    run = run_worker(seeds, tmp_path / "work", FUZZ_SEED, FUZZ_ITERATIONS)
    print(json.dumps(run.summary))
    assert run.findings == [], "\n".join(json.dumps(f) for f in run.findings) + f"\nreplay with: python -m " \
        f"tests.test_fuzz_readers --seeds {seeds} --replay SEED:ITERATION"
    assert run.returncode == 0 and run.summary is not None, run.output
    assert run.summary["address_space"] == ADDRESS_SPACE, run.summary
    counts = run.summary["summary"]
    assert sum(counts.values()) == FUZZ_ITERATIONS, counts
    # the mutations must reach both outcomes in both readers, or the fuzzer tests nothing
    for kind in ("gguf", "checkpoint"):
        total = counts[f"{kind} read"] + counts[f"{kind} refused"]
        assert counts[f"{kind} refused"] >= total // 4 and counts[f"{kind} read"] >= total // 50, counts


# ---------------------------------------------------------------------------
# Command line


def _seeds_for_command(args, tmp: Path) -> Path:
    if args.seeds:
        return Path(args.seeds)
    from tests import fixtures

    print("building the seed checkpoint ...", file=sys.stderr)
    return build_seeds(tmp / "seeds", fixtures.make_checkpoint(tmp / "phi3_basic", "phi3_basic"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.test_fuzz_readers",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=FUZZ_ITERATIONS)
    parser.add_argument("--seed", type=int, default=FUZZ_SEED)
    parser.add_argument("--seeds", help="a seed folder from an earlier run (default: build one)")
    parser.add_argument("--replay", metavar="SEED:ITERATION",
                        help="run one case in this process and show its traceback")
    parser.add_argument("--keep", metavar="DIR", help="with --replay: write the case's files into DIR")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(Path(args.seeds), Path(args.work), args.seed, args.iterations)
    with tempfile.TemporaryDirectory(prefix="edgephi-fuzz-") as tmp:
        tmp = Path(tmp)
        seeds = _seeds_for_command(args, tmp)
        if args.replay:
            seed, iteration = map(int, args.replay.split(":"))
            case = make_case(seeds, seed, iteration)
            work = Path(args.keep) if args.keep else tmp / "work"
            space = Workspace(seeds, work, copies=bool(args.keep))
            path = space.apply(case)
            print(f"case {seed}:{iteration}: {case.kind}, {case.what}; files in {path}", file=sys.stderr)
            try:
                read_source(path)  # a finding raises here, with its traceback
            except EdgephiError as exc:
                print(f"refused: {exc}", file=sys.stderr)
            else:
                print("read without error", file=sys.stderr)
            return 0
        run = run_worker(seeds, tmp / "work", args.seed, args.iterations)
        for finding in run.findings:
            print(json.dumps(finding))
        print(json.dumps(run.summary))
        return 1 if run.findings or run.returncode else 0


if __name__ == "__main__":
    sys.exit(main())
