"""A seeded fuzzer over a model folder's config.json and the context size: whatever the values,
loading and generating either works or gives an EdgephiError/ValueError, no value overflows
float32 on its way to the kernels, and the kernels never touch memory outside their arrays (#12: "kernels must be unable to write out of bounds given any
config that passes").

The loop runs in a child process under an address-space limit, so a crash, a hang or a runaway
allocation fails the test with the seed and iteration to replay. CI runs a fixed count; a longer
run:  EDGEPHI_FUZZ_CONFIG_ITERATIONS=5000 python -m pytest tests/test_fuzz_config.py -q
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from edgephi.convert import convert

pytestmark = pytest.mark.integration  # a fuzzer in a subprocess

ITERATIONS = int(os.environ.get("EDGEPHI_FUZZ_CONFIG_ITERATIONS", "150"))
SEED = int(os.environ.get("EDGEPHI_FUZZ_SEED", "12"))
ADDRESS_SPACE = 6 << 30

CHILD = r'''
import json, random, shutil, sys, traceback
from pathlib import Path
import edgephi
from edgephi.errors import EdgephiError

base, work, log, seed, iterations = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
original = json.loads((base / "config.json").read_text())
rng = random.Random(seed)
INTS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "intermediate_size",
        "rotary_dim", "max_position_embeddings", "original_max_position_embeddings", "sliding_window")
FLOATS = ("rms_norm_eps", "rope_theta")
ODD = [0, 1, 2, 3, -1, -2**31, 2**31, 2**31 - 1, 2**63, 10**400, 1.5, "8", None, True, [], {}, 1e308, -0.0]


def geometry():
    """Heads, kv heads and head dim that keep every tensor shape (the file cannot catch these)."""
    q, kv = original["num_heads"] * original["head_dim"], original["num_kv_heads"] * original["head_dim"]
    dims = [d for d in range(1, q + 1) if q % d == 0 and kv % d == 0]
    dh = rng.choice(dims)
    return {"num_heads": q // dh, "num_kv_heads": kv // dh, "head_dim": dh,
            "rotary_dim": rng.choice([r for r in range(0, dh + 2, 2)] or [0])}


def mutate(cfg):
    cfg = json.loads(json.dumps(cfg))
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.3:
            cfg.update(geometry())
        elif kind < 0.7:
            key = rng.choice(INTS)
            old = cfg.get(key) or 8
            cfg[key] = rng.choice([old + 1, old - 1, old * 2, old // 2, rng.randint(1, 64), *ODD])
        elif kind < 0.85:
            cfg[rng.choice(FLOATS)] = rng.choice([0.0, -1.0, 1e-30, 1e30, 3.0, 1e6, *ODD])
        elif kind < 0.95:
            n = max(1, cfg["rotary_dim"] // 2) if isinstance(cfg.get("rotary_dim"), int) and cfg["rotary_dim"] < 64 else 4
            cfg["rope_scaling"] = rng.choice([None, {"short_factor": [rng.uniform(0.5, 4)] * n,
                                                     "long_factor": [rng.uniform(0.5, 40)] * n,
                                                     "attention_factor": rng.choice([1.0, 1.2, 0.0, -1.0])},
                                              {"short_factor": [1.0] * (n + 1), "long_factor": [],
                                               "attention_factor": 1.0}, "x"])
            cfg["original_max_position_embeddings"] = rng.choice([2, 8, 16, 1, 0])
        else:
            cfg["tie_word_embeddings"] = rng.choice([True, False, 1, "false"])
    return cfg


outcomes = {"ran": 0, "refused": 0}
for i in range(iterations):
    cfg = mutate(original)
    context = rng.choice([2, 3, 8, 17, 64, 300, None])
    log.write_text(json.dumps({"iteration": i, "config": cfg, "context": context}))
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(base, work)
    (work / "config.json").write_text(json.dumps(cfg))
    try:
        model = edgephi.load(work, context=context)
        model.generate("hello there", max_new_tokens=rng.choice([1, 5, 40]), ignore_eos=True, temperature=0.7, seed=i)
        outcomes["ran"] += 1
    except (EdgephiError, ValueError) as exc:
        if "\n" in str(exc):
            print(f"FINDING at iteration {i}: a multi-line message {str(exc)!r}")
            sys.exit(3)
        outcomes["refused"] += 1
    except BaseException:
        print(f"FINDING at iteration {i} (seed {seed}):")
        traceback.print_exc()
        sys.exit(3)
print(json.dumps(outcomes))
'''


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


@pytest.fixture(scope="module")
def base_model(checkpoint_factory, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fuzz-config") / "base"
    convert(checkpoint_factory("phi3_basic"), out, quant="q4_0", embed_quant="q8_0")
    return out


def test_fuzzed_configs_load_and_run_or_are_refused(base_model, tmp_path):
    log = tmp_path / "last-case.json"
    # a RuntimeWarning (a value overflowing float32 on its way to the kernels) counts as a finding
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", CHILD, str(base_model), str(tmp_path / "work"), str(log), str(SEED),
                           str(ITERATIONS)], capture_output=True, text=True, timeout=60 + 5 * ITERATIONS,
                          preexec_fn=_limit_memory)
    last = log.read_text() if log.exists() else "(none)"
    assert done.returncode == 0, f"exit {done.returncode}; last case: {last}\n{done.stdout}\n{done.stderr[-3000:]}"
    outcomes = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcomes["ran"] + outcomes["refused"] == ITERATIONS
    # both sides were exercised: configs the kernels ran with, and configs refused
    assert outcomes["ran"] >= ITERATIONS // 10 and outcomes["refused"] >= ITERATIONS // 10, outcomes
