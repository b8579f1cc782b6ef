"""Turn ani-cli's raw output (really yt-dlp's or ffmpeg's) into progress figures.

ani-cli downloads an HLS episode with
``yt-dlp URL --no-skip-unavailable-fragments --fragment-retries infinite -N 16 -o F``
or, without yt-dlp, ``ffmpeg -extension_picky 0 -loglevel error -stats -i URL -c copy F``.
Neither sees a tty under the worker, so progress comes as lines redrawn with ``\\r``
(yt-dlp writes ``\\r`` *before* each state, ffmpeg after it); ``--color always``
adds ``\\x1b[K`` and SGR colours.  Messages from the other stream may be glued onto
a progress line (``...(frag 1/6)[download] Got error: ...``).

Units (chosen after reading both tools' sources):

* yt-dlp's ``format_bytes`` divides by 1024 and prints B, KiB, MiB, GiB, TiB...;
  the decimal spellings some versions/forks print (``kB``, ``KB``, ``MB``, ``GB``)
  are taken at their word: powers of 1000.
* ffmpeg's ``-stats`` ``size=`` is ``total_size / 1024`` whatever the label: older
  builds print ``kB``, newer ones ``KiB``; both mean 1024 bytes here.
* ffmpeg's ``speed=2.01x`` is a multiple of real time, not a byte rate, and its
  ``bitrate=`` is the *output's* kbit/s (1000 bit) per media second, so
  ``speed_bps = bitrate * 1000 / 8 * speed`` (= output bytes per wall second,
  close to the download rate with ``-c copy``).  ffmpeg never knows the total
  (``-loglevel error`` hides ``Duration:``), so percent/total/eta stay None.

Nothing is smoothed: with ``-N 16`` yt-dlp's HLS percent is computed from an
estimated total that swings as fragments finish out of order, so consecutive
figures can go *down* by 15 points.  A UI that wants a monotone bar should keep a
running max itself.  ``done`` means "this download finished" (yt-dlp's
``100% of X in T`` line, ffmpeg's final ``Lsize=`` report) — not that the job
succeeded: ffmpeg prints ``Lsize=`` and exits 0 even when it skipped a missing
segment, and yt-dlp may run several downloads (e.g. video + audio) per process.

Where the worker's yt-dlp wrapper is in control (services/worker/shims.py), yt-dlp
prints one JSON object per line instead (``--newline --progress-template``), tagged
``[anime-downloader]``: the bytes are exact, the total is yt-dlp's own (exact once
known, an estimate before). With ``-N 16`` on HLS that estimate runs far above the
truth while many fragments are in flight (7.8 % shown with 57 % of the bytes in, in a
recorded run), so the percent is also never below the share of fragments done.

Stdlib only (``re``, ``json``, ``dataclasses``, ``collections``) to keep workers small.
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass

from services.worker.shims import PROGRESS_TAG

__all__ = ["MAX_LINE_BYTES", "OutputTail", "Progress", "ProgressParser", "parse_line"]

#: Longest unterminated line kept; beyond this the *beginning* is dropped.
MAX_LINE_BYTES = 64 * 1024

_TERMINATOR = re.compile(rb"([\r\n])")
# CSI (colours, erase line, cursor moves), OSC (window title) and two-byte escapes.
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # left after splitting (keeps \t)

_YTDLP_UNITS: dict[str, int] = {
    "B": 1, "bytes": 1,
    "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4, "PiB": 1024**5, "EiB": 1024**6,
    "kB": 1000, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4, "PB": 1000**5,
}
_FFMPEG_UNITS: dict[str, int] = {
    "B": 1, "kB": 1024, "KB": 1024, "KiB": 1024, "MiB": 1024**2, "mB": 1024**2, "MB": 1024**2,
    "GiB": 1024**3,
}

_SIZE = r"\d+(?:\.\d+)?\s*[A-Za-z]+"
_YTDLP_HEAD = re.compile(
    r"\[download\]\s+(?:(?P<pct>\d+(?:\.\d+)?|N/A)%|(?P<got>" + _SIZE + r")(?=\s+at\s))"
)
_YTDLP_ALREADY = re.compile(r"\[download\]\s+.+\shas already been downloaded")
_DESTINATION = re.compile(r"\[download\] Destination: (?P<path>.+)$")
_OF = re.compile(r"\bof\s+~?\s*(?P<v>" + _SIZE + r"|Unknown(?:\s+B)?|N/A)")
_AT = re.compile(r"\bat\s+(?:(?P<v>" + _SIZE + r")/s|Unknown|N/A)")
_ETA = re.compile(r"\bETA\s+(?P<v>\d+(?::\d+){0,3})")
_IN = re.compile(r"\bin\s+(?P<v>\d+(?::\d+)+)")
_FF_FIELD = re.compile(r"([A-Za-z_]+)=\s*(\S+)")
# A line that is *only* a progress report (nothing glued on), for OutputTail's collapsing.
# Fields must be separated by blanks so the repetition cannot backtrack exponentially.
_PURE_PROGRESS = re.compile(r"\s*(?:\[download\][^\[]*|(?:[A-Za-z_]+=\s*[^\s=]+(?:\s+|$))+)")


@dataclass(frozen=True)
class Progress:
    percent: float | None          # 0..100
    downloaded_bytes: int | None   # bytes done (yt-dlp: percent*total; ffmpeg: size)
    total_bytes: int | None        # estimated total
    speed_bps: float | None        # bytes per second
    eta_seconds: float | None
    media_seconds: float | None    # ffmpeg time=
    source: str                    # "yt-dlp" | "ffmpeg"
    done: bool                     # the final "100% ... in" line (ffmpeg: "Lsize=")


def _clean(raw: bytes) -> str:
    """Decode one line (never split inside UTF-8: \\r and \\n are ASCII) and drop escapes."""
    text = raw.decode("utf-8", "replace")
    if "\x1b" in text:
        text = _ANSI.sub("", text)
    return _CONTROL.sub("", text).rstrip()


def _bytes(text: str | None, units: dict[str, int]) -> int | None:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([A-Za-z]+)", text.strip()) if text else None
    if not m or m.group(2) not in units:
        return None
    return round(float(m.group(1)) * units[m.group(2)])


def _seconds(text: str | None) -> float | None:
    """``04:12``, ``1:02:03``, ``00:01:02.00`` or ``62.5`` -> seconds; negatives -> None."""
    if not text or text.startswith("-"):
        return None
    try:
        total = 0.0
        for part in text.split(":"):
            total = total * 60 + float(part)
    except ValueError:
        return None
    return total


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:  # "N/A"
        return None


def _parse_ytdlp(line: str) -> Progress | None:
    m = _YTDLP_HEAD.search(line)
    if m is None:
        if _YTDLP_ALREADY.search(line):
            return Progress(100.0, None, None, None, 0.0, None, "yt-dlp", True)
        return None
    # Fields end where a glued message begins ("...(frag 1/6)[download] Got error").
    rest = line[m.end():].split("[", 1)[0]
    if m.group("got"):  # total unknown: "[download]   12.50MiB at  1.20MiB/s (00:00:10)"
        at = _AT.search(rest)
        speed = _bytes(at.group("v"), _YTDLP_UNITS) if at and at.group("v") else None
        return Progress(None, _bytes(m.group("got"), _YTDLP_UNITS), None,
                        None if speed is None else float(speed), None, None, "yt-dlp", False)
    pct = _float(m.group("pct"))
    if pct is not None:
        pct = min(max(pct, 0.0), 100.0)
    of, at, eta, took = _OF.search(rest), _AT.search(rest), _ETA.search(rest), _IN.search(rest)
    total = _bytes(of.group("v"), _YTDLP_UNITS) if of else None
    speed = _bytes(at.group("v"), _YTDLP_UNITS) if at and at.group("v") else None
    # The finished line is the only one with "in <elapsed>"; yt-dlp prints its literal
    # "100%" (no decimals) while a running "100.0%" may still be followed by it.
    done = took is not None or (m.group("pct") == "100" and eta is None)
    downloaded = total if done else (
        round(total * pct / 100) if total is not None and pct is not None else None)
    return Progress(
        percent=100.0 if done else pct,
        downloaded_bytes=downloaded,
        total_bytes=total,
        speed_bps=None if speed is None else float(speed),
        eta_seconds=0.0 if done else _seconds(eta.group("v") if eta else None),
        media_seconds=None,
        source="yt-dlp",
        done=done,
    )


def _parse_ffmpeg(line: str) -> Progress | None:
    if "time=" not in line:
        return None
    fields = dict(_FF_FIELD.findall(line))
    size_key = "Lsize" if "Lsize" in fields else "size"
    if "time" not in fields or not (size_key in fields or "speed" in fields):
        return None
    bitrate = fields.get("bitrate", "")
    kbits = _float(bitrate[: -len("kbits/s")]) if bitrate.endswith("kbits/s") else None
    speed = _float(fields.get("speed", "").rstrip("x"))  # "%4.3g": may be "1.01e+03x"
    return Progress(
        percent=None,
        downloaded_bytes=_bytes(fields.get(size_key), _FFMPEG_UNITS),
        total_bytes=None,
        speed_bps=kbits * 1000 / 8 * speed if kbits is not None and speed is not None else None,
        eta_seconds=None,
        media_seconds=_seconds(fields["time"]),
        source="ffmpeg",
        done=size_key == "Lsize",
    )


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _parse_json(text: str) -> Progress | None:
    """One line of the wrapper's progress template (see services/worker/shims.py)."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    done = data.get("status") == "finished"
    got, total = _number(data.get("bytes")), _number(data.get("total"))
    estimate = total if total else _number(data.get("estimate"))
    frag, frags = _number(data.get("frag")), _number(data.get("frags"))
    percent = None
    if got is not None and estimate:
        percent = 100.0 * got / estimate
    if frag is not None and frags:
        percent = max(percent or 0.0, 100.0 * frag / frags)
    if done:
        percent = 100.0
    speed, eta = _number(data.get("speed")), _number(data.get("eta"))
    return Progress(
        percent=None if percent is None else min(max(percent, 0.0), 100.0),
        downloaded_bytes=None if got is None else int(got),
        total_bytes=None if estimate is None else int(estimate),
        speed_bps=speed, eta_seconds=0.0 if done else eta, media_seconds=None,
        source="yt-dlp", done=done)


def parse_line(line: str) -> Progress | None:
    """Parse one line of yt-dlp or ffmpeg output; None when it is not a progress line.

    Meant for cleaned lines, but ANSI escapes are stripped here too if present.
    """
    if line.startswith(PROGRESS_TAG):
        return _parse_json(line[len(PROGRESS_TAG):])
    if "\x1b" in line:
        line = _ANSI.sub("", line)
    if "[download]" in line:
        return _parse_ytdlp(line)
    return _parse_ffmpeg(line)


def _is_progress_line(line: str) -> bool:
    """A line that is only a progress report, with no message glued to it."""
    if line.startswith(PROGRESS_TAG):
        return parse_line(line) is not None
    return parse_line(line) is not None and _PURE_PROGRESS.fullmatch(line) is not None


class _LineSplitter:
    """Split a byte stream on ``\\r`` and ``\\n``; the unterminated rest is capped.

    Bytes are split before decoding, so a chunk may end anywhere (mid-UTF-8,
    mid-escape): the piece waits in the buffer until its terminator arrives.
    """

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_bytes

    def feed(self, chunk: bytes) -> list[tuple[str, bool]]:
        """Complete lines in order, as (cleaned text, ended by ``\\r``)."""
        if b"\n" not in chunk and b"\r" not in chunk:
            self._buf += chunk
            self._cap()
            return []
        parts = _TERMINATOR.split(bytes(self._buf) + chunk)
        self._buf = bytearray(parts[-1])
        self._cap()
        return [(_clean(parts[i][-self._max:]), parts[i + 1] == b"\r")
                for i in range(0, len(parts) - 1, 2)]

    def flush(self) -> list[tuple[str, bool]]:
        rest, self._buf = self._buf, bytearray()
        return [(_clean(bytes(rest)), False)] if rest else []

    def partial(self) -> str:
        return _clean(bytes(self._buf))

    def _cap(self) -> None:
        if len(self._buf) > self._max:
            del self._buf[: len(self._buf) - self._max]


class ProgressParser:
    """Incremental parser for one run's output stream (feed stdout, or both merged).

    A line counts once its terminator arrives.  yt-dlp writes ``\\r`` *before* each
    state, so without ``--newline`` the current state is reported when the next one
    starts (one redraw late) or at :meth:`flush`.
    """

    def __init__(self) -> None:
        self._split = _LineSplitter()
        self._latest: Progress | None = None
        #: The last ``[download] Destination: <path>`` yt-dlp printed (kept for an error
        #: message: the line itself may be long gone from the output's tail).
        self.destination: str | None = None

    def feed(self, chunk: bytes) -> list[Progress]:
        return self._parse(self._split.feed(chunk))

    def flush(self) -> list[Progress]:
        return self._parse(self._split.flush())

    @property
    def latest(self) -> Progress | None:
        return self._latest

    def _parse(self, lines: list[tuple[str, bool]]) -> list[Progress]:
        for text, _ in lines:
            if text.startswith("[download] Destination: "):
                m = _DESTINATION.match(text)
                if m:
                    self.destination = m.group("path")
        found = [p for p in (parse_line(text) for text, _ in lines if text) if p is not None]
        if found:
            self._latest = found[-1]
        return found


class OutputTail:
    """Bounded tail of a run's output (stdout and stderr), for the error message of a failed job.

    Feed one byte stream: merge stderr into stdout (``stderr=subprocess.STDOUT``) or
    use one tail per stream, since interleaving two streams' chunks here would mix
    their partial lines.  Like a terminal, only the last ``\\r``-redrawn state of a
    line is kept; in addition consecutive pure progress lines (``--newline`` mode)
    collapse into the last one, so a progress bar shows up at most once in a row.
    Memory is bounded by max_lines * max_chars plus one 64 KiB partial line.
    """

    def __init__(self, max_lines: int = 20, max_chars: int = 4000) -> None:
        if max_lines < 1 or max_chars < 1:
            raise ValueError("max_lines and max_chars must be positive")
        self._max_lines = max_lines
        self._max_chars = max_chars
        self._split = _LineSplitter()
        self._lines: deque[str] = deque(maxlen=max_lines)
        self._last_is_progress = False
        self._redraw = ""  # last non-blank \r-ended state of the current line

    def feed(self, chunk: bytes) -> None:
        for text, by_cr in self._split.feed(chunk):
            if by_cr:
                if text.strip():
                    self._redraw = text
                continue
            line = text if text.strip() else self._redraw
            self._redraw = ""
            if line.strip():
                progress = _is_progress_line(line)
                if progress and self._last_is_progress:
                    self._lines.pop()
                self._lines.append(line[-self._max_chars:])
                self._last_is_progress = progress

    def lines(self) -> list[str]:
        out = list(self._lines)
        partial = self._split.partial()
        current = partial if partial.strip() else self._redraw
        if current.strip():
            if out and self._last_is_progress and _is_progress_line(current):
                out.pop()
            out.append(current[-self._max_chars:])
        return out[-self._max_lines:]

    def text(self) -> str:
        return "\n".join(self.lines())[-self._max_chars:]
