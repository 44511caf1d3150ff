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
