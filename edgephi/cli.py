"""The `edgephi` command: a thin skin over the Python API; user errors become one line, no traceback."""

from __future__ import annotations

import functools
import sys
import time

import click

from .errors import EdgephiError

QUANT_CHOICES = ["q4_0", "q4_1", "q8_0", "f16", "f32"]


def user_errors(fn):
    """Turn library errors into `edgephi: error: ...` and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgephiError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise click.ClickException(f"{where}{exc.strerror or exc}") from None
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


def print_conversion_report(report) -> None:
    mb = report.bytes_on_disk / 1e6
    click.echo(f"wrote {report.out}: {report.parameters / 1e6:.1f}M parameters, {mb:.1f} MB on disk, "
               f"{report.seconds:.1f} s")
    click.echo(f"  {'tensor kind':<12} {'format':<10} relative error")
    for kind, (formats, err, lossless) in report.by_kind().items():
        shown = "0 (copied bit for bit)" if lossless else "0 (exact)" if err == 0 else f"{err:.2e}"
        click.echo(f"  {kind:<12} {formats:<10} {shown}")


@main.command()
@click.argument("src", type=click.Path(path_type=str))
@click.argument("out", type=click.Path(path_type=str))
@click.option("--quant", type=click.Choice(QUANT_CHOICES), default=None,
              help="Format of the transformer's linear weights [default: q4_0; a GGUF keeps its own]")
@click.option("--embed-quant", type=click.Choice(QUANT_CHOICES), default="q8_0", show_default=True,
              help="Format of the token embedding and output matrices")
@click.option("--force", is_flag=True, help="Replace OUT if it exists")
@user_errors
def convert(src, out, quant, embed_quant, force):
    """Convert a Hugging Face checkpoint folder or a GGUF file SRC into the edgephi model folder OUT."""
    from convert.pipeline import convert as run  # the runtime never needs the converter's modules

    report = run(src, out, quant=quant, embed_quant=embed_quant, force=force, progress=ProgressBar("converting"))
    print_conversion_report(report)
