"""The one error type for bad input data.

Every reader and check raises :class:`InputError` with the offending path and a one-line reason;
the prepare pipeline turns it into a quarantine record instead of crashing the run.
"""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """A file (or a case) that cannot be used, with the path and a one-line reason."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
