"""``finsight --version`` names finsight's version and the libraries a bug report needs; the licence and the
changelog agree with pyproject.toml."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib import metadata

import torch
from helpers import ROOT

from finsight.cli.lightning_cli import main

PYPROJECT = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
VERSION = re.search(r'^version = "([^"]+)"', PYPROJECT, re.M).group(1)


def test_version_names_finsight_and_the_libraries_that_decide_a_run():
    """Run as users run it: the console script's own module, in a fresh interpreter."""
    for flag in ("--version", "-V"):
        out = subprocess.run([sys.executable, "-m", "finsight", flag], capture_output=True, text=True, check=True,
                             timeout=60).stdout.strip()
        assert out.startswith(f"finsight {VERSION} (torch {torch.__version__}, lightning "
                              f"{metadata.version('lightning')}, transformers {metadata.version('transformers')}")
        assert re.fullmatch(r"finsight \S+ \((\w+ [^,()]+)(, \w+ [^,()]+)*\)", out), out


def test_version_from_the_python_entry_point(capsys):
    assert main(["--version"]) is None
    assert capsys.readouterr().out.startswith(f"finsight {VERSION} (torch ")


def test_the_licence_is_the_one_pyproject_names():
    assert 'license = { text = "Apache-2.0" }' in PYPROJECT
    licence = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence
    assert "END OF TERMS AND CONDITIONS" in licence


def test_the_changelog_starts_with_the_current_version():
    headings = re.findall(r"^## (\S+)", (ROOT / "CHANGELOG.md").read_text(encoding="utf-8"), re.M)
    assert headings and headings[0] == VERSION
