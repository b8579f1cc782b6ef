"""What kind of failure an attempt's error is: a small table, message pattern -> class.

ani-cli ends every real failure with one ``die`` line (``/work/shared/ani-cli-v5.md``),
and those lines tell different stories. The worker classifies each failed attempt
(``JobFailed.failure_class``); the dispatcher classifies again only when a report
carries no class (an older worker) or one it does not know. Nothing here raises: an
error that matches nothing is ``other``, and so is anything that is not a string.

Classes (``docs/failures.md``):

- ``not_released``: the site does not list the episode yet (``Invalid episode!``, what
  ani-cli v5 says for an episode it does not list; ``Episode not released!``). The job
  waits for a re-check without using up a retry.
- ``selection``: the search or the ``-S`` index found nothing (``No results found!``,
  ``Invalid anime selection``): the selection is probably wrong (or the site's search is
  down). Normal retries; the stable message is what ``error_message`` records.
- ``transient``: the site or the network had a bad moment (no sources, network errors,
  time-outs). Normal retries.
- ``cloudflare``: a sub-class of ``transient``: ``Blocked by cloudflare.``. Backs off
  longer and holds back the next starts on that host.
- ``other``: anything else, handled as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NOT_RELEASED = "not_released"
SELECTION = "selection"
TRANSIENT = "transient"
CLOUDFLARE = "cloudflare"
OTHER = "other"
CLASSES = (NOT_RELEASED, SELECTION, TRANSIENT, CLOUDFLARE, OTHER)
#: A sub-class and the class it belongs to.
PARENT = {CLOUDFLARE: TRANSIENT}

#: ani-cli's die() lines, as printed by v5 (82574d2), each a whole line of its output, in
#: order of precedence: the first one found decides. ``prefix``: the line starts so (the
#: real script appends advice to the Cloudflare one). The Cloudflare line comes first:
#: the script dies with it inside the ``$(anidb_search ...)`` subshell, so it goes on
#: with an empty result and dies again, ``No results found!`` (checked with the real
#: script: tests/integration/test_real_ani_cli.py).
DIE_LINES: tuple[tuple[str, str, bool], ...] = (
    ("Blocked by cloudflare.", CLOUDFLARE, True),
    ("Invalid episode!", NOT_RELEASED, False),
    ("Episode not released!", NOT_RELEASED, False),
    ("No results found!", SELECTION, False),
    ("Invalid anime selection", SELECTION, False),
    ("Episode is released, but no valid sources!", TRANSIENT, False),
    ("No sources found for sub!", TRANSIENT, False),
    ("No sources found for dub!", TRANSIENT, False),
)

#: The network as the downloader (yt-dlp, ffmpeg) or curl words its failures: anywhere
#: in the error. A 404 is not here: a missing stream does not come back by waiting.
NETWORK = re.compile("|".join((
    r"connection (?:refused|reset|timed out|aborted)",
    r"network is unreachable",
    r"no route to host",
    r"temporary failure in name resolution",
    r"could not resolve host",
    r"name or service not known",
    r"read timed out",
    r"timed out",
    r"remote end closed connection",
    r"incompleteread",
    r"http error 5\d\d",
    r"curl: \((?:6|7|28|35|52|56)\)",
)), re.IGNORECASE)

#: JobFailed reasons whose error is the job's own (protocol.py); the others (a stop, a
#: full disk, an invalid row...) are not classified.
TIMEOUT_REASON = "timeout"
CLASSIFIED_REASONS = ("error", TIMEOUT_REASON)


@dataclass(frozen=True)
class Classified:
    cls: str
    line: str | None = None  # the die line that decided it, as printed


def _lines(error: str) -> list[str]:
    return [line.strip() for line in error.splitlines() if line.strip()]


def classify(reason: str, error: object) -> Classified | None:
    """The class of a failed attempt's ``error`` (None: a reason that is not classified,
    e.g. a stop): the first die line of the table found as a whole line of it, else a
    network error or a time-out (transient), else other."""
    if reason not in CLASSIFIED_REASONS:
        return None
    text = error if isinstance(error, str) else ""
    lines = _lines(text)
    for message, cls, prefix in DIE_LINES:
        for line in reversed(lines):
            if line == message or (prefix and line.startswith(message)):
                return Classified(cls, line)
    if reason == TIMEOUT_REASON or NETWORK.search(text):
        return Classified(TRANSIENT)
    return Classified(OTHER)


def known(cls: object) -> str | None:
    """``cls`` if it is a class of this table, else None (a newer peer's, or garbage)."""
    return cls if isinstance(cls, str) and cls in CLASSES else None


def is_transient(cls: str | None) -> bool:
    return cls is not None and (cls == TRANSIENT or PARENT.get(cls) == TRANSIENT)


def stable_error(error: str, found: Classified | None) -> str:
    """``error`` reduced to what says it all: its first line (what failed, e.g.
    ``ani-cli returned non-zero exit code: 1``) and the die line, so that the
    troubleshooting query ``GROUP BY error_message`` groups them; unchanged when no die
    line decided the class."""
    if found is None or found.line is None:
        return error
    lines = _lines(error)
    head = lines[0] if lines and lines[0] != found.line else None
    return f"{head}\n{found.line}" if head else found.line
