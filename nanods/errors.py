"""The one exception type the CLI turns into a single clear line and a non-zero exit."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class NanodsError(Exception):
    """A problem the user can fix; its message says what to do next."""


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid name, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
