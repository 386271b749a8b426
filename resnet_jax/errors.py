"""Errors a user can fix from their message alone, the check that a value is one of the choices, and
the did-you-mean hint for a misspelt name.

This module imports nothing from the package, so every module can raise these errors without an
import cycle; the command lines print a `UserError` as one `error: ...` line, without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class UserError(Exception):
    """The message names the bad input and what would be valid; a traceback would add nothing."""


class ConfigError(UserError, ValueError):
    """A config value, override or workdir that cannot work."""


class ImageError(UserError, ValueError):
    """An image file that cannot be read or decoded; `reason` is the decoder's words alone."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


def first_line(text: str, limit: int = 300) -> str:
    """The first line of an error's text, for a one-line message that quotes it."""
    lines = text.strip().splitlines()
    return lines[0][:limit] if lines else ""


def closest(value: Any, choices: Iterable[Any]) -> str | None:
    """The choice that `value` was probably meant to be (a typo away), or None."""
    names = [str(choice) for choice in choices]
    matches = difflib.get_close_matches(str(value), names, n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(value: Any, choices: Iterable[Any]) -> str:
    """' (did you mean X?)' when a choice is a typo away from `value`, else ''."""
    match = closest(value, choices)
    return f" (did you mean {match!r}?)" if match is not None else ""


def check_choice(key: str, value: Any, valid: Iterable[Any]) -> None:
    """Raise `ConfigError` naming the key, the bad value and the valid choices."""
    valid = tuple(valid)
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")
