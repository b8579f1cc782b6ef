"""Log lines are logfmt: a strict parser of the format reads back every value kv() wrote.

The parser follows go-logfmt's decoder (the one Loki's ``| logfmt`` uses): a key is a
run of characters above space other than ``=`` and ``"``; a value is bare (the same
characters) or double-quoted with JSON's escapes; anything else is an error. The
``logfmt`` package on PyPI is not used: its parser drops backslashes (``\\n`` reads
back as ``n``), so it could not tell a right quoting from a wrong one.
"""

from __future__ import annotations

import json
import os
import random

import pytest

from shared.logfmt import kv

_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r",
            "t": "\t"}


class LogfmtError(ValueError):
    pass


def _bare(c: str) -> bool:
    return c > " " and c not in '="'


def _quoted(line: str, i: int) -> tuple[str, int]:
    """The value of the quoted string starting at line[i] == '"', and the index after it."""
    out, i = [], i + 1
    while i < len(line):
        c = line[i]
        if c == '"':
            return "".join(out), i + 1
        if c < " ":
            raise LogfmtError(f"control character {c!r} inside quotes at {i}")
        if c != "\\":
            out.append(c)
            i += 1
            continue
        esc = line[i + 1:i + 2]
        if esc in _ESCAPES:
            out.append(_ESCAPES[esc])
            i += 2
        elif esc == "u" and len(line) >= i + 6:
            out.append(chr(int(line[i + 2:i + 6], 16)))
            i += 6
        else:
            raise LogfmtError(f"bad escape \\{esc} at {i}")
    raise LogfmtError("unterminated quoted value")


def parse(line: str) -> dict[str, str | None]:
    """Strict logfmt: {key: value}; a bare word (the message's words) maps to None."""
    pairs: dict[str, str | None] = {}
    i = 0
    while i < len(line):
        if line[i] <= " ":
            i += 1
            continue
        start = i
        while i < len(line) and _bare(line[i]):
            i += 1
        if i == start:
            raise LogfmtError(f"unexpected {line[i]!r} at {i}")
        key = line[start:i]
        if i == len(line) or line[i] <= " ":
            pairs[key] = None
            continue
        if line[i] != "=":
            raise LogfmtError(f"unexpected {line[i]!r} after key {key!r}")
        i += 1
        if i < len(line) and line[i] == '"':
            value, i = _quoted(line, i)
        else:
            start = i
            while i < len(line) and _bare(line[i]):
                i += 1
            value = line[start:i]
        if i < len(line) and line[i] > " ":
            raise LogfmtError(f"unexpected {line[i]!r} after the value of {key!r}")
        pairs[key] = _surrogates(value)
    return pairs


def _surrogates(value: str) -> str:
    """Join the UTF-16 surrogate pairs that \\u escapes of characters past U+FFFF give."""
    return value.encode("utf-16", "surrogatepass").decode("utf-16")


TITLES = [
    'Oshi no Ko "Idol"',
    "Re:Zero = Starting Life",
    "Fate/Zero",
    "Frieren: Beyond Journey's End",
    "two\nlines\r\nand\ttab",
    "Ünïcödé ☃ 葬送のフリーレン",
    "back\\slash \\n not a newline",
    "",
    " leading and trailing ",
    "emoji 🎉 and a zero-width\u200bspace",
    "separators\u2028\u2029\x85end",
    "bell\x07 escape\x1b[31m nul\x00 del\x7f",
    "tag \U000e0041 character",
    'x="y" z=1',
    "-",
]


@pytest.mark.parametrize("title", TITLES)
def test_every_title_reads_back_exactly_on_one_line(title: str) -> None:
    line = kv("ani-cli started", title=title, job_id=17, episode=3)
    assert "\n" not in line and "\r" not in line and line.isprintable(), line
    assert parse(line) == {"ani-cli": None, "started": None, "title": title,
                           "job_id": "17", "episode": "3"}


def test_lists_are_json_inside_one_logfmt_value() -> None:
    argv = ["ani-cli", "-S", "1", "-e", "2", "-d", 'Kiss "&" Tell', "a\\b", "two\nlines"]
    line = kv("dry run: would run", argv=argv, empty=[], numbers=(1, 2))
    values = parse(line)
    assert json.loads(values["argv"]) == argv
    assert values["empty"] == "[]" and json.loads(values["numbers"]) == [1, 2]


def test_plain_values_stay_bare_for_grep() -> None:
    line = kv("downloaded", job_id=17, anime_id=5114, path="/srv/anime/videos/5114/episodes/ep001.mkv",
              seconds=6.345, dry_run=False, worker_id="w01", skipped=None)
    assert line == ("downloaded job_id=17 anime_id=5114 path=/srv/anime/videos/5114/episodes/"
                    "ep001.mkv seconds=6.345 dry_run=False worker_id=w01")
    assert " job_id=17 " in line  # grep 'job_id=17 ' data/logs/*.log


def test_quoting_is_double_quotes_with_backslash_escapes() -> None:
    assert kv("m", reason="unknown key (not in authorized_keys_dir)") == \
        'm reason="unknown key (not in authorized_keys_dir)"'
    assert kv("m", title='say "hi"\\') == r'm title="say \"hi\"\\"'
    assert kv("m", error="first\nsecond") == r'm error="first\nsecond"'
    assert kv("m", empty="") == 'm empty=""'


def test_random_text_reads_back() -> None:
    seed = int(os.environ.get("LOGFMT_SEED", "20261125"))
    print(f"logfmt seed={seed} (set LOGFMT_SEED to reproduce)")
    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(0, 0x80)] + list("é☃\u2028\u00a0\u200b🎉\U000e0001")
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        line = kv("m", value=text)
        assert parse(line) == {"m": None, "value": text}, (seed, text, line)


def test_the_parser_is_strict() -> None:
    for bad in ['k="open', 'k=a"b', 'k="x"y', 'k=a=b', '"k"=v', r'k="\q"']:
        with pytest.raises(LogfmtError):
            parse(bad)
