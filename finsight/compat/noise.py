"""The log filter the library modules share: a known line is recognised by how its message begins."""

from __future__ import annotations

import logging


class DropLinesStartingWith(logging.Filter):
    """Drops the records whose message starts with ``prefix`` (set by each subclass); every other line stays.

    A class per line, not an instance with an argument: ``compat`` adds each filter once per logger, found by
    its class, however often the noise filters are applied.
    """

    prefix: str = ""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)
