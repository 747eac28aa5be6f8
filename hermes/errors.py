"""One error type for everything a user can fix; the CLI prints it as one line."""

from __future__ import annotations


class HermesError(Exception):
    """An error with a message that says what and where, and a hint that says how to fix it."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class NotFittedError(HermesError, ValueError):
    """A fitted stage was used before `fit` (or `load`)."""
