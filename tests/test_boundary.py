"""The runtime never imports the converter: edgephi loads, chats and describes a converted model in
a process where edgephi.convert (and a top-level `convert`) cannot be imported at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from edgephi.default_model import default_model_path

# Run first in each child: a finder that refuses the converter, as an install without it would.
BLOCK_CONVERTER = textwrap.dedent("""
    import sys

    class NoConverter:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "convert" or name == "edgephi.convert" or name.startswith("edgephi.convert."):
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, NoConverter())
""")

REPORT = textwrap.dedent("""
    import json
    converter = sorted(m for m in sys.modules if m == "convert" or m.startswith(("convert.", "edgephi.convert")))
    print(json.dumps({"converter_modules": converter, "result": result}))
""")


def run_child(body: str, block: bool = True) -> dict:
    """Run `body` (which sets `result`) in a fresh interpreter; -> the JSON it reports."""
    code = (BLOCK_CONVERTER if block else "import sys\n") + textwrap.dedent(body) + REPORT
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=os.environ.copy(), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_block_really_blocks():
    """The finder makes the converter unimportable, so the tests below prove something."""
    out = run_child("""
        try:
            import edgephi.convert  # noqa: F401
            result = "imported"
        except ImportError as exc:
            result = str(exc)
    """)
    assert out["result"] == "edgephi.convert is blocked in this test"


def test_importing_edgephi_and_its_cli_does_not_import_the_converter():
    out = run_child("""
        import edgephi
        import edgephi.cli
        import edgephi.default_model
        result = sorted(m for m in sys.modules if m.startswith("edgephi"))
    """, block=False)
    assert "edgephi.cli" in out["result"]
    assert out["converter_modules"] == []


def test_load_and_chat_without_the_converter(default_model_cache):
    folder = default_model_path()
    out = run_child(f"""
        import edgephi
        session = edgephi.load({str(folder)!r}).chat_session(max_new_tokens=8)
        result = session("What is the capital of France?")
    """)
    assert isinstance(out["result"], str) and out["result"].strip()
    assert out["converter_modules"] == []


def test_info_without_the_converter(default_model_cache):
    """`edgephi info MODEL` and `edgephi info` (the default model, already converted)."""
    folder = default_model_path()
    out = run_child(f"""
        import contextlib, io
        from edgephi.cli import main
        result = []
        for args in (["info", {str(folder)!r}], ["info"]):
            text = io.StringIO()
            with contextlib.redirect_stdout(text):
                try:
                    main(args)
                except SystemExit as exc:
                    assert not exc.code, exc.code
            result.append(text.getvalue())
    """)
    for text in out["result"]:
        assert f"model          {folder}" in text
        assert "architecture   llama" in text and "quantization" in text
    assert out["converter_modules"] == []


def test_first_run_without_the_converter_is_one_line(tmp_path):
    """With no converted default model and no converter, chat fails with one line naming the folder."""
    env = {**os.environ, "EDGEPHI_CACHE": str(tmp_path)}
    code = BLOCK_CONVERTER + "from edgephi.cli import main\nmain(['generate', 'hello'])\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                          check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"Error: {tmp_path / 'models'}") and "converter is not installed" in lines[0]
