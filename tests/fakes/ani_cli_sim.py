"""Simulated ani-cli v5, driven by a JSON catalog (stdlib only, any python3).

The executable ``tests/fakes/ani-cli`` runs :func:`main`. It stands in for the
real ani-cli (see ``/work/shared/ani-cli-v5.md``) in tests and in the demo: same
flags, same messages, same exit codes, same file names, same progress output.

Command line (as ani-cli parses it)
-----------------------------------
``-S/--select-nth N``   1-based search result. Out of range, 0, negative or not a
                        number: ``Invalid anime selection`` (exit 1). Without
                        ``-S`` a single result is taken; several results would
                        open fzf, so the simulation dies ``Invalid anime selection``.
``-e/--episode/-r/--range E``  a single episode number (``-1`` = last episode).
                        No ``-e`` at all or an empty value: the menu is asked (a
                        single episode is taken as it is), nothing chosen: ``Invalid
                        episode selection``; anything that is not exactly one of the
                        numbers 1..episodes: ``Invalid episode!``; a range (``1-3``):
                        ``Invalid range!`` (DEVIATION: the real one downloads each).
``-d/--download``       download (same as ``ANI_CLI_PLAYER=download``).
``-q/--quality Q``      accepted; unless Q is ``best``/``worst`` or a substring of
                        one of the qualities (default 1080, 720, 480, 360), warns
                        ``<Q> not found, defaulting to best`` on stderr and goes on.
``--dub -c/--continue -v/--vlc --skip --no-detach --exit-after-play -N -U``
                        accepted and ignored (``--skip-title`` eats its argument);
                        ``--rofi``/``--dmenu`` choose the menu program.
``-V/--version``        prints ``5.0.0``, exit 0.
A flag that needs a value but is last: ``missing argument!`` (exit 1).
Every other word (``--frobnicate`` too) is a word of the search query. The query
is built as ani-cli builds it and goes where it goes: the words joined with ``+``
(line 499) into ``https://anidb.app/browse?q=<query>``, through curl's URL globbing
(a ``[a-b]`` range or ``{x,y}`` set expands into several requests whose results are
joined, any other bracket or brace or a control character: curl fails, ``No results
found!``; ``#`` starts the fragment), then read by the site (``&`` ends ``q``, ``+``
is a space, ``%XX`` decoded) and compared with each catalog ``query`` ignoring case,
punctuation and white space, as a search engine would.

Order of checks (each one ``die``s: red on stderr, exit 1), as in the real script:
  ``No player found. Looked for mpv and vlc`` (``ANI_CLI_PLAYER`` unset and no
  mpv/vlc on PATH, ``-d`` or not: line 410) -> flag errors (``missing argument!``)
  -> ``Program <menu> not found. Please install it.`` (the menu program:
  ``ANI_CLI_MENU``, default fzf; with stdin not a terminal an installed dmenu or
  rofi replaces it, lines 417-424; ``command -v`` must find it even though no menu
  opens with ``-S`` and ``-e``) -> ``Neither yt-dlp nor ffmpeg found`` (download
  mode) -> the trap is set -> empty query: with fzf ``missing argument!``
  (DEVIATION: the real one loops for ever reading stdin), with another menu program
  the query is asked from it, none: exit 1 without a message -> ``No results
  found!`` (no catalog, unreadable catalog, unknown query, curl's refusal) ->
  ``Invalid anime selection`` -> ``Invalid episode selection`` / ``Invalid
  episode!`` / ``Invalid range!`` -> behaviour ``fail`` / ``fail_times``.
A menu program other than fzf, rofi and dmenu is really run when a choice is
missing (``"$menu" "<prompt>"``, the choices on stdin), so a worker's menu that
fails loudly shows its message.

Signals: until the trap is set (after the dependency checks) INT/HUP/TERM end the
script (killed by the signal). Then ``trap 'cleanup; exit 1' INT HUP TERM``: exit 1
WITHOUT a die message; like sh, a signal that comes while a downloader (``hls_url``)
runs in the foreground is acted on only once it has ended, so a SIGTERM to the
script alone leaves yt-dlp running to its end.

With ``TERM`` unset, the two ``tput`` calls before the download (lines 570-572) and
the one of the trap's cleanup each print ``tput: No value for $TERM and no -T
specified`` on stderr (``TERM=dumb``: nothing).
``die`` prints ``\\033[2K\\r\\033[1;31m<message>\\033[0m\\n`` to stderr, exactly
like ani-cli's ``die()``.

After the checks it prints ``Playing episode N...`` and runs the "downloader".
Whatever the downloader does, the exit code is then 0 (ani-cli ends with
``exit 0``), unless the behaviour sets ``exit_code``.

Catalog
-------
Path in env ``ANI_CLI_SIM_CATALOG`` (missing env or file: ``No results found!``)::

    {
      "defaults": {"size": 1024, "duration": 0.0},
      "anime": [
        {"query": "Fullmetal Alchemist: Brotherhood",
         "results": [
            {"title": "Fullmetal Alchemist", "episodes": 51},
            {"title": "Fullmetal Alchemist: Brotherhood (site)", "episodes": 64,
             "id": "optional-show-id",
             "behaviour": {"size": 2048},
             "episode_behaviour": {"3": {"fail": "Episode is released, but no valid sources!"}}}
         ]}
      ]
    }

Query matching: the joined query words and each entry's ``query`` are compared
case-insensitively (``str.casefold``) after collapsing runs of whitespace to one
space; the first exact match wins. Titles and queries are plain data: quotes,
``$(...)``, backticks, ``;``, newlines and non-ASCII are matched and used
literally, never through a shell. ``-S N`` picks ``results[N-1]``. ``id`` is
optional (default: a hash of the title); it only appears in the history file.

The file is ``$ANI_CLI_DOWNLOAD_DIR/<title> Episode <n>.mp4`` (dir default ``.``,
created if missing like yt-dlp does), the title UNSANITISED (a ``/`` in it makes
a sub-directory, as yt-dlp would).

Behaviour
---------
Effective behaviour = ``defaults``, overridden key by key by the result's
``behaviour``, overridden by ``episode_behaviour["<n>"]``. Keys:

``size``          int, bytes to write (default 1024; 0 gives an empty file).
``duration``      float seconds the download takes (default 0): bytes are
                  written at an even rate, flushed chunk by chunk (the ``.part``
                  grows on disk during the run), progress redrawn at least
                  every 0.1 s.
``chunk``         int, write chunk size (default 65536).
``qualities``     list of quality names for ``-q`` (default 1080/720/480/360).
``fail``          message: die with it (exit 1) before writing anything.
``fail_times``    int N: the first N runs for this (title, episode) die with
                  ``fail_message`` (default ``No results found!``), later runs go
                  on. Counters live in ``$ANI_CLI_SIM_STATE/ani-cli-sim-state.json``
                  (dir default: the catalog's directory), guarded by ``flock`` on
                  ``ani-cli-sim-state.lock``: safe under concurrent runs.
``no_file``       true: prints the destination and a 0% progress line, then
                  ``ERROR: unable to download video data: HTTP Error 404: Not Found``
                  on stderr; writes no file; exit 0 (a failed yt-dlp).
``leave_part``    true: writes the first half of the bytes into ``<name>.part``
                  and exits 0 without renaming (a truncated download).
``hang``          true: writes the first half into ``<name>.part`` then sleeps
                  for ever, file still open (a stalled download). SIGTERM ends it
                  (the trap: exit 1). ``"ignore_term"``: SIGTERM is ignored too,
                  only SIGKILL ends it.
``spawn_child``   true: before downloading, starts ``sleep 1000`` (stdin
                  /dev/null, stdout/stderr inherited, same process group) and
                  logs its pid (run-log event ``child``). It is NOT killed when
                  the simulation exits: only killing the group reaps it.
``enospc_after``  int N: writing fails with ENOSPC once N bytes are written.
``stderr_lines``  list of strings printed to stderr just before exiting (before
                  the die message when the run dies).
``exit_code``     int, exit code instead of 0 (a crash of ani-cli itself); not
                  used when the run dies or is terminated (always 1).
``video``         float seconds (``true``: 2): instead of counting bytes, write a
                  real, playable MP4 clip of that length (testsrc + 440 Hz sine,
                  320x240, H.264/AAC, ``+faststart``), so a setup with ``[downloader]
                  verify = true`` and ``container = "mkv"`` (the defaults) accepts
                  and remuxes it. Generated once per length by ffmpeg (PATH, else
                  imageio-ffmpeg) into ``<state dir>/.sim-media/`` (atomic rename:
                  concurrent runs are safe), then written like ``size`` bytes (its
                  ``.part``, ``duration``, progress, ``enospc_after``); ``size`` is
                  ignored. No ffmpeg: dies ``ani-cli-sim: "video" needs ffmpeg ...``.
``hls_url``       URL (``{episode}`` is replaced by the episode number): instead
                  of writing bytes, does what ani-cli v5 does (lines 299-302):
                  ``yt-dlp URL --no-skip-unavailable-fragments --fragment-retries
                  infinite -N 16 -o "<dir>/<title> Episode <n>.mp4" $ANI_CLI_PLAYER_FLAGS``
                  and, if yt-dlp is missing or fails, ``ffmpeg -extension_picky 0
                  -loglevel error -stats -i URL -c copy <dir>/<title> Episode <n>.mp4
                  $ANI_CLI_PLAYER_FLAGS``; stdio inherited, same process group,
                  argument lists (no shell); exit 0 whatever they return.
                  ``yt-dlp``/``ffmpeg`` are looked up on PATH; without ffmpeg on
                  PATH, ``imageio_ffmpeg.get_ffmpeg_exe()`` if importable, and
                  then a link named ``ffmpeg`` to it (in ``<state dir>/.sim-bin``)
                  goes first on the children's PATH: yt-dlp needs ``ffmpeg`` on
                  PATH for its HLS fix-up, as a real ani-cli user has it.
                  ``$ANI_CLI_PLAYER_FLAGS`` is split on whitespace (the shell's
                  word splitting of an unquoted variable: quotes in it are NOT
                  interpreted) and only its FIRST word reaches the downloader
                  (``$3`` of ``download()``), exactly like the real script.

Writing mimics yt-dlp: ``[download] Destination: <path>``, then ``<name>.part``
written in chunks and renamed to ``<name>`` at the end; progress lines on stdout
redrawn with ``\\r``::

    \\r[download]  42.0% of    1.00MiB at    3.10MiB/s ETA 00:01
    \\r[download] 100% of    1.00MiB in 00:00:01 at 1.00MiB/s\\n

Any OSError while writing (ENOSPC...) prints ``ERROR: unable to write data: <exc>``
on stderr (e.g. ``[Errno 28] No space left on device``), leaves the ``.part``
as it is and exits 0. A trapped signal while it writes exits 1 promptly, leaving
the ``.part`` (an interrupted yt-dlp).

Environment
-----------
``ANI_CLI_SIM_CATALOG``   catalog path (required for any result).
``ANI_CLI_SIM_STATE``     directory of the ``fail_times`` counters.
``ANI_CLI_SIM_LOG``       run log (JSON lines), see below.
``ANI_CLI_PLAYER``        must be ``download`` unless ``-d`` is given.
``ANI_CLI_DOWNLOAD_DIR``  download directory (default ``.``).
``ANI_CLI_HIST_DIR``      if set, appends ``<ep>\\t<id>\\t<title>\\n`` to
                          ``$ANI_CLI_HIST_DIR/ani-hsts`` after the downloader
                          (dir created if needed; errors ignored).
``ANI_CLI_PLAYER_FLAGS``  extra downloader words (``hls_url`` only).

Run log
-------
If ``ANI_CLI_SIM_LOG`` is set, each invocation appends JSON lines (one
``write`` on an ``O_APPEND`` descriptor each, so concurrent runs never
interleave). Every line has ``event``, ``pid``, ``time``, ``argv``, ``query``,
``select`` (int when -S was an integer, else the raw string, or null),
``episode`` (same), ``title`` (site title once selected, else null),
``download_dir``, ``cwd``, ``player`` (env ANI_CLI_PLAYER), ``hist_dir``,
``player_flags`` (raw env), ``download`` (-d given), ``quality``, ``dub``.
Events:

``start``  right after the flags are parsed (title null).
``child``  ``child_pid`` of the ``spawn_child`` process, as soon as it runs.
``exec``   ``cmd``: the argument list of a downloader run (``hls_url``),
           ``program`` (resolved path or null), ``child_pid``.
``end``    ``outcome``, ``exit_code``, ``bytes`` (bytes written, or size of
           the final file for ``hls_url``), ``path`` (final file), ``attempt``
           (1-based run count for ``fail_times``, else null), ``child_pid``,
           ``error`` (die message or write error, else null). Outcomes:
           ``ok``, ``failed`` (died), ``no_file``, ``partial`` (leave_part),
           ``enospc``, ``write_error`` (other OSError), ``terminated``
           (SIGTERM/SIGINT), ``downloader_failed`` (hls_url: both commands
           failed), ``version``.
A run killed with SIGKILL logs no ``end``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import re
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

VERSION = "5.0.0"
DEFAULT_CHUNK = 64 * 1024
DEFAULT_QUALITIES = ["1080", "720", "480", "360"]
TICK = 0.05  # seconds between progress redraws (must stay < 0.1)
STATE_FILE = "ani-cli-sim-state.json"
LOCK_FILE = "ani-cli-sim-state.lock"
FLAGS_WITH_VALUE = {
    "-S": "select", "--select-nth": "select",
    "-e": "episode", "--episode": "episode", "-r": "episode", "--range": "episode",
    "-q": "quality", "--quality": "quality",
    "--skip-title": "skip_title",
}
IGNORED_FLAGS = {
    "-c", "--continue", "-v", "--vlc", "--skip", "--no-detach",
    "--exit-after-play", "-N", "--nextep-countdown", "-U", "--update",
}


class Die(Exception):
    """ani-cli's ``die``: message in red on stderr, exit 1."""


class Terminated(BaseException):
    """Raised by the SIGTERM/SIGINT handler."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass
class Options:
    """The parsed command line."""

    query_words: List[str] = field(default_factory=list)
    select: Optional[str] = None
    episode: Optional[str] = None
    quality: Optional[str] = None
    skip_title: Optional[str] = None
    download: bool = False
    dub: bool = False
    version: bool = False
    menu: Optional[str] = None  # --rofi / --dmenu
    error: Optional[str] = None

    @property
    def query(self) -> str:
        return " ".join(self.query_words)


@dataclass
class Record:
    """What happened during this run (fed to the run log's ``end`` event)."""

    title: Optional[str] = None
    behaviour: Dict[str, Any] = field(default_factory=dict)
    outcome: Optional[str] = None
    error: Optional[str] = None
    bytes: int = 0
    path: Optional[str] = None
    attempt: Optional[int] = None
    child_pid: Optional[int] = None


# --------------------------------------------------------------------------- output


def eprint(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def die_text(message: str) -> str:
    return "\033[2K\r\033[1;31m%s\033[0m\n" % message


def format_bytes(num: float) -> str:
    """yt-dlp's ``format_bytes``: ``1.00MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num) < 1024 or unit == "TiB":
            return "%.2f%s" % (num, unit)
        num /= 1024.0
    raise AssertionError("unreachable")


def format_clock(seconds: float, hours: bool) -> str:
    secs = int(seconds)
    h, rest = divmod(secs, 3600)
    m, s = divmod(rest, 60)
    if hours or h:
        return "%02d:%02d:%02d" % (h, m, s)
    return "%02d:%02d" % (m, s)


def progress_line(done: int, total: int, elapsed: float) -> str:
    """A yt-dlp progress line (without the leading ``\\r``)."""
    percent = 100.0 * done / total if total else 100.0
    if elapsed > 0 and done > 0:
        speed = done / elapsed
        speed_str = format_bytes(speed) + "/s"
        eta = format_clock((total - done) / speed, hours=False)
    else:
        speed_str, eta = "Unknown B/s", "Unknown"
    return "[download] %5.1f%% of %10s at %10s ETA %s" % (
        percent, format_bytes(total), speed_str, eta)


def final_line(total: int, elapsed: float) -> str:
    speed = total / elapsed if elapsed > 0 else float(total)
    return "[download] 100%% of %10s in %s at %s/s" % (
        format_bytes(total), format_clock(elapsed, hours=True), format_bytes(speed))


class Progress:
    """Redraws the progress line with ``\\r``, at most every ``TICK`` seconds."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.start = time.monotonic()
        self.last = -1.0
        self.shown = False

    def show(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and self.last >= 0 and now - self.last < TICK:
            return
        self.last = now
        self.shown = True
        out("\r" + progress_line(done, self.total, now - self.start))

    def finish(self) -> None:
        out("\r" + final_line(self.total, time.monotonic() - self.start) + "\n")

    def abort(self) -> None:
        if self.shown:
            out("\n")


# --------------------------------------------------------------------------- run log


class RunLog:
    """Appends one JSON line per event to ``$ANI_CLI_SIM_LOG`` (if set)."""

    def __init__(self, path: Optional[str], base: Dict[str, Any]) -> None:
        self.path = path
        self.base = base

    def emit(self, event: str, **fields: Any) -> None:
        if not self.path:
            return
        entry = {"event": event, "time": time.time()}
        entry.update(self.base)
        entry.update(fields)
        line = (json.dumps(entry, ensure_ascii=True) + "\n").encode("ascii")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError:
            return
        try:
            os.write(fd, line)
        except OSError:
            pass
        finally:
            os.close(fd)


def maybe_int(value: Optional[str]) -> Any:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return value


def log_base(argv: List[str], opts: Options, env: Dict[str, str]) -> Dict[str, Any]:
    return {
        "pid": os.getpid(),
        "argv": list(argv),
        "query": opts.query,
        "select": maybe_int(opts.select),
        "episode": maybe_int(opts.episode),
        "title": None,
        "download_dir": env.get("ANI_CLI_DOWNLOAD_DIR", "."),
        "cwd": os.getcwd(),
        "player": env.get("ANI_CLI_PLAYER"),
        "hist_dir": env.get("ANI_CLI_HIST_DIR"),
        "player_flags": env.get("ANI_CLI_PLAYER_FLAGS"),
        "menu": env.get("ANI_CLI_MENU"),
        "term": env.get("TERM"),
        "download": opts.download,
        "quality": opts.quality,
        "dub": opts.dub,
        # the worker's share of total_bandwidth_mbps, as its yt-dlp wrapper would apply it
        "rate_limit_bps": maybe_int(env.get("ANIME_DL_RATE_LIMIT_BPS")),
    }


# --------------------------------------------------------------------------- flags


def parse_args(argv: List[str]) -> Options:
    """Parse like ani-cli's ``while [ $# -gt 0 ]; case "$1" ...`` loop.

    A missing flag value is recorded in ``Options.error`` (so the run can be
    logged before dying) instead of raising.
    """
    opts = Options()
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in FLAGS_WITH_VALUE:
            if i + 1 >= len(argv):
                opts.error = opts.error or "missing argument!"
                break
            setattr(opts, FLAGS_WITH_VALUE[word], argv[i + 1])
            i += 1
        elif word in ("-d", "--download"):
            opts.download = True
        elif word == "--dub":
            opts.dub = True
        elif word in ("-V", "--version"):
            opts.version = True
        elif word in ("--rofi", "--dmenu"):
            opts.menu = word[2:]
        elif word not in IGNORED_FLAGS:
            opts.query_words.append(word)
        i += 1
    return opts


def require_player(env: Dict[str, str]) -> None:
    """Line 410, before the flags are parsed: without ``ANI_CLI_PLAYER`` a player must
    be installed, ``-d`` or not."""
    if env.get("ANI_CLI_PLAYER"):
        return
    if not any(shutil.which(p, path=env.get("PATH")) for p in ("mpv", "vlc")):
        raise Die("No player found. Looked for mpv and vlc")


def menu_program(opts: Options, env: Dict[str, str]) -> str:
    """Lines 417-424 and the flags: ``ANI_CLI_MENU`` or fzf; with stdin not a terminal
    an installed dmenu, then rofi, replaces it; ``--rofi``/``--dmenu`` replace that."""
    menu = env.get("ANI_CLI_MENU") or "fzf"
    if not sys.stdin or not sys.stdin.isatty():
        for program in ("dmenu", "rofi"):
            if shutil.which(program, path=env.get("PATH")):
                menu = program
    return opts.menu or menu


def check_dependencies(menu: str, env: Dict[str, str], downloading: bool) -> None:
    """Lines 507-519: ``dep_ch "$menu_program"`` even when no menu will open, then the
    downloader of download mode."""
    if not _command_v(menu, env):
        raise Die("Program %s not found. Please install it." % menu)
    if downloading and not any(_command_v(p, env) for p in ("yt-dlp", "ffmpeg")):
        raise Die("Neither yt-dlp nor ffmpeg found")


def _command_v(name: str, env: Dict[str, str]) -> bool:
    """The shell's ``command -v``: a path names an executable file, a name is looked up."""
    if "/" in name:
        return os.path.isfile(name) and os.access(name, os.X_OK)
    return shutil.which(name, path=env.get("PATH")) is not None


def run_menu(menu: str, prompt: str, lines: List[str]) -> str:
    """``nth``'s menu: ``"$menu_program" "$1"`` with the choices on stdin (fzf, rofi and
    dmenu cannot run here: nothing is chosen). Returns its first line of output."""
    if menu in ("fzf", "rofi", "dmenu"):
        return ""
    try:
        res = subprocess.run([menu, prompt], input="\n".join(lines).encode(),
                             stdout=subprocess.PIPE, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout.decode("utf-8", "replace").split("\n", 1)[0] if res.returncode == 0 else ""


def tput(env: Dict[str, str], count: int) -> None:
    """``tput`` with TERM unset prints an error each time (TERM=dumb: silently nothing)."""
    if not env.get("TERM"):
        for _ in range(count):
            eprint("tput: No value for $TERM and no -T specified")


# --------------------------------------------------------------------------- catalog


def normalise(text: str) -> str:
    """How the site's search compares: case, punctuation and white space do not count."""
    return " ".join("".join(c if c.isalnum() else " " for c in text.casefold()).split())


class CurlError(Exception):
    """curl refused the URL (exit 3): ani-cli's search then finds nothing."""


def ani_cli_query(words: List[str]) -> str:
    """Line 499 (each word: ``"$query $1" | sed 's|^ ||;s| |+|g'``) and line 552."""
    query = ""
    for word in words:
        joined = "\n".join(line[1:] if line.startswith(" ") else line
                           for line in ("%s %s" % (query, word)).split("\n"))
        query = joined.replace(" ", "+").rstrip("\n")  # $(...) drops trailing newlines
    return query


_RANGE = re.compile(r"\[(\d+-\d+|[a-z]-[a-z]|[A-Z]-[A-Z])(:\d+)?\]")


def curl_urls(url: str) -> List[str]:
    """What curl does to a URL with globbing on: ``[a-b]`` ranges and ``{x,y}`` sets
    expand into several URLs, any other bracket or brace is an error (exit 3, like a
    control character); then ``#`` starts the fragment, which is not sent."""
    if any(ord(c) < 32 or ord(c) == 127 for c in url):
        raise CurlError("URL using bad/illegal format or missing URL")
    urls = [url]
    while True:
        expanded = []
        for u in urls:
            m = _RANGE.search(u)
            b = re.search(r"\{([^{}\[\]]*)\}", u)
            if m is None and b is None:
                expanded.append(u)
                continue
            if m is not None and (b is None or m.start() < b.start()):
                lo, hi = m.group(1).split("-")
                values = ([str(i) for i in range(int(lo), int(hi) + 1)] if lo.isdigit()
                          else [chr(c) for c in range(ord(lo), ord(hi) + 1)])
                expanded += [u[:m.start()] + v + u[m.end():] for v in values]
            else:
                expanded += [u[:b.start()] + v + u[b.end():] for v in b.group(1).split(",")]
        if expanded == urls:
            break
        urls = expanded
    for u in urls:
        if any(c in u for c in "[]{}"):
            raise CurlError("bad range in URL")
    return [u.split("#", 1)[0] for u in urls]


def searched_for(url: str) -> str:
    """What the site reads as the query: the ``q`` parameter, ``+`` a space, ``%XX``
    decoded, an ``&`` ending it."""
    query = url.split("?", 1)[1] if "?" in url else ""
    return (urllib.parse.parse_qs(query, keep_blank_values=True).get("q") or [""])[0]


def load_catalog(env: Dict[str, str]) -> Dict[str, Any]:
    path = env.get("ANI_CLI_SIM_CATALOG")
    if not path:
        eprint("ani-cli-sim: ANI_CLI_SIM_CATALOG is not set")
        raise Die("No results found!")
    try:
        with open(path, encoding="utf-8") as fh:
            catalog = json.load(fh)
    except (OSError, ValueError) as exc:
        eprint("ani-cli-sim: cannot read catalog %s: %s" % (path, exc))
        raise Die("No results found!")
    if not isinstance(catalog, dict):
        raise Die("No results found!")
    return catalog


def search(catalog: Dict[str, Any], query: str) -> List[Dict[str, Any]]:
    """The results of one query the site received (decoded)."""
    wanted = normalise(query)
    for entry in catalog.get("anime", []):
        if normalise(str(entry.get("query", ""))) == wanted:
            return list(entry.get("results", []))
    return []


SEARCH_URL = "https://anidb.app/browse?q=%s"


def search_like_ani_cli(catalog: Dict[str, Any], words: List[str]) -> List[Dict[str, Any]]:
    """The query as ani-cli builds it, through curl's globbing, as the site reads it."""
    try:
        urls = curl_urls(SEARCH_URL % ani_cli_query(words))
    except CurlError:
        return []
    results: List[Dict[str, Any]] = []
    for url in urls:  # curl fetches every URL of a glob; ani-cli gets the pages joined
        results += search(catalog, searched_for(url))
    return results


def select_result(results: List[Dict[str, Any]], select: Optional[str],
                  menu: str) -> Dict[str, Any]:
    """Line 556: ``-S N`` is the N-th line of the results; without it ``nth`` takes a
    single result as it is and asks the menu otherwise."""
    if select is None:
        if len(results) == 1:
            return results[0]
        choice = run_menu(menu, "Select anime: ", ["%d %s" % (i + 1, r.get("title"))
                                                   for i, r in enumerate(results)])
        select = choice.split(" ", 1)[0] if choice else ""
    try:
        index = int(select.strip())
    except ValueError:
        raise Die("Invalid anime selection")
    if not 1 <= index <= len(results):
        raise Die("Invalid anime selection")
    return results[index - 1]


_EP_START = re.compile(r"^(-1|[0-9]+(\.[0-9]+)?)")
_EP_END = re.compile(r"(-1|[0-9]+(\.[0-9]+)?)$")


def parse_episode(value: Optional[str], episodes: int, menu: str = "fzf") -> int:
    """Lines 564 and 349-372: no ``-e`` (or an empty one) asks ``nth`` (a single episode
    is taken as it is), ``-1`` is the last one, anything that is not exactly one of the
    site's episode numbers is ``Invalid episode!``. DEVIATION: a range (``1-3``,
    ``"5 6"``) dies ``Invalid range!`` instead of downloading each episode."""
    if not value:
        if episodes == 1:
            return 1
        value = run_menu(menu, "Select episode: ", [str(i) for i in range(1, episodes + 1)])
        if not value:
            raise Die("Invalid episode selection")
    if value == "-1" and episodes > 0:
        return episodes
    start, end = _EP_START.search(value), _EP_END.search(value)
    if (start and end and start.group(0) != end.group(0)) or "\n" in value:
        raise Die("Invalid range!")
    if value in {str(n) for n in range(1, episodes + 1)}:
        return int(value)
    raise Die("Invalid episode!")


def effective_behaviour(catalog: Dict[str, Any], result: Dict[str, Any],
                        episode: int) -> Dict[str, Any]:
    behaviour: Dict[str, Any] = {"size": 1024, "duration": 0.0}
    behaviour.update(catalog.get("defaults", {}))
    behaviour.update(result.get("behaviour", {}))
    behaviour.update(result.get("episode_behaviour", {}).get(str(episode), {}))
    return behaviour


def show_id(result: Dict[str, Any]) -> str:
    if "id" in result:
        return str(result["id"])
    digest = hashlib.sha1(str(result["title"]).encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:12]


def check_quality(quality: Optional[str], behaviour: Dict[str, Any]) -> None:
    if quality is None or quality in ("best", "worst"):
        return
    qualities = [str(q) for q in behaviour.get("qualities", DEFAULT_QUALITIES)]
    if not any(quality in q for q in qualities):
        eprint("%s not found, defaulting to best" % quality)


# --------------------------------------------------------------------------- failures


def state_dir(env: Dict[str, str]) -> str:
    configured = env.get("ANI_CLI_SIM_STATE")
    if configured:
        return configured
    catalog = env.get("ANI_CLI_SIM_CATALOG", "")
    return os.path.dirname(os.path.abspath(catalog)) if catalog else os.getcwd()


def next_attempt(directory: str, title: str, episode: int) -> int:
    """Increment and return the run counter of (title, episode), under flock."""
    os.makedirs(directory, exist_ok=True)
    key = json.dumps([title, episode], ensure_ascii=True)
    state_path = os.path.join(directory, STATE_FILE)
    with open(os.path.join(directory, LOCK_FILE), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            with open(state_path, encoding="utf-8") as fh:
                state = json.load(fh)
        except (OSError, ValueError):
            state = {}
        attempt = int(state.get(key, 0)) + 1
        state[key] = attempt
        tmp = "%s.%d.tmp" % (state_path, os.getpid())
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(state, fh)
        os.replace(tmp, state_path)
    return attempt


def apply_failures(behaviour: Dict[str, Any], record: Record, episode: int,
                   env: Dict[str, str]) -> None:
    if behaviour.get("fail"):
        raise Die(str(behaviour["fail"]))
    limit = int(behaviour.get("fail_times", 0) or 0)
    if limit > 0:
        record.attempt = next_attempt(state_dir(env), str(record.title), episode)
        if record.attempt <= limit:
            raise Die(str(behaviour.get("fail_message", "No results found!")))


# --------------------------------------------------------------------------- downloader


def spawn_child(log: RunLog, record: Record) -> None:
    child = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)
    record.child_pid = child.pid
    log.emit("child", child_pid=child.pid)


def payload(offset: int, length: int) -> bytes:
    block = bytes(range(256))
    start = offset % 256
    reps = (start + length) // 256 + 1
    return (block * reps)[start:start + length]


def sleep_forever() -> None:
    while True:
        time.sleep(3600)


def write_chunks(fh: Any, record: Record, target: int, chunk: int,
                 limit: Optional[int], progress: Progress,
                 source: Callable[[int, int], bytes] = payload) -> None:
    """Write from ``record.bytes`` up to ``target``, flushing each chunk; ``source(offset,
    length)`` gives the bytes (counted bytes, or a real clip's: behaviour ``video``)."""
    while record.bytes < target:
        size = min(chunk, target - record.bytes)
        if limit is not None and record.bytes + size > limit:
            size = limit - record.bytes
            if size <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fh.write(source(record.bytes, size))
        fh.flush()
        record.bytes += size
        progress.show(record.bytes)


def pump(fh: Any, behaviour: Dict[str, Any], stop_at: int, record: Record,
         progress: Progress) -> None:
    """Write ``stop_at`` bytes at the even rate ``size / duration``."""
    size = int(behaviour.get("size", 0))
    duration = float(behaviour.get("duration", 0) or 0)
    chunk = max(1, int(behaviour.get("chunk", DEFAULT_CHUNK)))
    limit = behaviour.get("enospc_after")
    limit = None if limit is None else int(limit)
    start = time.monotonic()
    while True:
        fraction = 1.0 if duration <= 0 else min(1.0, (time.monotonic() - start) / duration)
        target = stop_at if fraction >= 1.0 else min(stop_at, int(size * fraction))
        write_chunks(fh, record, target, chunk, limit, progress,
                     behaviour.get("_source", payload))
        progress.show(record.bytes, force=True)
        if fraction >= 1.0 or (stop_at < size and record.bytes >= stop_at):
            return
        time.sleep(TICK)


VIDEO_DEFAULT_SECONDS = 2.0


def video_clip(seconds: float, env: Dict[str, str]) -> bytes:
    """The bytes of a playable MP4 of ``seconds`` (behaviour ``video``), made once by ffmpeg."""
    ffmpeg = find_program("ffmpeg")
    if ffmpeg is None:
        raise Die('ani-cli-sim: "video" needs ffmpeg (on PATH, or pip install imageio-ffmpeg)')
    directory = os.path.join(state_dir(env), ".sim-media")
    path = os.path.join(directory, "clip-%gs.mp4" % seconds)
    if not os.path.isfile(path):
        os.makedirs(directory, exist_ok=True)
        tmp = "%s.%d.tmp.mp4" % (path, os.getpid())
        cmd = [ffmpeg, "-nostdin", "-hide_banner", "-v", "error", "-y",
               "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25:duration=%g" % seconds,
               "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=44100:duration=%g" % seconds,
               "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
               "-c:a", "aac", "-b:a", "64k", "-movflags", "+faststart", tmp]
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
        if done.returncode != 0 or not os.path.isfile(tmp):
            raise Die("ani-cli-sim: ffmpeg could not make the video clip: %s"
                      % done.stderr.decode("utf-8", "replace").strip()[-500:])
        os.replace(tmp, path)  # atomic: a concurrent run sees the whole clip or none
    with open(path, "rb") as fh:
        return fh.read()


def with_video(behaviour: Dict[str, Any], env: Dict[str, str]) -> Dict[str, Any]:
    """Behaviour ``video``: the clip's bytes replace the counted ones (``size`` = its size)."""
    seconds = behaviour.get("video")
    if not seconds:
        return behaviour
    seconds = VIDEO_DEFAULT_SECONDS if seconds is True else float(seconds)
    clip = video_clip(seconds, env)
    return dict(behaviour, size=len(clip),
                _source=lambda offset, length: clip[offset:offset + length])


def write_download(out_path: str, behaviour: Dict[str, Any], record: Record) -> None:
    """The byte-writing downloader: ``<name>.part`` then rename, like yt-dlp."""
    size = int(behaviour.get("size", 0))
    partial = bool(behaviour.get("leave_part") or behaviour.get("hang"))
    stop_at = size // 2 if partial else size
    part = out_path + ".part"
    progress = Progress(size)
    out("[download] Destination: %s\n" % out_path)
    try:
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        with open(part, "wb") as fh:
            pump(fh, behaviour, stop_at, record, progress)
            if behaviour.get("hang"):
                sleep_forever()
        if behaviour.get("leave_part"):
            progress.abort()
            record.outcome = "partial"
            return
        os.replace(part, out_path)
    except (OSError, ValueError) as exc:
        progress.abort()
        eprint("ERROR: unable to write data: %s" % exc)
        enospc = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
        record.outcome = "enospc" if enospc else "write_error"
        record.error = str(exc)
        return
    progress.finish()
    record.outcome = "ok"
    record.path = out_path


def fake_failed_download(out_path: str, behaviour: Dict[str, Any], record: Record) -> None:
    """``no_file``: looks like a yt-dlp run that got nothing."""
    out("[download] Destination: %s\n" % out_path)
    out("\r" + progress_line(0, int(behaviour.get("size", 0)), 0.0) + "\n")
    eprint("ERROR: unable to download video data: HTTP Error 404: Not Found")
    record.outcome = "no_file"


def split_player_flags(raw: Optional[str]) -> List[str]:
    """The shell's word splitting of an unquoted ``$ANI_CLI_PLAYER_FLAGS``."""
    return (raw or "").split()


def downloader_flags(raw: Optional[str]) -> List[str]:
    """What reaches yt-dlp/ffmpeg: line 335 passes the split words to ``download()``,
    which hands only ``$3``, the FIRST word, to the downloader."""
    return split_player_flags(raw)[:1]


def downloader_commands(url: str, out_path: str, player_flags: List[str]) -> List[List[str]]:
    """ani-cli v5's downloader (lines 299-302): yt-dlp, then the ffmpeg fallback."""
    return [
        ["yt-dlp", url, "--no-skip-unavailable-fragments", "--fragment-retries",
         "infinite", "-N", "16", "-o", out_path] + list(player_flags),
        ["ffmpeg", "-extension_picky", "0", "-loglevel", "error", "-stats",
         "-i", url, "-c", "copy", out_path] + list(player_flags),
    ]


def find_program(name: str) -> Optional[str]:
    found = shutil.which(name)
    if found or name != "ffmpeg":
        return found
    try:
        import imageio_ffmpeg  # type: ignore
        return str(imageio_ffmpeg.get_ffmpeg_exe())
    except Exception:
        return None


def children_env(env: Dict[str, str]) -> Optional[Dict[str, str]]:
    """The downloaders' environment: ``ffmpeg`` on PATH when only imageio-ffmpeg has one.

    A real ani-cli user installs ffmpeg; yt-dlp looks for it on PATH (HLS fix-up).
    None: inherit ours unchanged.
    """
    if shutil.which("ffmpeg", path=env.get("PATH")):
        return None
    exe = find_program("ffmpeg")
    if exe is None:
        return None
    bin_dir = os.path.join(state_dir(env), ".sim-bin")
    link = os.path.join(bin_dir, "ffmpeg")
    try:
        if not (os.path.islink(link) and os.readlink(link) == exe):
            os.makedirs(bin_dir, exist_ok=True)
            tmp = "%s.%d.tmp" % (link, os.getpid())
            os.symlink(exe, tmp)
            os.replace(tmp, link)  # atomic: concurrent runs never see a half-made link
    except OSError as exc:
        eprint("ani-cli-sim: cannot put ffmpeg on PATH: %s" % exc)
        return None
    children = dict(env)
    children["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return children


def run_downloaders(url: str, out_path: str, env: Dict[str, str], log: RunLog,
                    record: Record) -> None:
    """``yt-dlp ... || ffmpeg ...``; the result is ignored, like ani-cli does."""
    flags = downloader_flags(env.get("ANI_CLI_PLAYER_FLAGS"))
    child_env = children_env(env)
    record.outcome = "downloader_failed"
    for cmd in downloader_commands(url, out_path, flags):
        program = find_program(cmd[0])
        if program is None:
            log.emit("exec", cmd=cmd, program=None, child_pid=None)
            eprint("ani-cli-sim: %s: command not found" % cmd[0])
            continue
        # Popen + wait, not subprocess.call: on SIGTERM the shell script dies and
        # leaves its downloader running; subprocess.call would kill it.
        child = subprocess.Popen([program] + cmd[1:], env=child_env)
        log.emit("exec", cmd=cmd, program=program, child_pid=child.pid)
        if wait_foreground(child) == 0:
            record.outcome = "ok"
            break
    if os.path.isfile(out_path):
        record.path = out_path
        record.bytes = os.path.getsize(out_path)


def download(episode: int, behaviour: Dict[str, Any], env: Dict[str, str],
             log: RunLog, record: Record) -> None:
    name = "%s Episode %d.mp4" % (record.title, episode)
    out_path = os.path.join(env.get("ANI_CLI_DOWNLOAD_DIR", "."), name)
    if behaviour.get("spawn_child"):
        spawn_child(log, record)
    if behaviour.get("hang") == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if behaviour.get("hls_url"):
        if behaviour.get("hang"):
            sleep_forever()
        url = str(behaviour["hls_url"]).replace("{episode}", str(episode))
        run_downloaders(url, out_path, env, log, record)
    elif behaviour.get("no_file"):
        fake_failed_download(out_path, behaviour, record)
    else:
        write_download(out_path, with_video(behaviour, env), record)


def append_history(env: Dict[str, str], episode: int, ident: str, title: str) -> None:
    hist_dir = env.get("ANI_CLI_HIST_DIR")
    if not hist_dir:
        return
    line = ("%d\t%s\t%s\n" % (episode, ident, title)).encode("utf-8", "surrogateescape")
    try:
        os.makedirs(hist_dir, exist_ok=True)
        fd = os.open(os.path.join(hist_dir, "ani-hsts"),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError:
        pass


# --------------------------------------------------------------------------- main


def run(opts: Options, env: Dict[str, str], log: RunLog, record: Record) -> int:
    """Everything after flag parsing, in the real script's order; raises Die (or
    Terminated, once the trap is set). Returns the exit code."""
    require_player(env)
    if opts.error:
        raise Die(opts.error)
    if opts.version:
        out(VERSION + "\n")
        record.outcome = "version"
        return 0
    menu = menu_program(opts, env)
    check_dependencies(menu, env, opts.download or env.get("ANI_CLI_PLAYER") == "download")
    set_trap()
    words = opts.query_words
    if not opts.query.strip():
        if menu == "fzf":
            raise Die("missing argument!")  # DEVIATION: the real one reads stdin for ever
        query = run_menu(menu, "Search anime: ", [])
        if not query:
            record.outcome = "no_query"
            return 1  # line 547: exit 1, no message
        words = [query]
    catalog = load_catalog(env)
    results = search_like_ani_cli(catalog, words)
    if not results:
        raise Die("No results found!")
    result = select_result(results, opts.select, menu)
    record.title = str(result.get("title", ""))
    log.base["title"] = record.title
    episode = parse_episode(opts.episode, int(result.get("episodes", 0)), menu)
    tput(env, 2)  # line 570-572: tput cuu1 (&& tput el), tput sc
    record.behaviour = effective_behaviour(catalog, result, episode)
    apply_failures(record.behaviour, record, episode, env)
    check_quality(opts.quality, record.behaviour)
    out("Playing episode %d...\n" % episode)
    download(episode, record.behaviour, env, log, record)
    append_history(env, episode, show_id(result), record.title)
    print_stderr_lines(record)
    return int(record.behaviour.get("exit_code", 0))


def print_stderr_lines(record: Record) -> None:
    for line in record.behaviour.get("stderr_lines", []) or []:
        eprint(str(line))


TRAPPED = (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)
_foreground: List[bool] = [False]  # a downloader runs in the foreground (sh waits for it)
_pending: List[int] = []


def set_trap() -> None:
    """Line 522, ``trap 'cleanup; exit 1' INT HUP TERM``, set after the dependency
    checks (before it a signal kills the script). Like sh, a trapped signal that comes
    while a foreground command runs is acted on once that command has ended: a
    SIGTERM to the script alone leaves its yt-dlp running to the end."""
    for signum in TRAPPED:
        signal.signal(signum, on_signal)


def on_signal(signum: int, _frame: Any) -> None:
    if _foreground[0]:
        _pending.append(signum)
        return
    raise Terminated(signum)


def wait_foreground(child: "subprocess.Popen[bytes]") -> int:
    """``child.wait()`` as sh waits for a foreground command, then the deferred trap."""
    _foreground[0] = True
    try:
        code = child.wait()
    finally:
        _foreground[0] = False
    if _pending:
        raise Terminated(_pending[0])
    return code


def setup_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")  # type: ignore[attr-defined]
        except (AttributeError, ValueError):
            pass


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    env = dict(os.environ)
    setup_streams()
    for signum in TRAPPED:  # until the trap is set, a signal ends the script
        signal.signal(signum, signal.SIG_DFL)
    opts = parse_args(argv)
    log = RunLog(env.get("ANI_CLI_SIM_LOG"), log_base(argv, opts, env))
    record = Record()
    try:
        log.emit("start")
        code = run(opts, env, log, record)
    except Die as exc:
        print_stderr_lines(record)
        sys.stderr.write(die_text(str(exc)))
        sys.stderr.flush()
        record.outcome, record.error, code = "failed", str(exc), 1
    except Terminated:
        record.outcome = "terminated"
        tput(env, 1)  # the trap's cleanup: tput sgr0
        code = 1
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log.emit("end", outcome=record.outcome, exit_code=code, bytes=record.bytes,
             path=record.path, attempt=record.attempt, child_pid=record.child_pid,
             error=record.error)
    return code
