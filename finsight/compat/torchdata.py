"""torchdata's noise on the tested versions (0.10 and 0.11); finsight uses only its public StatefulDataLoader."""

from __future__ import annotations

DISTRIBUTION = "torchdata"
TESTED = ">=0.10,<0.12"

# ``StatefulDataLoader`` calls torch's deprecated ``set_vital`` (torch 2.13) each time it starts.
KNOWN_WARNINGS: tuple[tuple[str, str, type[Warning]], ...] = (
    (r"'set_vital' is deprecated", r"torchdata\.stateful_dataloader", UserWarning),
)
LOG_FILTERS: tuple = ()
