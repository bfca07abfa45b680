"""``finsight --version``: the version a bug report needs, with the libraries that decide a run's behaviour."""

from __future__ import annotations

from importlib import metadata

# The libraries whose versions change what a run does (kernels, checkpoint formats, the CLI's options).
REPORTED_LIBRARIES = ("torch", "lightning", "transformers", "peft", "bitsandbytes", "deepspeed")


def finsight_version() -> str:
    """The installed finsight's version (pyproject.toml's ``version``), read without importing anything heavy."""
    return metadata.version("finsight")


def version_report() -> str:
    """``finsight 0.1.0 (torch 2.13.0+cpu, lightning 2.6.1, ...)``: one line to paste into a bug report.

    Read from the installed distributions' metadata, so it answers in well under a second and also when one of
    the libraries is broken; a library that is not installed (the ``deepspeed`` extra) is left out.
    """
    found = []
    for name in REPORTED_LIBRARIES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return f"finsight {finsight_version()} ({', '.join(found)})"
