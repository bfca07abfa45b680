"""The one base class of every error a user can fix.

The console entry point catches :class:`FinSightError` once and prints its message as one ``error:`` line
with exit status 1, so a new user-fixable error only has to subclass it; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class FinSightError(Exception):
    """An error the user can fix from its one-line message: it names the file, row, key or option at fault."""
