"""User-facing error type.

Every problem caused by the user's input (a file, a flag, a label) raises
:class:`LingshuError` with a one-line message that says what was wrong, what was
expected and what to do. The CLI prints that line and exits with code 1.
"""

from __future__ import annotations

__all__ = ["LingshuError"]


class LingshuError(ValueError):
    """A problem with the user's input, explained in one line."""
