"""Turning exceptions into the one line a user reads.

Libraries raise multi-line messages (Ray's with a task header and colour codes first, pyarrow's
and transformers' with context lines); ammd's errors quote one line of them, and the command
line prints every error as one line (``cluster.cli``). These are the two ways of doing that.
"""
from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TELLING = re.compile(r"died|dead|exit|killed|Error:", re.I)


def first_line(err: BaseException, limit: int = 300) -> str:
    """The line of ``err``'s message that says what happened, at most ``limit`` characters: the
    first line that names a death or an error (not a ``ray::`` task header), else the first
    non-empty line, else the exception's type name."""
    lines = [_ANSI.sub("", line).strip() for line in str(err).splitlines()]
    lines = [line for line in lines if line]
    telling = [line for line in lines if _TELLING.search(line) and not line.startswith("ray::")]
    return (telling or lines or [type(err).__name__])[0][:limit]


def one_line(err: BaseException) -> str:
    """The whole message on one line (whitespace runs collapsed), or the type name."""
    return " ".join(str(err).split()) or type(err).__name__
