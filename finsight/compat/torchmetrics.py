"""torchmetrics' warnings finsight silences where it knows better (checked on 1.6 and 1.9)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

DISTRIBUTION = "torchmetrics"
TESTED = ">=1.6,<2"


@contextmanager
def compute_before_update_allowed() -> Iterator[None]:
    """``Metric.compute()`` on a rank that never updated that metric, without torchmetrics' warning.

    ``compute()`` synchronizes across ranks, so every rank must call it, also one whose part of the split held
    no row of a source; torchmetrics warns each time. The caller handles the empty result (0 / 0 is NaN).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*compute.* was called before the .*update", category=UserWarning)
        yield


KNOWN_WARNINGS: tuple[tuple[str, str, type[Warning]], ...] = ()
LOG_FILTERS: tuple = ()
