"""The `edgephi` command: a thin skin over the Python API; user errors become one line, no traceback."""

from __future__ import annotations

import functools
import math
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import click

from .errors import EdgephiError, Terminated
from .generate import DEFAULT_MAX_NEW_TOKENS
from .quant import QUANTIZABLE
from .sampling import SamplingParams

QUANT_CHOICES = QUANTIZABLE
SAMPLING = SamplingParams()  # the flags' defaults are the API's
BATCH_KERNEL = "the batched decode step"  # compiled apart: only servers and warmup load it


def user_errors(fn):
    """Turn library errors into `edgephi: error: ...` and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (EdgephiError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from None
        except Terminated as exc:  # SIGTERM or SIGHUP: the shell's convention, 128 + the signal
            click.echo(f"terminated by {signal.Signals(exc.signum).name}", err=True)
            sys.exit(128 + exc.signum)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)

    return wrapper


@click.group()
@click.version_option(package_name="edgephi")
def main():
    """Run Phi language models quantized on a CPU, offline."""


class ProgressBar:
    """One line on stderr, redrawn at most ten times a second."""

    def __init__(self, label: str):
        self.label, self.last, self.started = label, 0.0, time.perf_counter()
        self.live = sys.stderr.isatty()

    def __call__(self, done: int, total: int, what: str) -> None:
        now = time.perf_counter()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        frac = done / total if total else 1.0
        bar = "#" * int(frac * 30)
        line = f"{self.label} [{bar:<30}] {frac:6.1%} {now - self.started:5.1f}s {what[:28]:<28}"
        if self.live:
            click.echo("\r" + line, nl=done >= total, err=True)
        elif done >= total:
            click.echo(line, err=True)


def converter(module: str, missing: str = "the converter is not installed"):
    """edgephi.convert.<module>, imported only by the commands that convert."""
    import importlib

    try:
        return importlib.import_module(f"edgephi.convert.{module}")
    except ImportError as exc:
        raise EdgephiError(f"{missing} ({exc})") from None


def print_conversion_report(report) -> None:
    mb = report.bytes_on_disk / 1e6
    click.echo(f"wrote {report.out}: {report.parameters / 1e6:.1f}M parameters, {mb:.1f} MB on disk, "
               f"{report.seconds:.1f} s")
    click.echo(f"  {'tensor kind':<12} {'format':<10} relative error")
    for kind, (formats, err, lossless) in report.by_kind().items():
        shown = "0 (copied bit for bit)" if lossless else "0 (exact)" if err == 0 else f"{err:.2e}"
        click.echo(f"  {kind:<12} {formats:<10} {shown}")
    weighted = report.weighted_by_kind()
    if weighted:
        click.echo(f"  importance from {report.importance_source}; error weighted by each input's mean square:")
        click.echo(f"  {'tensor kind':<12} {'nearest':>10} {'calibrated':>11}")
        for kind, (rtn, calibrated) in weighted.items():
            click.echo(f"  {kind:<12} {rtn:10.3e} {calibrated:11.3e}  ({calibrated / rtn:.2f}x)")
        click.echo("  per tensor, calibrated / nearest:")
        rows: dict[str, list[str]] = {}
        for name, (rtn, calibrated) in report.weighted_by_tensor().items():
            where, _, kind = name.rpartition(".")
            rows.setdefault(where or name, []).append(f"{kind} {calibrated / rtn:.2f}x")
        for where, cells in rows.items():
            click.echo(f"    {where:<10} " + "  ".join(cells))


@main.command()
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--quant", type=click.Choice(QUANT_CHOICES), default=None,
              help="Format of the transformer's linear weights [default: q4_0; a GGUF keeps its own]")
@click.option("--embed-quant", type=click.Choice(QUANT_CHOICES), default=None,
              help="Format of the token embedding and output matrices [default: q8_0; a GGUF keeps its own]")
@click.option("--preset", default=None, help="A model family from presets.json (edgephi.models): its chat template, "
              "stop tokens and recommended quant")
@click.option("--force", is_flag=True, help="Replace OUT if it exists")
@click.option("--calibrate", "calibration_text", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="A UTF-8 text: run the float model on it and choose q4_0/q4_1 blocks by the importance of "
              "each input (the files stay ordinary q4_0/q4_1)")
@click.option("--calibrate-chunks", type=int, default=64, show_default=True,
              help="Chunks of 512 tokens of the calibration text to run")
@click.option("--save-imatrix", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="Also write the calibration statistics as llama.cpp's importance matrix (llama-quantize --imatrix)")
@click.option("--recipe", default=None, help="Per-tensor formats: PATTERN=FORMAT rules over tensor names, first match "
              "wins (layers.-1.down is the last layer's), or a named recipe; e.g. "
              "'embed=q8_0,layers.0.down=q8_0,*=q4_0' [default: q4_0-down8 (q4_0, the first and last down "
              "q8_0) for a calibrated conversion without --quant, else --quant and --embed-quant for all]")
@click.option("--imatrix", default=None, type=click.Path(dir_okay=False, path_type=str),
              help="Quantize by the importance in this importance-matrix file (llama-imatrix's or --save-imatrix's) "
              "instead of a calibration run")
@user_errors
def convert(src, out, quant, embed_quant, preset, force, calibration_text, calibrate_chunks, save_imatrix, recipe,
            imatrix):
    """Convert a Hugging Face checkpoint folder or a GGUF file SRC into the edgephi model folder OUT."""
    run = converter("pipeline").convert  # the runtime never needs the converter's modules

    report = run(src, out, quant=quant, embed_quant=embed_quant, force=force, preset=preset,
                 calibrate=calibration_text, calibrate_chunks=calibrate_chunks,
                 save_imatrix=save_imatrix, recipe=recipe, imatrix=imatrix, progress=ProgressBar("converting"))
    print_conversion_report(report)


@main.command("export-onnx")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--force", is_flag=True, help="Replace OUT if it exists")
@click.option("--no-check", is_flag=True, help="Skip running the exported graph against the edgephi runtime")
@click.option("--exact-8bit", is_flag=True, help="Multiply q8_0 weights with float activations: exact, but "
              "onnxruntime then dequantizes them on every call (slow); default: int8 activations, as llama.cpp")
@user_errors
def export_onnx(model_path, out, force, no_check, exact_8bit):
    """Export the edgephi model folder MODEL as an ONNX folder OUT that onnxruntime and
    onnxruntime-genai run (quantized linears as MatMulNBits)."""
    run = converter("onnx_export", "ONNX export needs the onnx extra: pip install 'edgephi[onnx]'").export_onnx

    report = run(model_path, out, force=force, check=not no_check, int8_compute=not exact_8bit)
    click.echo(f"wrote {report.out} in {report.seconds:.1f} s")
    for name, size in sorted(report.files.items()):
        click.echo(f"  {name:24s} {size / 1e6:10.1f} MB")
    for fmt, count in sorted((report.float_formats or {}).items()):
        click.echo(f"  {count} {fmt} matrices written as float32 MatMul (exact; MatMulNBits has no {fmt} form)")
    if report.check_tokens:
        click.echo(f"  onnxruntime vs edgephi logits on {report.check_tokens} tokens: max |diff| "
                   f"{report.max_abs_diff:.3g} ({report.max_rel_diff:.2e} of the largest logit)")


def sampling_options(fn):
    """The sampling flags shared by chat and generate (defaults as in SamplingParams)."""
    options = [
        click.option("-m", "--model", "model_path", default=None,
                     help="An edgephi model folder, or an ONNX folder from export-onnx "
                     "[default: SmolLM2-135M-Instruct, fetched once]"),
        click.option("--max-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, show_default=True,
                     help="Most tokens per reply"),
        click.option("--temperature", type=float, default=SAMPLING.temperature, show_default=True,
                     help="0 picks the likeliest token"),
        click.option("--top-k", type=int, default=SAMPLING.top_k, show_default=True,
                     help="Keep the k likeliest tokens (0: all)"),
        click.option("--top-p", type=float, default=SAMPLING.top_p, show_default=True, help="Nucleus sampling mass"),
        click.option("--min-p", type=float, default=SAMPLING.min_p, show_default=True,
                     help="Drop tokens below min-p x the top one"),
        click.option("--repeat-penalty", type=float, default=SAMPLING.repetition_penalty, show_default=True,
                     help="Penalise repeated tokens"),
        click.option("--seed", type=int, default=SAMPLING.seed, help="Seed for sampling"),
        click.option("--lookup", type=int, default=SAMPLING.lookup, show_default=True,
                     help="Draft up to N tokens from the context (prompt lookup) and verify them in one step; "
                     "greedy output is unchanged, sampled output keeps its distribution"),
        click.option("--threads", type=int, default=None, help="CPU threads [default: the cores nothing else keeps busy]"),
        click.option("--context", type=int, default=None, help="KV ring capacity in tokens"),
        click.option("--kv-dtype", type=click.Choice(["float16", "int8", "float32"]), default="float16",
                     show_default=True, help="KV cache values: int8 (a scale per 16 values) takes 0.56 of float16's "
                     "memory, for long contexts on small boards"),
        click.option("--backend", type=click.Choice(["numba", "onnxruntime"]), default=None,
                     help="[default: onnxruntime for a folder from export-onnx, else numba]"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def sampling_kwargs(o: dict) -> dict:
    return {"temperature": o["temperature"], "top_k": o["top_k"], "top_p": o["top_p"], "min_p": o["min_p"],
            "repetition_penalty": o["repeat_penalty"], "seed": o["seed"], "lookup": o["lookup"]}


def model_folder(model_path) -> Path:
    """The folder given, or the default model's (fetched and converted into the cache once)."""
    if model_path is None:
        from .default_model import ensure_default_model

        return ensure_default_model(lambda line: click.echo(line, err=True), ProgressBar("converting"))
    path = Path(model_path)
    if not path.exists():
        raise EdgephiError(f"{path}: no such model folder (convert one with `edgephi convert`)")
    return path


class CompileNotice:
    """What a first run says while the kernels compile (load's on_compile): a line that counts
    the functions compiled and the seconds, redrawn on a terminal, else printed at the start and
    the end. Only called when the kernel cache lacks them, never on a warm start."""

    def __init__(self, isa: str | None = None, what: str = "edgephi's kernels"):
        self.live = sys.stderr.isatty()
        self.shown = False
        self.isa, self.what = isa, what

    def __call__(self, functions: int, seconds: float) -> None:
        from .isa import choose_isa

        if not self.shown:
            self.shown = True
            click.echo(f"compiling {self.what} for this CPU ({choose_isa(self.isa).name}), once: about a minute "
                       "on a laptop, a few on a Raspberry Pi; cached for later runs", err=True)
        line = f"  compiled {functions} functions in {seconds:.0f} s"
        if self.live:
            click.echo("\r" + line, nl=False, err=True)
        self.last = line

    def close(self) -> None:
        if self.shown:
            click.echo(("\r" if self.live else "") + self.last, err=True)


def open_model(model_path, threads, context, backend=None, kv_dtype="float16"):
    from . import load

    folder = model_folder(model_path)
    notice = CompileNotice()
    try:
        return load(folder, threads=threads, context=context, backend=backend, kv_dtype=kv_dtype, on_compile=notice)
    finally:
        notice.close()


@main.command()
@click.option("-m", "--model", "model_path", default=None,
              help="An edgephi model folder [default: SmolLM2-135M-Instruct, fetched once]; every model "
              "uses the same compiled kernels")
@click.option("--isa", default=None, help="Instruction set to compile for [default: $EDGEPHI_ISA, else the fastest "
              "this CPU runs]")
@user_errors
def warmup(model_path, isa):
    """Compile the kernels for this CPU into the cache now, so that the first chat starts at once:
    for images provisioned on the board they run on, or a first boot. Run it on that CPU: numba's
    cache is keyed by the CPU it compiled for."""
    from . import load
    from .jit_cache import kernel_folder

    folder = model_folder(model_path)
    notice = CompileNotice(isa)
    started = time.perf_counter()
    try:
        model = load(folder, threads=1, context=8, isa=isa, on_compile=notice)
    finally:
        notice.close()
    state = "compiled" if notice.shown else "already cached"
    batched = ""
    if hasattr(model.backend, "prepare_batching"):  # what `edgephi serve` adds: concurrent sequences' step
        notice = CompileNotice(isa, BATCH_KERNEL)
        try:
            model.backend.prepare_batching(on_compile=notice)
        finally:
            notice.close()
        batched = f"; {BATCH_KERNEL} {'compiled' if notice.shown else 'already cached'}"
    click.echo(f"kernels for {model.backend.isa.name} {state}{batched} in {kernel_folder()} "
               f"({time.perf_counter() - started:.1f} s)")


def print_stats(stats) -> None:
    cached = f" ({stats.cached_tokens} reused from an earlier prompt)" if stats.cached_tokens else ""
    click.echo(f"prompt {stats.prompt_tokens} tokens{cached} at {stats.prefill_tok_s:.1f} tok/s, reply "
               f"{stats.generated_tokens} tokens at {stats.decode_tok_s:.1f} tok/s ({stats.finish_reason})", err=True)


@main.command()
@sampling_options
@click.option("--system", default=None, help="System prompt, kept for the whole conversation")
@click.option("--session", "session_file", default=None, type=click.Path(dir_okay=False),
              help="Resume the conversation saved in this file, or start one there; it is saved after every reply")
@user_errors
def chat(model_path, system, session_file, max_tokens, threads, context, kv_dtype, backend, **options):
    """Chat with a model. Commands: /reset, /system TEXT, /stats, /exit. Ctrl-C stops a reply.

    When stdin is not a terminal, each line is one user turn and only the replies are printed."""
    model = open_model(model_path, threads, context, backend, kv_dtype)
    resume = session_file if session_file and Path(session_file).exists() else None
    session = model.chat_session(system=system, resume=resume, context=context if resume else None,
                                 max_new_tokens=max_tokens, **sampling_kwargs(options))

    def save():
        if session_file:
            session.save(session_file)

    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(f"edgephi chat: {model.folder.name} ({model.config.architecture}, context "
                   f"{session.sequence.capacity}). /reset /system TEXT /stats /exit", err=True)
        if resume:
            turns = sum(m["role"] == "user" for m in session.messages)
            click.echo(f"resumed {turns} turns from {session_file}", err=True)
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not interactive and not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                session.reset()
                save()
            elif command == "/system":
                session.reset(system=arg.strip())  # "/system" alone removes the system prompt
                save()
            elif command == "/stats":
                if session.last_stats:
                    print_stats(session.last_stats)
            else:
                click.echo(f"unknown command {command}; try /reset, /system TEXT, /stats, /exit", err=True)
            continue
        try:
            for piece in session.send(line):
                click.echo(piece, nl=False)
                sys.stdout.flush()
        except KeyboardInterrupt:
            click.echo(" [stopped]", nl=False)
        click.echo()
        save()


@main.command()
@sampling_options
@click.option("--ignore-eos", is_flag=True, help="Keep going past the end-of-text token")
@click.option("--special", is_flag=True, help="Read special-token text in PROMPT as special tokens")
@click.option("--stats", "show_stats", is_flag=True, help="Print speed figures to stderr")
@click.argument("prompt")
@user_errors
def generate(model_path, prompt, max_tokens, threads, context, kv_dtype, backend, ignore_eos, special, show_stats,
             **options):
    """Continue PROMPT (- reads it from stdin), streaming the text."""
    from .generate import GenerationStats

    if prompt == "-":
        prompt = sys.stdin.read()
    model = open_model(model_path, threads, context, backend, kv_dtype)
    stats = GenerationStats()
    for piece in model.stream(prompt, max_new_tokens=max_tokens, ignore_eos=ignore_eos, special_tokens=special,
                              stats=stats, **sampling_kwargs(options)):
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    if show_stats:
        print_stats(stats)


@main.command()
@click.argument("model_path", required=False)
@user_errors
def info(model_path):
    """Describe a model folder (default: the default model)."""
    from .format import read_config

    if model_path is None:
        from .default_model import default_model_path

        model_path = default_model_path()
    path = Path(model_path)
    if not path.exists():
        raise EdgephiError(f"{path}: no such model folder")
    cfg = read_config(path)
    params = sum(math.prod(t["shape"]) for t in cfg.tensors.values())
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    recipe = Counter(f"{name.rsplit('.', 1)[-1]}={t['format']}" for name, t in cfg.tensors.items())
    rope = "LongRoPE" if cfg.rope_scaling else "RoPE"
    click.echo(f"model          {path}")
    click.echo(f"architecture   {cfg.architecture}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads "
               f"{cfg.num_heads}/{cfg.num_kv_heads} (kv), head dim {cfg.head_dim}, ffn {cfg.intermediate_size}, "
               f"vocab {cfg.vocab_size}")
    click.echo(f"parameters     {params / 1e6:.1f}M")
    click.echo(f"quantization   {', '.join(sorted(recipe))}")
    click.echo(f"bytes on disk  {size / 1e6:.1f} MB")
    click.echo(f"context        {cfg.max_position_embeddings} tokens ({rope}, theta {cfg.rope_theta:g}, rotary dims "
               f"{cfg.rotary_dim}{', sliding window ' + str(cfg.sliding_window) if cfg.sliding_window else ''})")
    click.echo(f"KV cache       {cfg.kv_bytes_per_token} bytes per token (float16)")


@main.command()
@click.option("-m", "--model", "model_path", default=None, help="An edgephi model folder [default: the default model]")
@click.option("--threads", type=int, default=None, help="CPU threads [default: the cores nothing else keeps busy]")
@click.option("--prompt-tokens", type=int, default=512, show_default=True)
@click.option("--gen-tokens", type=int, default=128, show_default=True)
@click.option("--repetitions", type=int, default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Also print one JSON object on the last line")
@click.option("--kv-dtype", type=click.Choice(["float16", "int8", "float32"]), default="float16", show_default=True)
@click.option("--backend", type=click.Choice(["numba", "onnxruntime"]), default=None,
              help="[default: onnxruntime for a folder from export-onnx, else numba]")
@user_errors
def bench(model_path, threads, prompt_tokens, gen_tokens, repetitions, as_json, kv_dtype, backend):
    """Prefill and decode speed (llama-bench's convention), start-up times and peak memory."""
    import json

    from . import bench as benchmark

    model_path = model_folder(model_path)
    r = benchmark.run(model_path, threads=threads, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                      repetitions=repetitions, backend=backend, kv_dtype=kv_dtype)
    click.echo(f"model {model_path} on {r.backend}, {r.threads} threads, median of {repetitions}")
    click.echo(f"  prefill pp{prompt_tokens}   {r.prefill_tok_s:8.1f} tok/s")
    click.echo(f"  decode  tg{gen_tokens}   {r.decode_tok_s:8.1f} tok/s")
    click.echo(f"  time to first token {r.ttft_s:6.3f} s (prompt of {prompt_tokens})")
    click.echo(f"  load {r.load_s:.3f} s, JIT (compiling the kernels on a first run, else loading them) {r.jit_s:.3f} s")
    if r.weights_file_mb is None:
        click.echo(f"  peak RSS {r.peak_rss_mb:.0f} MiB")
    else:
        click.echo(f"  peak RSS {r.peak_rss_mb:.0f} MiB: weights file {r.weights_file_mb:.0f}, KV cache "
                   f"{r.kv_cache_mb:.0f}, the rest {r.rss_beyond_model_mb:.0f}")
    if r.weight_bytes_per_token is not None and r.read_gb_s is None:
        click.echo(f"  decode reads {r.weight_bytes_per_token / 1e6:.1f} MB of weights per token (too little free "
                   "memory to probe the bandwidth)")
    elif r.weight_bytes_per_token is not None:
        click.echo(f"  decode reads {r.weight_bytes_per_token / 1e6:.1f} MB of weights per token; memory reads "
                   f"{r.read_gb_s:.1f} GB/s here, so decode runs at {r.bandwidth_fraction:.0%} of the bandwidth bound")
    if as_json:
        click.echo(json.dumps(r.as_dict()))


@main.command()
@click.option("-m", "--model", "model_path", default=None,
              help="An edgephi model folder [default: SmolLM2-135M-Instruct, fetched once]")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback: only this machine; 0.0.0.0: the network)")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--max-sessions", type=int, default=4, show_default=True,
              help="Requests generating at once; more get HTTP 429")
@click.option("--api-key", default=None, envvar="EDGEPHI_API_KEY",
              help="Require 'Authorization: Bearer KEY' [default: $EDGEPHI_API_KEY, else none]")
@click.option("--name", "model_id", default=None, help="The model's id in requests [default: the folder's name]")
@click.option("--max-body", type=int, default=1 << 20, show_default=True, help="Largest request body in bytes")
@click.option("--threads", type=int, default=None, help="CPU threads [default: the cores nothing else keeps busy]")
@click.option("--context", type=int, default=None, help="KV ring capacity per request, in tokens")
@click.option("--kv-dtype", type=click.Choice(["float16", "int8", "float32"]), default="float16", show_default=True)
@user_errors
def serve(model_path, host, port, max_sessions, api_key, model_id, max_body, threads, context, kv_dtype):
    """Serve a model over OpenAI's HTTP API (/v1/chat/completions, /v1/completions, /v1/models,
    /health), for the `openai` client and apps that speak it. Needs: pip install 'edgephi[serve]'."""
    from .server import bound_socket, create_app, loopback, make_server, require_server_packages

    require_server_packages()
    if not 0 <= port <= 65535:
        raise click.BadParameter(f"{port} is not a TCP port", param_hint="--port")
    if max_body < 1:
        raise click.BadParameter("must be >= 1", param_hint="--max-body")
    sock = bound_socket(host, port)  # a taken port is refused before the model loads
    model = open_model(model_path, threads, context, None, kv_dtype)
    if hasattr(model.backend, "prepare_batching"):  # concurrent requests decode in one step
        notice = CompileNotice(what=BATCH_KERNEL)
        try:
            model.backend.prepare_batching(on_compile=notice)
        finally:
            notice.close()
    app = create_app(model, model_id=model_id, max_sessions=max_sessions, api_key=api_key, max_body=max_body)
    state = app.state.edgephi
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host

    def stop(signum, frame):
        raise Terminated(signum)

    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the
    # handler it found: a stop is then a clean exit, as a service manager expects
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        click.echo(f"edgephi serve: model '{state.model_id}' at http://{shown}:{bound_port}/v1 "
                   f"({max_sessions} requests at once{', API key required' if api_key else ''}); Ctrl-C stops",
                   err=True)
        if not loopback(host) and not api_key:
            click.echo(f"warning: listening on {host} without --api-key: anyone who can reach this port can use "
                       "it", err=True)
        make_server(app, sock, log_level="warning").run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.echo("edgephi serve: stopped", err=True)


@main.command()
@click.option("-m", "--model", "model_path", default=None, help="An edgephi model folder [default: the default model]")
@click.option("--text", "text_file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="A UTF-8 text file, at least two chunks long")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per chunk; the second half is scored")
@click.option("--chunks", type=int, default=None, help="Score only the first N chunks [default: all]")
@click.option("--kl-base", "base_path", default=None, type=click.Path(path_type=str),
              help="A reference model folder (say, the float model): adds KL divergence, PPL ratio, RMS Δp and "
              "the same-top-1 rate of MODEL against it, on the same tokens")
@click.option("--threads", type=int, default=None, help="CPU threads [default: the cores nothing else keeps busy]")
@click.option("--kv-dtype", type=click.Choice(["float16", "int8", "float32"]), default="float16", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Also print the figures as one JSON object on the last line")
@user_errors
def perplexity(model_path, text_file, ctx, chunks, base_path, threads, kv_dtype, as_json):
    """Perplexity on a text by llama-perplexity's method (non-overlapping chunks, second halves scored,
    BOS first where the vocabulary adds one), and with --kl-base the KL divergence from a reference."""
    import json

    from .perplexity import evaluate, read_text

    text = read_text(text_file)
    folder = model_folder(model_path)
    model = open_model(folder, threads, ctx, kv_dtype=kv_dtype)
    base = open_model(base_path, threads, ctx, kv_dtype=kv_dtype) if base_path is not None else None
    bar = ProgressBar("perplexity")
    r = evaluate(model, text, ctx=ctx, chunks=chunks, base=base, name=str(text_file), model_name=str(folder),
                 base_name=str(base_path), on_chunk=lambda done, total, ppl: bar(done, total, f"PPL {ppl:.4f}"))
    click.echo(f"model {folder}: {r.chunks} chunks of {r.ctx} tokens ({r.text_tokens} in the text), "
               f"{r.scored_tokens} scored")
    click.echo(f"  PPL              {r.ppl:10.4f} ± {r.ppl_err:.4f}")
    if r.kl is not None:
        k = r.kl
        click.echo(f"  PPL(base)        {k.base_ppl:10.4f} ± {k.base_ppl_err:.4f}   ({base_path})")
        click.echo(f"  PPL / PPL(base)  {k.ppl_ratio:10.6f} ± {k.ppl_ratio_err:.6f}")
        click.echo(f"  mean KL          {k.kl_mean:10.6f} ± {k.kl_err:.6f} nats   median {k.kl_median:.6f}, "
                   f"99% {k.kl_p99:.6f}, max {k.kl_max:.6f}")
        click.echo(f"  RMS Δp           {100 * k.rms_dp:9.3f}% ± {100 * k.rms_dp_err:.3f}%")
        click.echo(f"  same top-1       {100 * k.same_top1:9.3f}% ± {100 * k.same_top1_err:.3f}%")
    if as_json:
        click.echo(json.dumps(r.as_dict()))
