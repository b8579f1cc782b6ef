"""Titles on both sides of ani-cli: the query it can carry, and the show it really downloaded.

ani-cli v5 joins its query words with ``+`` and puts them, unencoded, into
``https://anidb.app/browse?q=<query>``, which curl receives with URL globbing on:
``[`` ``]`` ``{`` ``}`` make curl fail (reported as ``No results found!``), ``#`` cuts the
query, ``&`` ends the parameter, ``+`` becomes a space, ``%`` starts an escape, ``?``
and the characters a URL may not hold raw (quotes, ``<>``, ``\\``, ``^``, backquote,
``|``, control characters) change or break the request. ``search_query`` replaces each
of them with a space: a search engine ignores punctuation, so ``[Oshi no Ko]`` finds
the show as ``Oshi no Ko`` does.

The site's title is in the file name ani-cli writes, ``<site title> Episode <n>.mp4``,
as the site sends it (HTML entities such as ``&amp;`` included; a ``/`` makes a
subdirectory). ``same_show`` compares it with the selected title, normalised (case,
entities, punctuation, white space).
"""

from __future__ import annotations

import html
import re
import unicodedata

_UNSAFE = re.compile(r"""[\[\]{}#&+%?"<>\\^`|\x00-\x1f\x7f]""")
_SPACES = re.compile(r"\s+")
_FILE_NAME = re.compile(r"^(?P<title>.*) Episode (?P<episode>[^/]+)\.[A-Za-z0-9]+$", re.S)


def search_query(title: str) -> str:
    """The title with every character ani-cli and curl cannot carry made a space."""
    return _SPACES.sub(" ", _UNSAFE.sub(" ", title)).strip()


def site_title(relative_name: str) -> tuple[str, str] | None:
    """(site title, episode) from the name ani-cli gave the file, relative to its
    download directory; None for a name not of that form."""
    m = _FILE_NAME.match(relative_name)
    return (m.group("title"), m.group("episode")) if m else None


def normalise(title: str) -> str:
    """Case, HTML entities, punctuation and white space do not tell two shows apart."""
    text = unicodedata.normalize("NFKC", html.unescape(html.unescape(title))).casefold()
    kept = "".join(c if c.isalnum() else " " for c in text)
    return " ".join(kept.split())


def same_show(selected: str, site: str) -> bool:
    return normalise(selected) == normalise(site)
