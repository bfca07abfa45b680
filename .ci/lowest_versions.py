"""Print pip constraints pinning every dependency of pyproject.toml (and the extras named) to its lower bound.

CI installs with these constraints into a second environment and runs a subset of the tests there, so the
lower bounds in pyproject.toml are what is tested, and cannot drift from it. Every dependency must have a
lower bound (``>=`` or ``==``). torch is left out: the environment installs its one CPU build first, which
must lie inside the declared range.

    python .ci/lowest_versions.py dev deepspeed > constraints.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CPU_TORCH = "2.13.0"


def lowest_pins(extras: list[str]) -> list[str]:
    """``name==lowest`` for every dependency and every dependency of ``extras``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    for extra in extras:
        requirements += [Requirement(line) for line in project["optional-dependencies"][extra]]
    pins = []
    for requirement in requirements:
        lower = [s.version for s in requirement.specifier if s.operator in (">=", "==")]
        if not lower:
            raise SystemExit(f"pyproject.toml: {requirement} has no lower bound to test")
        if requirement.name == "torch":
            if Version(CPU_TORCH) not in requirement.specifier:
                raise SystemExit(f"pyproject.toml: torch {CPU_TORCH} (the CPU build CI installs) is outside {requirement}")
            continue
        pins.append(f"{requirement.name}=={max(lower, key=Version)}")
    return pins


if __name__ == "__main__":
    print("\n".join(lowest_pins(sys.argv[1:])))
