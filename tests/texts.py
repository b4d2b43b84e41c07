"""Texts for measuring quantization quality, offline and pinned.

Jane Austen's novels (public domain) come from Debian's r-cran-janeaustenr package, read without
R (tests/rdata.py): Sense and Sensibility and Mansfield Park calibrate, Pride and Prejudice
evaluates, and the two sets never overlap. CPython's pydoc topics (the running interpreter's
pydoc_data/topics.py) are an out-of-domain check. Each text is a UTF-8 file in the fixture cache,
its lines joined by newlines, checked against a pinned sha256.
"""

from __future__ import annotations

import io
import lzma
import subprocess
import tarfile
import tempfile
from pathlib import Path

from edgephi.default_model import sha256_file
from tests.fixtures import cache_dir

JANEAUSTENR_DEB = ("r-cran-janeaustenr", "1.0.0-1",
                   "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95")
JANEAUSTENR_DATA = "usr/lib/R/site-library/janeaustenr/data/"
AUSTEN_SHA256 = {
    "sensesensibility": "105e1651fe93bed7130078578efd31e0c557d68667ba672ddc876f735b30fe09",
    "mansfieldpark": "98bc90519cdf4ef663ad7de2734bb529435ef24f7abbde6bb1a50898871dafe9",
    "prideprejudice": "dfc684d4f857fa938268f9ab9c5567b64bd0691251eca959644adeabe6287a4d",
}
CALIBRATION_BOOKS = ("sensesensibility", "mansfieldpark")
EVALUATION_BOOK = "prideprejudice"
# CPython 3.11.7's topics, as the text pydoc_topics() writes
PYDOC_TOPICS_SHA256 = "71f2ff5d99bdc1f9c48c5c2353ad138201c5ca1c377e0226857ef8fa89b8bcee"


def _deb_members(deb: bytes) -> dict[str, bytes]:
    """The files of a .deb's data.tar.xz: an ar archive of debian-binary, control and data."""
    if deb[:8] != b"!<arch>\n":
        raise RuntimeError("not a Debian package")
    pos, members = 8, {}
    while pos < len(deb):
        name, size = deb[pos:pos + 16].decode().strip().rstrip("/"), int(deb[pos + 48:pos + 58])
        members[name] = deb[pos + 60:pos + 60 + size]
        pos += 60 + size + size % 2
    data_name = next(name for name in members if name.startswith("data.tar"))
    data = lzma.decompress(members[data_name]) if data_name.endswith(".xz") else members[data_name]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _write_pinned(path: Path, text: str, sha256: str) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    if (got := sha256_file(tmp)) != sha256:
        tmp.unlink()
        raise RuntimeError(f"{path.name}: sha256 {got}, pinned {sha256}")
    tmp.replace(path)
    return path


def austen_text(book: str) -> Path:
    """One of janeaustenr's novels (AUSTEN_SHA256's keys) as a text file, from the pinned Debian
    package (apt-get download, once)."""
    package, version, deb_sha256 = JANEAUSTENR_DEB
    folder = cache_dir() / f"{package}-{version}"
    target = folder / f"{book}.txt"
    if target.exists() and sha256_file(target) == AUSTEN_SHA256[book]:
        return target
    from tests.rdata import lazy_load_data

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", f"{package}={version}"],
                       cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        (deb,) = Path(tmp).iterdir()
        if (got := sha256_file(deb)) != deb_sha256:
            raise RuntimeError(f"{deb.name}: sha256 {got}, pinned {deb_sha256}")
        files = _deb_members(deb.read_bytes())
        data = Path(tmp) / "data"
        data.mkdir()
        for name in ("Rdata.rdx", "Rdata.rdb"):
            (data / name).write_bytes(files[JANEAUSTENR_DATA + name])
        novels = lazy_load_data(data)
    for name, sha256 in AUSTEN_SHA256.items():
        _write_pinned(folder / f"{name}.txt", "\n".join(novels[name]) + "\n", sha256)
    return target


def calibration_text() -> Path:
    """Sense and Sensibility followed by Mansfield Park: the calibration text, never evaluated on."""
    target = cache_dir() / f"{JANEAUSTENR_DEB[0]}-{JANEAUSTENR_DEB[1]}" / "calibration.txt"
    if not target.exists():
        text = "".join(austen_text(book).read_text(encoding="utf-8") for book in CALIBRATION_BOOKS)
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(target)
    return target


def evaluation_text() -> Path:
    """Pride and Prejudice: the evaluation text."""
    return austen_text(EVALUATION_BOOK)


def pydoc_topics() -> Path:
    """CPython's pydoc topics (topic texts in sorted order, blank-line separated), pinned to 3.11.7's."""
    import pydoc_data.topics

    target = cache_dir() / "pydoc-topics.txt"
    if target.exists() and sha256_file(target) == PYDOC_TOPICS_SHA256:
        return target
    topics = pydoc_data.topics.topics
    return _write_pinned(target, "\n\n".join(topics[key] for key in sorted(topics)), PYDOC_TOPICS_SHA256)
