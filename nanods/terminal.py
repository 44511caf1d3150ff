"""Text from files, data and plugins reaches the terminal as text: no rich markup, no control codes.

A checkpoint's metadata, a corpus or a plugin's package name may hold "[link=...]", "[/]" or an
ANSI escape sequence. Printed raw, rich would turn the first into a hyperlink and crash on the
second, and the terminal would obey the third (clear the screen, retitle the window, recolour).
"""

from __future__ import annotations

import re

from rich.markup import escape as _escape_markup

# C0 controls except tab and newline, DEL, C1 controls, and the bidirectional overrides that
# can make text display in another order than it is stored
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """str(text) with each control character written as its escape (ESC -> \\x1b); tabs and newlines kept."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(text))


def escape(text: object) -> str:
    """printable(text), with rich markup escaped: safe inside a string rich will parse."""
    return _escape_markup(printable(text))


def format_bytes(n: float) -> str:
    """1288490188800 -> '1.17 TiB'."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"


def format_duration(seconds: float) -> str:
    """0.42 -> '420 ms', 3.33 -> '3.3 s', 75 -> '1 min 15 s', 3725 -> '1 h 2 min'."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds >= 0.001 else "< 1 ms"
    if seconds < 10:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if minutes else f"{secs} s"
    return f"{minutes // 60} h {minutes % 60} min"
