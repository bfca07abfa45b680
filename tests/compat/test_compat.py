"""The compatibility module: tested version ranges enforced in one line, and only known noise filtered."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers import ROOT
from packaging.requirements import Requirement

from finsight import compat


def test_the_checked_ranges_are_the_ones_pyproject_declares():
    """Required dependencies and extras (deepspeed) alike: the gate and the install allow the same versions."""
    declared = {Requirement(line).name: Requirement(line).specifier for line in importlib.metadata.requires("finsight")}
    assert set(compat.TESTED) == {"lightning", "transformers", "peft", "bitsandbytes", "deepspeed", "torchdata",
                                  "torchmetrics", "torch"}
    for package, allowed in compat.TESTED.items():
        assert Requirement(f"{package}{allowed}").specifier == declared[package]


def test_every_library_module_names_its_range_and_noise_and_imports_its_library_lazily():
    for library in compat.LIBRARIES:
        assert library.__doc__ and library.DISTRIBUTION in compat.TESTED
        assert isinstance(library.KNOWN_WARNINGS, tuple) and isinstance(library.LOG_FILTERS, tuple)
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, finsight.compat; print(sorted(m for m in sys.modules if m.split('.')[0] "
         "in {'lightning', 'transformers', 'peft', 'bitsandbytes', 'deepspeed', 'torchdata', 'torchmetrics'}))"],
        capture_output=True, text=True, check=True, timeout=120).stdout
    assert loaded.strip() == "[]"


IN_RANGE = {"lightning": "2.6.6", "transformers": "5.24.0", "peft": "0.21.2", "bitsandbytes": "0.50.2",
            "deepspeed": "0.19.8", "torchdata": "0.11.0", "torchmetrics": "1.9.0", "torch": "2.13.0+cpu"}


def test_an_optional_library_that_is_absent_passes_and_a_required_one_is_named():
    def without(package):
        def installed(name):
            if name == package:
                raise importlib.metadata.PackageNotFoundError(name)
            return IN_RANGE[name]
        return installed

    compat.check_versions(without("deepspeed"))
    with pytest.raises(compat.UnsupportedVersionError, match=r"^peft is not installed, but finsight needs "
                                                              r"peft>=0\.18,<0\.22 \(pip install"):
        compat.check_versions(without("peft"))


def test_versions_outside_the_tested_range_are_refused_naming_package_version_and_range():
    versions = IN_RANGE
    compat.check_versions(versions.__getitem__)  # the versions in range pass
    compat.check_versions({**versions, "lightning": "2.6.7rc1"}.__getitem__)  # a pre-release of one in range too
    for package, version in [("lightning", "2.7.0"), ("transformers", "4.57.6"), ("torchdata", "0.12.0"),
                             ("bitsandbytes", "0.49.2"), ("peft", "0.22.0"), ("deepspeed", "0.19.7"),
                             ("torchmetrics", "2.0.0"), ("torch", "2.14.0")]:
        with pytest.raises(compat.UnsupportedVersionError) as raised:
            compat.check_versions({**versions, package: version}.__getitem__)
        allowed = compat.TESTED[package]
        assert str(raised.value) == (f"{package} {version} is installed, but finsight is tested with "
                                     f"{package}{allowed} (pip install '{package}{allowed}')")


def _fake_distribution(folder: Path, name: str, version: str) -> Path:
    """A dist-info folder that ``importlib.metadata`` finds before the real one when ``folder`` comes first on
    the path: the installed version seen by the check, nothing else changed."""
    info = folder / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return folder


@pytest.mark.parametrize("command", [
    [str(Path(sys.executable).parent / "finsight")],
    [sys.executable, "-m", "finsight"],
])
def test_the_command_reports_an_unsupported_version_in_one_line(tmp_path, command):
    fake = _fake_distribution(tmp_path / "site", "lightning", "2.7.0")
    env = {**os.environ, "PYTHONPATH": str(fake)}
    result = subprocess.run([*command, "fit", "--config", str(ROOT / "configs" / "quickstart.yaml")],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: lightning 2.7.0 is installed, but finsight is tested with lightning>=2.6,<2.7 "
        "(pip install 'lightning>=2.6,<2.7')"]
    assert not (tmp_path / "lightning_logs").exists()


def test_known_noise_is_filtered_by_message_and_module_only():
    """Each known warning is dropped when the module it belongs to raises it, and still shown from anywhere
    else (finsight's own code, say), as is every other warning of the same category from that module."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.quiet_known_noise()
        for message, module, category in compat.KNOWN_WARNINGS:
            raiser = module.replace("\\", "")
            text = message.replace("\\", "")
            warnings.warn_explicit(text, category, "x.py", 1, module=raiser)
            warnings.warn_explicit(text, category, "x.py", 1, module="finsight.training.module")
            warnings.warn_explicit("something else is deprecated", category, "x.py", 1, module=raiser)
    shown = [(str(w.message), w.category) for w in caught]
    assert len(shown) == 2 * len(compat.KNOWN_WARNINGS)
    for message, _, category in compat.KNOWN_WARNINGS:
        assert (message.replace("\\", ""), category) in shown
    assert shown.count(("something else is deprecated", FutureWarning)) == 2
