"""Errors the CLIs report as ``error: ...`` (exit 2) instead of a stack trace."""


class PackError(ValueError):
    """Bad input or arguments; the message names the offending file (and line/column) and what was expected."""


class BadImage(Exception):
    """One image cannot be used (unreadable, truncated, too small); ``--skip-bad`` skips and records it."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
