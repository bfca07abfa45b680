"""What finsight relies on in other libraries beyond their public API, in one place: one module per library.

A few things finsight needs have no public API: a resumed run must validate after a restored batch as the
uninterrupted run did (Lightning's loop state), generation rebuilds a dense model from a quantized one
(transformers' and bitsandbytes' internals), LoRA dropout is fused into PEFT's modules, and DeepSpeed runs on
the CPU. Each such use is a named function in this package that says what it reads, why, and on which
versions it was checked; no other finsight module touches another library's private attributes, patches it
or imports its internal modules (``tests/compat/test_private_access.py`` checks that). Private parts change
without notice, so importing this package checks the installed versions against :data:`TESTED`, the ranges
``pyproject.toml`` allows and CI tests at both ends, and fails with one line outside them
(:class:`UnsupportedVersionError`) rather than resuming with wrong step counters later.

It also owns the filters for the known noise of these versions (:func:`quiet_known_noise`): warnings and
log lines that third-party code emits on every run and finsight cannot fix at their cause, each filtered by
its message and the module that emits it, never by category alone, and each kept beside its library's code
with the upstream reason. The library modules import their library only inside functions: importing this
package costs nothing and brings no Lightning into ``finsight chat``.
"""

from __future__ import annotations

import importlib.metadata
import logging
import warnings
from collections.abc import Callable

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from finsight.compat import (
    bitsandbytes,
    deepspeed,
    lightning,
    peft,
    torch,
    torchdata,
    torchmetrics,
    transformers,
)
from finsight.errors import FinSightError

LIBRARIES = (lightning, transformers, peft, bitsandbytes, deepspeed, torchdata, torchmetrics, torch)

TESTED: dict[str, str] = {module.DISTRIBUTION: module.TESTED for module in LIBRARIES}
"""Version ranges of the libraries whose internals finsight uses; ``pyproject.toml`` declares the same ones."""

OPTIONAL = {"deepspeed"}
"""Extras: checked when installed, not required."""

KNOWN_WARNINGS: tuple[tuple[str, str, type[Warning]], ...] = tuple(
    warning for module in LIBRARIES for warning in module.KNOWN_WARNINGS)
"""(message regex, module regex, category) of every known warning, from the library modules."""

LOG_FILTERS: tuple[tuple[str, type[logging.Filter]], ...] = tuple(
    entry for module in LIBRARIES for entry in module.LOG_FILTERS)
"""(logger name, filter class) of every known log line, from the library modules."""


class UnsupportedVersionError(FinSightError, ImportError):
    """An installed library is outside the version range finsight is tested with.

    Fix: install the range the message gives (`pip install 'package>=low,<high'`), or reinstall finsight into a
    fresh environment (`pip install -e .`).
    """


def check_versions(installed: Callable[[str], str] = importlib.metadata.version) -> None:
    """Raise :class:`UnsupportedVersionError` naming the first library outside its tested range.

    Pre-releases of an allowed version count as that version (a ``2.6.0rc1`` is checked as ``2.6.0``); an
    optional extra that is not installed is skipped (the strategy that needs it says so when chosen).
    """
    for package, allowed in TESTED.items():
        try:
            found = installed(package)
        except importlib.metadata.PackageNotFoundError:
            if package in OPTIONAL:
                continue
            raise UnsupportedVersionError(f"{package} is not installed, but finsight needs {package}{allowed} "
                                          f"(pip install '{package}{allowed}')") from None
        if Version(Version(found).base_version) not in SpecifierSet(allowed):
            raise UnsupportedVersionError(
                f"{package} {found} is installed, but finsight is tested with {package}{allowed} "
                f"(pip install '{package}{allowed}')")


check_versions()


def _filter_known_log_lines() -> None:
    for name, noise in LOG_FILTERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, noise) for f in logger.filters):
            logger.addFilter(noise())


# At import: bitsandbytes logs its notice while being imported, and finsight's modules import this one first.
_filter_known_log_lines()


def quiet_known_noise() -> None:
    """Filter the known third-party noise of the tested versions (idempotent); everything else still shows."""
    for message, module, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    _filter_known_log_lines()
