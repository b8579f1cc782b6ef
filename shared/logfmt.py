"""logfmt lines (``message key=value ...``) and a logger looked up on first use.

A leaf: stdlib ``json`` and ``re`` only, no ``logging``. Every service formats its
log lines with ``kv``; the command-line probe (``anime-status``) imports the socket
set-up, which logs only when something goes wrong, and should not pay for
``logging`` and the ``traceback`` it brings (~5 ms of a probe whose floor, ``python
-c "import zmq"``, is ~60 ms: bench/status_cli.py), hence ``lazy_logger``.
"""

from __future__ import annotations

import json
import re
from typing import Any

# A logfmt value is written bare unless it is empty or holds a space, '=', '"', a
# backslash or a character that is not printable (control characters, line and
# paragraph separators, other spaces): then it is quoted, with JSON's escapes.
_BARE = re.compile(r'[^\s="\\]+')
_ESCAPE = re.compile(r'[^\x20-\x7e]')


def kv(message: str, **context: object) -> str:
    r"""``message key=value ...`` in logfmt, as grep, lnav and Loki's logfmt parser read it.

    A value that needs it is double-quoted with backslash escapes (``\"``, ``\\``,
    ``\n``, ``\uXXXX`` for what is not printable); lists and tuples are JSON (an
    argument list reads exactly as the program receives it), quoted like any other
    value. None values are left out."""
    parts = [message]
    for key, value in context.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            text = json.dumps(list(value), ensure_ascii=False)
        else:
            text = str(value)
        parts.append(f"{key}={logfmt_value(text)}")
    return " ".join(parts)


def logfmt_value(text: str) -> str:
    if _BARE.fullmatch(text) and text.isprintable():
        return text
    quoted = json.dumps(text, ensure_ascii=False)  # " \ and control characters escaped
    if quoted.isprintable():
        return quoted
    return _ESCAPE.sub(lambda m: m.group() if m.group().isprintable() else
                       json.dumps(m.group())[1:-1], quoted)


class lazy_logger:  # noqa: N801  (used like logging.getLogger)
    """``logging.getLogger(name)``, imported and looked up at the first call."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        import logging

        return getattr(logging.getLogger(self._name), attr)
