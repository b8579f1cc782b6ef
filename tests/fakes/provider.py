"""A local HLS "anime provider" for tests: real HLS bytes over real HTTP on 127.0.0.1.

ani-cli resolves an episode to an m3u8 URL and hands it to yt-dlp (or ffmpeg).
This server stands in for the provider from that URL on, so everything after
it (yt-dlp, ffmpeg fix-up, verification, remux) runs for real.

Layout (``<episode>`` is a string such as ``1`` or ``12.5``)::

    GET /<slug>/<episode>/index.m3u8     VOD playlist (EXT-X-ENDLIST)
    GET /<slug>/<episode>/seg000.ts ...  MPEG-TS segments, 1 s each by default
    POST /_control                       JSON control API (below)
    GET  /_log?since=N                   access log entries N.. as JSON lines
    GET  /_health                        {"ok": true}

The media for an episode is a synthetic clip (testsrc + 440 Hz sine, 320x240,
H.264/AAC) generated once by ffmpeg and cached under ``cache_dir`` keyed by its
parameters; every episode with the same duration shares it. Generation writes
into a private temp dir then renames it into place, so concurrent tests or
processes asking for the same key are safe (the loser discards its copy).

Behaviours, set per slug (all episodes) or per (slug, episode), last set wins
per field, a per-episode value overriding the per-slug value:

    rate      int bytes/s: every response for the episode is paced to that rate
    segment_rate  {segment_index: bytes/s}: per-segment override of ``rate``
    fail      {segment_index: n}: the first n requests of that segment get HTTP 500
    drop      {segment_index: n}: the first n requests of that segment get the
              headers (full Content-Length) and half the body, then the
              connection is closed
    bogus     "playlist": a ~300-byte playlist whose segments are HTML, not video
              "html": a ~300-byte HTML error page (text/html) at index.m3u8
              "html-as-video": the same HTML page served as video/mp4 (yt-dlp
              2026.10 refuses it: "Response data has no m3u header")
              (cf. ani-cli #1108/#1111/#1116: tiny files that are not videos)
    duration  float seconds of media for the episode (default: provider's)
    missing   bool: 404 for everything of the episode

Every response honours a single ``Range: bytes=a-b`` (206 / 416), as a CDN
does: yt-dlp uses it to resume a fragment after a dropped connection or a
restart, and ffmpeg sends ``Range: bytes=0-`` with every request.

Access log: one dict per request (control/log/health requests excluded),
appended when the response ends, in memory (``log()``, ``wait_for()``) and, if
given, as JSON lines in a file: ``time`` (request start, epoch s), ``method``,
``path``, ``status``, ``bytes`` (body bytes actually sent), ``range`` (request
header or None), ``slug``, ``episode``, ``kind`` ("playlist" | "segment" |
"other"), ``segment`` (index or None), ``behaviour`` (what was injected: "fail",
"drop", "bogus-playlist", "bogus-segment", "bogus-html", ... or None),
``complete`` (False when the body was cut), ``elapsed`` (s), ``seq``.

HTTP control API (``POST /_control`` with a JSON object; ``Provider.control``
is the same in-process): ``{"op": "set", "slug", "episode"|null, <fields>}``,
``{"op": "reset", "slug"?, "episode"?}``, ``{"op": "get", ...}``,
``{"op": "prepare", ...}`` (generate now, returns segment names),
``{"op": "log", "since", "match"}``, ``{"op": "wait", "match", "count",
"since", "timeout"}`` (long poll; 408 on timeout), ``{"op": "info"}``. Replies
are ``{"ok": true, ...}`` or ``{"ok": false, "error": ...}`` with 400.

In-process::

    with Provider(cache_dir=tmp) as p:
        p.set_behaviour("one-piece", "3", fail={1: 2})
        url = p.episode_url("one-piece", "3")
        ...
        p.wait_for(lambda e: e["segment"] == 1 and e["status"] == 200, timeout=10)
        entries = p.log(slug="one-piece", episode="3", kind="segment")

The site itself (what ani-cli v5 scrapes from ``https://anidb.app``; a ``curl`` on its
PATH, tests/fakes/curl-shim/curl, sends those requests here). Shows are added with
``add_show(slug_id, title, episodes, media_slug)``; the responses match the sed
patterns of ani-cli 82574d2 (line numbers of that script)::

    GET /browse?q=<query>               HTML, one <a href=".../anime/<slug-id>"> with
                                        <img alt="<title>"> per show whose words
                                        contain every word of the query (157-165);
                                        the title HTML-escaped as the site does it
                                        (&amp; &quot; &#039;); after
                                        ``challenge_searches()`` Cloudflare's 403
                                        "Just a moment..." page instead (160-163)
    GET /anime/<slug-id>                a page with the MyAnimeList link (168-174)
    GET /api/frontend/anime/<id>/episodes      [{"id":E,"number":N},...] (177-181);
                                        ``release(slug_id, n)`` lists n from then on
    GET /api/frontend/episode/<E>/languages    [{"code":"jpn",...,"embed_url":
                                        "https:\\/\\/anidb.app\\/embed\\/<E>"}] (184-195);
                                        [] for an episode added with no source
    GET /embed/<E>                      a page with file: '<master.m3u8 URL>'
    GET /master/<media slug>/<ep>/master.m3u8  #EXT-X-STREAM-INF ... RESOLUTION=WxH
                                        lines, each followed by the absolute URL of
                                        the media playlist above (yt-dlp fetches it)

As a process (stdlib + an ffmpeg: PATH or imageio-ffmpeg)::

    python -m tests.fakes.provider --cache-dir DIR --port-file FILE [--access-log FILE]

writes ``{"base_url": ..., "port": ..., "pid": ...}`` to FILE (atomically) once
it is listening, and stops on SIGTERM/SIGINT. Use ``wait_for_port_file`` and
``ProviderClient`` from another process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable

from services.worker.video import find_ffmpeg  # the worker's own search: PATH, then imageio-ffmpeg

DEFAULT_DURATION = 4.0
SEGMENT_SECONDS = 1
SIZE = "320x240"
FPS = 25
MEDIA_VERSION = 1  # bump when the generation command changes, to invalidate caches
PLAYLIST_NAME = "index.m3u8"
SEGMENT_RE = re.compile(r"^seg(\d{3,})\.ts$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # slug / episode; no "..", no "/"
BOGUS_KINDS = ("playlist", "html", "html-as-video")

HTML_ERROR_PAGE = (
    b"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>404 Not Found</title></head>\n"
    b"<body><h1>404 Not Found</h1><p>The requested episode is not available on this server.</p>\n"
    b"<p>Please try again later or choose another source.</p><hr><address>nginx</address>\n"
    b"</body></html>\n"
)


# What Cloudflare sends a client it challenges (abridged): ani-cli looks for "Just a moment".
CLOUDFLARE_CHALLENGE = (
    b"<!DOCTYPE html><html lang=\"en-US\"><head><title>Just a moment...</title>\n"
    b"<meta http-equiv=\"refresh\" content=\"390\"></head><body><div class=\"main-wrapper\">\n"
    b"<h1>anidb.app</h1><p>Verifying you are human. This may take a few seconds.</p>\n"
    b"</div></body></html>\n"
)


class ProviderError(Exception):
    pass


# --------------------------------------------------------------------------- media


def _fmt_duration(duration: float) -> str:
    return f"{duration:.3f}".rstrip("0").rstrip(".")


def media_key(duration: float) -> str:
    return f"v{MEDIA_VERSION}-d{_fmt_duration(duration)}-s{SIZE}-r{FPS}-h{SEGMENT_SECONDS}"


_gen_locks: dict[str, threading.Lock] = {}
_gen_locks_guard = threading.Lock()


def ensure_media(cache_dir: Path, duration: float = DEFAULT_DURATION, ffmpeg: str | None = None,
                 timeout: float = 120) -> Path:
    """Return the directory holding index.m3u8 + seg*.ts for ``duration``, generating it if needed.

    Safe against concurrent callers in this process (a lock per key) and in
    other processes (generate into a temp dir in ``cache_dir``, then rename; if
    the rename loses the race the other copy is used).
    """
    if not duration > 0:
        raise ProviderError(f"duration must be positive, not {duration!r}")
    cache_dir = Path(cache_dir)
    key = media_key(duration)
    final = cache_dir / key
    if (final / PLAYLIST_NAME).is_file():
        return final
    with _gen_locks_guard:
        lock = _gen_locks.setdefault(str(final), threading.Lock())
    with lock:
        if (final / PLAYLIST_NAME).is_file():
            return final
        ffmpeg = ffmpeg or find_ffmpeg()
        if ffmpeg is None:
            raise ProviderError("no ffmpeg found (PATH or imageio-ffmpeg) to generate the test media")
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_dir))
        try:
            d = _fmt_duration(duration)
            cmd = [
                ffmpeg, "-nostdin", "-hide_banner", "-v", "error",
                "-f", "lavfi", "-i", f"testsrc=size={SIZE}:rate={FPS}:duration={d}",
                "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={d}",
                "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
                # a keyframe every segment so segments cut exactly at hls_time
                "-g", str(FPS * SEGMENT_SECONDS), "-keyint_min", str(FPS * SEGMENT_SECONDS),
                "-sc_threshold", "0",
                "-c:a", "aac", "-b:a", "64k",
                "-f", "hls", "-hls_time", str(SEGMENT_SECONDS), "-hls_playlist_type", "vod",
                "-hls_segment_filename", str(tmp / "seg%03d.ts"),
                str(tmp / PLAYLIST_NAME),
            ]
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
            if proc.returncode != 0 or not (tmp / PLAYLIST_NAME).is_file():
                raise ProviderError(
                    f"ffmpeg failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}")
            (tmp / "params.json").write_text(json.dumps({"duration": duration, "size": SIZE, "fps": FPS,
                                                         "segment_seconds": SEGMENT_SECONDS}))
            try:
                os.rename(tmp, final)
            except OSError:
                # Another process renamed its copy first (ENOTEMPTY/EEXIST): use theirs.
                if not (final / PLAYLIST_NAME).is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final


@dataclass(frozen=True)
class Media:
    directory: Path
    playlist: bytes
    segments: tuple[str, ...]  # file names in playlist order


def load_media(directory: Path) -> Media:
    playlist = (directory / PLAYLIST_NAME).read_bytes()
    segs = tuple(line.strip() for line in playlist.decode().splitlines()
                 if line.strip() and not line.startswith("#"))
    return Media(directory, playlist, segs)


def bogus_playlist() -> bytes:
    """~300 bytes: a valid-looking VOD playlist whose three segments are HTML pages."""
    return (
        b"#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:10\n#EXT-X-MEDIA-SEQUENCE:0\n"
        b"#EXT-X-PLAYLIST-TYPE:VOD\n#EXT-X-INDEPENDENT-SEGMENTS\n"
        b"#EXT-X-PROGRAM-DATE-TIME:2024-01-01T00:00:00.000Z\n"
        b"#EXTINF:10.000000,\nbogus000.ts\n#EXTINF:10.000000,\nbogus001.ts\n"
        b"#EXTINF:10.000000,\nbogus002.ts\n"
        b"#EXT-X-ENDLIST\n"
    )


# --------------------------------------------------------------------------- behaviour


@dataclass
class Behaviour:
    rate: int | None = None                            # bytes/s per response
    segment_rate: dict[int, int] = field(default_factory=dict)  # segment index -> bytes/s
    fail: dict[int, int] = field(default_factory=dict)  # segment index -> HTTP 500 count
    drop: dict[int, int] = field(default_factory=dict)  # segment index -> half-body drop count
    bogus: str | None = None
    duration: float | None = None
    missing: bool = False

    FIELDS = ("rate", "segment_rate", "fail", "drop", "bogus", "duration", "missing")

    def to_json(self) -> dict[str, Any]:
        return {"rate": self.rate, "segment_rate": {str(k): v for k, v in self.segment_rate.items()},
                "fail": {str(k): v for k, v in self.fail.items()},
                "drop": {str(k): v for k, v in self.drop.items()}, "bogus": self.bogus,
                "duration": self.duration, "missing": self.missing}


def _validate_fields(fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if name not in Behaviour.FIELDS:
            raise ProviderError(f"unknown behaviour {name!r} (known: {', '.join(Behaviour.FIELDS)})")
        if name == "rate":
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                raise ProviderError("rate must be a positive number of bytes/s or null")
            value = None if value is None else int(value)
        elif name in ("fail", "drop", "segment_rate"):
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ProviderError(f"{name} must be a mapping segment_index -> count")
            value = {int(k): int(v) for k, v in value.items()}
            if any(k < 0 or v < 0 for k, v in value.items()):
                raise ProviderError(f"{name}: indexes and counts must be >= 0")
            if name == "segment_rate" and any(v == 0 for v in value.values()):
                raise ProviderError("segment_rate: rates must be positive")
        elif name == "bogus":
            if value is not None and value not in BOGUS_KINDS:
                raise ProviderError(f"bogus must be one of {BOGUS_KINDS} or null")
        elif name == "duration":
            if value is not None and (not isinstance(value, (int, float)) or value <= 0):
                raise ProviderError("duration must be a positive number of seconds or null")
            value = None if value is None else float(value)
        elif name == "missing":
            value = bool(value)
        out[name] = value
    return out


# --------------------------------------------------------------------------- server


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"  # keep-alive, like a CDN; Content-Length on every response
    server_version = "FakeProvider/1.0"
    timeout = 30  # idle keep-alive connections are dropped after this (socket timeout)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # the provider keeps its own structured access log

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self.server.provider._handle(self, "GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self.server.provider._handle(self, "HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self.server.provider._handle(self, "POST")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64
    provider: "Provider"


class _Dropped(Exception):
    pass


class Provider:
    """The fake provider. ``start()`` binds 127.0.0.1:<port> (0 = any free port)."""

    def __init__(self, cache_dir: Path | str, *, host: str = "127.0.0.1", port: int = 0,
                 access_log: Path | str | None = None, default_duration: float = DEFAULT_DURATION,
                 ffmpeg: str | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        self.host = host
        self.port = port
        self.access_log_path = Path(access_log) if access_log else None
        self.default_duration = float(default_duration)
        self.ffmpeg = ffmpeg
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._log: list[dict[str, Any]] = []
        self._log_file = None
        self._behaviours: dict[tuple[str, str | None], dict[str, Any]] = {}
        self._counters: dict[tuple[str, str, str, int], int] = {}  # (what, slug, ep, seg) -> requests seen
        self._media: dict[float, Media] = {}
        self._shows: list[Show] = []
        self._challenge = False  # searches get Cloudflare's "Just a moment..." page

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> "Provider":
        if self._server is not None:
            return self
        if self.access_log_path is not None:
            self.access_log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.access_log_path, "a", encoding="utf-8")  # noqa: SIM115
        self._stopping.clear()
        self._server = _Server((self.host, self.port), _Handler)
        self._server.provider = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"provider:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # paced responses notice it and abort
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            self._cond.notify_all()

    def __enter__(self) -> "Provider":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise ProviderError("provider not started")
        return f"http://{self.host}:{self.port}"

    def episode_url(self, slug: str, episode: str | int | float) -> str:
        return episode_url(self.base_url, slug, episode)

    # ---------------------------------------------------------------- control

    def set_behaviour(self, slug: str, episode: str | int | float | None = None, **fields: Any) -> None:
        """Merge ``fields`` into the behaviour of ``slug`` (all episodes) or (slug, episode).

        Setting ``fail``/``drop`` restarts the request counters of the segments
        named, so "fail segment 1 twice" means the next two requests of segment 1.
        """
        fields = _validate_fields(fields)
        if not NAME_RE.match(slug):
            raise ProviderError(f"bad slug {slug!r}")
        ep = None if episode is None else _episode_str(episode)
        with self._lock:
            current = self._behaviours.setdefault((slug, ep), {})
            current.update(fields)
            for what in ("fail", "drop"):
                if what in fields:
                    for key in [k for k in self._counters if k[0] == what and k[1] == slug
                                and (ep is None or k[2] == ep) and k[3] in fields[what]]:
                        del self._counters[key]

    # Convenience wrappers (each merges one field).
    def slow(self, slug: str, episode: Any = None, bytes_per_second: int | None = None) -> None:
        self.set_behaviour(slug, episode, rate=bytes_per_second)

    def fail_segment(self, slug: str, episode: Any, index: int, times: int) -> None:
        with self._lock:
            fail = dict(self._behaviours.get((slug, _opt_ep(episode)), {}).get("fail", {}))
        fail[int(index)] = int(times)
        self.set_behaviour(slug, episode, fail=fail)

    def drop_segment(self, slug: str, episode: Any, index: int, times: int = 1) -> None:
        with self._lock:
            drop = dict(self._behaviours.get((slug, _opt_ep(episode)), {}).get("drop", {}))
        drop[int(index)] = int(times)
        self.set_behaviour(slug, episode, drop=drop)

    def serve_bogus(self, slug: str, episode: Any = None, kind: str | None = "playlist") -> None:
        self.set_behaviour(slug, episode, bogus=kind)

    def set_duration(self, slug: str, episode: Any = None, seconds: float | None = None) -> None:
        self.set_behaviour(slug, episode, duration=seconds)

    def reset(self, slug: str | None = None, episode: Any = None) -> None:
        """Forget behaviours (and failure counters): all, one slug, or one episode."""
        ep = _opt_ep(episode)
        with self._lock:
            for key in list(self._behaviours):
                if slug is None or (key[0] == slug and (ep is None or key[1] == ep)):
                    del self._behaviours[key]
            for key in list(self._counters):
                if slug is None or (key[1] == slug and (ep is None or key[2] == ep)):
                    del self._counters[key]

    def behaviour(self, slug: str, episode: Any) -> Behaviour:
        """The effective behaviour of an episode (per-slug merged with per-episode)."""
        ep = _episode_str(episode)
        with self._lock:
            merged = {**self._behaviours.get((slug, None), {}), **self._behaviours.get((slug, ep), {})}
        return Behaviour(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in merged.items()})

    def prepare(self, slug: str, episode: Any) -> Media:
        """Generate (or load from cache) the media the episode will serve; returns it."""
        b = self.behaviour(slug, episode)
        return self._media_for(b.duration or self.default_duration)

    def segment_count(self, slug: str, episode: Any) -> int:
        return len(self.prepare(slug, episode).segments)

    # ---------------------------------------------------------------- access log

    def log(self, *, since: int = 0, **match: Any) -> list[dict[str, Any]]:
        """Access log entries (copies) from index ``since`` whose fields equal ``match``."""
        with self._lock:
            entries = self._log[since:]
        return [dict(e) for e in entries if _matches(e, match)]

    @property
    def access_log(self) -> list[dict[str, Any]]:
        return self.log()

    def log_length(self) -> int:
        with self._lock:
            return len(self._log)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool] | None = None, *,
                 timeout: float = 10.0, count: int = 1, since: int = 0, **match: Any) -> list[dict[str, Any]]:
        """Block until the log has ``count`` entries matching ``match`` (and ``predicate`` per entry).

        Returns the matching entries. Raises TimeoutError after ``timeout``
        seconds. Condition-variable based: no polling.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [dict(e) for e in self._log[since:]
                        if _matches(e, match) and (predicate is None or predicate(e))]
                if len(hits) >= count:
                    return hits
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"waited {timeout}s for {count} log entries matching {match}; "
                                       f"got {len(hits)}")
                self._cond.wait(remaining)

    def _record(self, entry: dict[str, Any]) -> None:
        with self._cond:
            entry["seq"] = len(self._log)
            self._log.append(entry)
            if self._log_file is not None:
                self._log_file.write(json.dumps(entry) + "\n")
                self._log_file.flush()
            self._cond.notify_all()

    # ---------------------------------------------------------------- serving

    def _media_for(self, duration: float) -> Media:
        media = self._media.get(duration)
        if media is None:
            media = load_media(ensure_media(self.cache_dir, duration, ffmpeg=self.ffmpeg))
            self._media[duration] = media
        return media

    def _take(self, what: str, slug: str, ep: str, seg: int, limit: int) -> bool:
        """Count a request of the segment; True while within the first ``limit`` requests."""
        if limit <= 0:
            return False
        with self._lock:
            key = (what, slug, ep, seg)
            n = self._counters.get(key, 0)
            self._counters[key] = n + 1
            return n < limit

    def _handle(self, req: _Handler, method: str) -> None:
        started = time.time()
        parsed = urllib.parse.urlsplit(req.path)
        path = parsed.path
        entry: dict[str, Any] = {"time": started, "method": method, "path": path, "status": None,
                                 "bytes": 0, "range": None, "slug": None, "episode": None, "kind": "other",
                                 "segment": None, "behaviour": None, "complete": True}
        if path == "/_control" or path == "/_log" or path == "/_health":
            try:
                self._handle_internal(req, method, path, parsed.query)
            except (ConnectionError, socket.timeout):
                pass
            return
        try:
            if method == "POST":
                req.close_connection = True  # its body is not read: do not reuse the connection
            site = self._site_route(method, path, parsed.query, entry)
            status, ctype, body, tag, drop = site or self._route(method, path, entry)
            entry["behaviour"] = tag
            entry["status"] = status
            rate = entry.pop("_rate", None)
            status, body, extra_headers = _apply_range(req.headers.get("Range"), status, body, entry)
            entry["status"] = status
            sent = self._send(req, status, ctype, body, method=method, rate=rate, drop=drop,
                              extra_headers=extra_headers)
            entry["bytes"] = sent
            entry["complete"] = not drop and sent == (len(body) if method != "HEAD" else 0)
        except (_Dropped, ConnectionError, socket.timeout, OSError) as exc:
            entry["complete"] = False
            entry["error"] = type(exc).__name__
            entry["bytes"] = getattr(exc, "sent", entry["bytes"])
            req.close_connection = True
        finally:
            entry.pop("_rate", None)
            entry["elapsed"] = round(time.time() - started, 4)
            self._record(entry)

    # ---------------------------------------------------------------- the site (anidb.app)

    def add_show(self, slug_id: str, title: str, episodes: int, media_slug: str,
                 mal_id: int = 0, no_source: Iterable[int] = ()) -> "Show":
        """A show of the site: ``slug_id`` as in its URLs (``fate-zero-101``: the part after
        the last ``-`` is its id), its media served from ``/<media_slug>/<ep>/``."""
        if not _SHOW_RE.match(slug_id):
            raise ProviderError(f"slug-id {slug_id!r} does not match ani-cli's [a-z0-9-]+-[0-9]+")
        show = Show(slug_id, title, episodes, media_slug, mal_id, frozenset(no_source))
        with self._lock:
            self._shows.append(show)
        return show

    def release(self, slug_id: str, episodes: int) -> None:
        """The site lists ``episodes`` episodes of the show from now on (an airing show)."""
        with self._lock:
            self._shows = [replace(s, episodes=episodes) if s.slug_id == slug_id else s
                           for s in self._shows]

    def challenge_searches(self, on: bool = True) -> None:
        """Answer searches with Cloudflare's challenge page (HTTP 403, "Just a moment..."),
        as anidb.app does to a client Cloudflare blocks."""
        with self._lock:
            self._challenge = on

    def _site_route(self, method: str, path: str, query: str,
                    entry: dict[str, Any]) -> tuple[int, str, bytes, str | None, bool] | None:
        if method != "GET":
            return None
        parts = path.strip("/").split("/")
        with self._lock:
            shows = list(self._shows)
        html_type = "text/html; charset=utf-8"
        if path == "/browse":
            entry["kind"] = "search"
            wanted = _words((urllib.parse.parse_qs(query).get("q") or [""])[0])
            entry["query"] = " ".join(wanted)
            if self._challenge:
                return 403, html_type, CLOUDFLARE_CHALLENGE, "challenge", False
            hits = [s for s in shows if wanted and set(wanted) <= set(_words(s.title))]
            return 200, html_type, _search_page(hits), None, False
        if len(parts) == 2 and parts[0] == "anime":
            show = next((s for s in shows if s.slug_id == parts[1]), None)
            if show is None:
                return 404, html_type, HTML_ERROR_PAGE, None, False
            page = (f"<html><body><h1>{_escape(show.title)}</h1>\n<a href=\"https://myanimelist.net/"
                    f"anime/{show.mal_id}/x\">MyAnimeList</a>\n</body></html>\n")
            return 200, html_type, page.encode(), None, False
        if len(parts) == 5 and parts[:3] == ["api", "frontend", "anime"] and parts[4] == "episodes":
            show = next((s for s in shows if str(s.show_id) == parts[3]), None)
            if show is None:
                return 404, "application/json", b"[]", None, False
            body = json.dumps([{"id": show.episode_id(n), "number": n}
                               for n in range(1, show.episodes + 1)], separators=(",", ":"))
            return 200, "application/json", body.encode(), None, False
        if len(parts) == 5 and parts[:3] == ["api", "frontend", "episode"] and parts[4] == "languages":
            found = self._episode(shows, parts[3])
            if found is None or found[1] in found[0].no_source:
                return 200, "application/json", b"[]", None, False
            embed = f"https://anidb.app/embed/{parts[3]}".replace("/", "\\/")
            body = f'[{{"code":"jpn","name":"Japanese","embed_url":"{embed}"}}]'
            return 200, "application/json", body.encode(), None, False
        if len(parts) == 2 and parts[0] == "embed":
            found = self._episode(shows, parts[1])
            if found is None:
                return 404, html_type, HTML_ERROR_PAGE, None, False
            show, n = found
            master = f"{self.base_url}/master/{show.media_slug}/{n}/master.m3u8"
            page = f"<html><script>\nplayer.setup({{\n  file: '{master}',\n}});\n</script></html>\n"
            return 200, html_type, page.encode(), None, False
        if len(parts) == 4 and parts[0] == "master" and parts[3] == "master.m3u8":
            entry.update(slug=parts[1], episode=parts[2], kind="master")
            media = f"{self.base_url}/{parts[1]}/{parts[2]}/{PLAYLIST_NAME}"
            body = ("#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1400000,RESOLUTION=1280x720\n"
                    f"{media}\n#EXT-X-STREAM-INF:BANDWIDTH=800000,RESOLUTION=640x360\n{media}?q=360\n")
            return 200, "application/vnd.apple.mpegurl", body.encode(), None, False
        return None

    @staticmethod
    def _episode(shows: list["Show"], episode_id: str) -> tuple["Show", int] | None:
        for show in shows:
            for n in range(1, show.episodes + 1):
                if str(show.episode_id(n)) == episode_id:
                    return show, n
        return None

    def _route(self, method: str, path: str, entry: dict[str, Any]) -> tuple[int, str, bytes, str | None, bool]:
        if method == "POST":
            return 405, "text/plain", b"method not allowed\n", None, False
        parts = path.strip("/").split("/")
        if len(parts) != 3 or not NAME_RE.match(parts[0]) or not NAME_RE.match(parts[1]):
            return 404, "text/plain", b"not found\n", None, False
        slug, ep, name = parts
        entry.update(slug=slug, episode=ep)
        b = self.behaviour(slug, ep)
        entry["_rate"] = b.rate
        if name == PLAYLIST_NAME:
            entry["kind"] = "playlist"
        elif SEGMENT_RE.match(name) or name.startswith("bogus"):
            entry["kind"] = "segment"
            m = re.search(r"(\d+)", name)
            entry["segment"] = int(m.group(1)) if m else None
        if b.missing:
            return 404, "text/html", HTML_ERROR_PAGE, "missing", False
        if b.bogus == "html" and name == PLAYLIST_NAME:
            return 200, "text/html; charset=utf-8", HTML_ERROR_PAGE, "bogus-html", False
        if b.bogus == "html-as-video" and name == PLAYLIST_NAME:
            return 200, "video/mp4", HTML_ERROR_PAGE, "bogus-html-as-video", False
        if b.bogus == "playlist":
            if name == PLAYLIST_NAME:
                return 200, "application/vnd.apple.mpegurl", bogus_playlist(), "bogus-playlist", False
            if name in ("bogus000.ts", "bogus001.ts", "bogus002.ts"):
                return 200, "video/mp2t", HTML_ERROR_PAGE, "bogus-segment", False
            return 404, "text/plain", b"not found\n", None, False
        try:
            media = self._media_for(b.duration or self.default_duration)
        except ProviderError as exc:
            return 500, "text/plain", f"media generation failed: {exc}\n".encode(), "generation-error", False
        if name == PLAYLIST_NAME:
            return 200, "application/vnd.apple.mpegurl", media.playlist, None, False
        if name not in media.segments:
            return 404, "text/plain", b"not found\n", None, False
        seg = entry["segment"]
        if self._take("fail", slug, ep, seg, b.fail.get(seg, 0)):
            return 500, "text/plain", b"internal server error (injected)\n", "fail", False
        body = (media.directory / name).read_bytes()
        if seg in b.segment_rate:
            entry["_rate"] = b.segment_rate[seg]
        if self._take("drop", slug, ep, seg, b.drop.get(seg, 0)):
            return 200, "video/mp2t", body, "drop", True
        return 200, "video/mp2t", body, None, False

    def _send(self, req: _Handler, status: int, ctype: str, body: bytes, *, method: str,
              rate: int | None, drop: bool, extra_headers: dict[str, str] | None = None) -> int:
        req.send_response(status)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        req.send_header("Accept-Ranges", "bytes")
        for k, v in (extra_headers or {}).items():
            req.send_header(k, v)
        if drop:
            req.send_header("Connection", "close")
        req.end_headers()
        if method == "HEAD":
            return 0
        payload = body[: len(body) // 2] if drop else body
        sent = self._write_paced(req, payload, rate)
        if drop:
            req.wfile.flush()
            req.close_connection = True
            with contextlib.suppress(OSError):
                req.connection.shutdown(socket.SHUT_RDWR)
            err = _Dropped("dropped halfway")
            err.sent = sent  # type: ignore[attr-defined]
            raise err
        return sent

    def _write_paced(self, req: _Handler, payload: bytes, rate: int | None) -> int:
        if not rate:
            req.wfile.write(payload)
            return len(payload)
        # Token-bucket pacing: never ahead of rate * elapsed, in chunks of ~1/20 s.
        chunk = max(256, min(64 * 1024, rate // 20))
        start = time.monotonic()
        sent = 0
        while sent < len(payload):
            if self._stopping.is_set():
                err = _Dropped("provider stopping")
                err.sent = sent  # type: ignore[attr-defined]
                raise err
            ahead = (sent + chunk) / rate - (time.monotonic() - start)
            if ahead > 0:
                self._stopping.wait(ahead)  # pacing, not synchronisation
                continue
            piece = payload[sent:sent + chunk]
            try:
                req.wfile.write(piece)
                req.wfile.flush()
            except OSError as exc:
                exc.sent = sent  # type: ignore[attr-defined]
                raise
            sent += len(piece)
        return sent

    # ---------------------------------------------------------------- internal endpoints

    def _handle_internal(self, req: _Handler, method: str, path: str, query: str) -> None:
        if path == "/_health":
            self._reply_json(req, 200, {"ok": True})
            return
        if path == "/_log" and method == "GET":
            q = urllib.parse.parse_qs(query)
            since = int(q.get("since", ["0"])[0])
            body = "".join(json.dumps(e) + "\n" for e in self.log(since=since)).encode()
            req.send_response(200)
            req.send_header("Content-Type", "application/x-ndjson")
            req.send_header("Content-Length", str(len(body)))
            req.end_headers()
            req.wfile.write(body)
            return
        if path == "/_control" and method == "POST":
            length = int(req.headers.get("Content-Length") or 0)
            raw = req.rfile.read(length) if length else b"{}"
            try:
                cmd = json.loads(raw or b"{}")
                if not isinstance(cmd, dict):
                    raise ProviderError("body must be a JSON object")
                result = self.control(cmd)
            except (ProviderError, ValueError, TypeError) as exc:
                self._reply_json(req, 400, {"ok": False, "error": str(exc)})
                return
            except TimeoutError as exc:
                self._reply_json(req, 408, {"ok": False, "error": str(exc)})
                return
            self._reply_json(req, 200, {"ok": True, **result})
            return
        self._reply_json(req, 405, {"ok": False, "error": f"{method} {path} not supported"})

    def control(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """The HTTP control API, callable in-process too. ``cmd["op"]`` is one of:

        - ``set``: {"op": "set", "slug": S, "episode": E|null, <behaviour fields>} (merge)
        - ``reset``: {"op": "reset", "slug": S|null, "episode": E|null}
        - ``get``: {"op": "get", "slug": S, "episode": E} -> {"behaviour": {...}}
        - ``prepare``: {"op": "prepare", "slug": S, "episode": E} -> {"segments": [...]}
        - ``log``: {"op": "log", "since": N, "match": {...}} -> {"entries": [...], "next": M}
        - ``wait``: {"op": "wait", "match": {...}, "count": N, "since": M, "timeout": s}
          long-polls -> {"entries": [...]}; HTTP 408 on timeout
        - ``info``: -> {"base_url", "cache_dir", "default_duration"}
        """
        op = cmd.get("op")
        if op == "set":
            fields = {k: v for k, v in cmd.items() if k not in ("op", "slug", "episode")}
            self.set_behaviour(_req_str(cmd, "slug"), cmd.get("episode"), **fields)
            return {}
        if op == "reset":
            self.reset(cmd.get("slug"), cmd.get("episode"))
            return {}
        if op == "get":
            return {"behaviour": self.behaviour(_req_str(cmd, "slug"), cmd.get("episode")).to_json()}
        if op == "prepare":
            media = self.prepare(_req_str(cmd, "slug"), cmd.get("episode"))
            return {"segments": list(media.segments)}
        if op == "log":
            since = int(cmd.get("since", 0))
            with self._lock:
                nxt = len(self._log)
            return {"entries": self.log(since=since, **(cmd.get("match") or {})), "next": nxt}
        if op == "wait":
            timeout = min(float(cmd.get("timeout", 10)), 300.0)
            entries = self.wait_for(timeout=timeout, count=int(cmd.get("count", 1)),
                                    since=int(cmd.get("since", 0)), **(cmd.get("match") or {}))
            return {"entries": entries}
        if op == "info":
            return {"base_url": self.base_url, "cache_dir": str(self.cache_dir),
                    "default_duration": self.default_duration}
        raise ProviderError(f"unknown op {op!r}")

    @staticmethod
    def _reply_json(req: _Handler, status: int, obj: dict[str, Any]) -> None:
        body = json.dumps(obj).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        req.wfile.write(body)


# --------------------------------------------------------------------------- helpers


_SHOW_RE = re.compile(r"^[a-z0-9-]+-[0-9]+$")


@dataclass(frozen=True)
class Show:
    """A show on the site (see ``Provider.add_show``)."""
    slug_id: str
    title: str
    episodes: int
    media_slug: str
    mal_id: int = 0
    no_source: frozenset = frozenset()

    @property
    def show_id(self) -> int:
        return int(self.slug_id.rsplit("-", 1)[1])

    def episode_id(self, number: int) -> int:
        return self.show_id * 1000 + number


def _words(text: str) -> list[str]:
    """How the site's search reads text: words of letters and digits, case ignored."""
    return "".join(c if c.isalnum() else " " for c in text.casefold()).split()


def _escape(text: str) -> str:
    """HTML-escaped as the site sends titles (ani-cli turns back only &#039; and &quot;)."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#039;"))


def _search_page(shows: list[Show]) -> bytes:
    items = "".join(f'<div class="item">\n<a href="https://anidb.app/anime/{s.slug_id}" '
                    f'title="{_escape(s.title)}">\n<img src="/img/{s.show_id}.jpg" '
                    f'alt="{_escape(s.title)}">\n</a>\n</div>\n' for s in shows)
    return f"<html><head><title>Browse</title></head><body>\n{items}</body></html>\n".encode()


_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _apply_range(header: str | None, status: int, body: bytes,
                 entry: dict[str, Any]) -> tuple[int, bytes, dict[str, str]]:
    """Honour a single-range ``Range: bytes=a-b`` on a 200 response (206/416), like a CDN."""
    entry["range"] = header
    if not header or status != 200:
        return status, body, {}
    m = _RANGE_RE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return status, body, {}  # unsupported form (e.g. multi-range): full body, as servers may
    total = len(body)
    if m.group(1):
        start = int(m.group(1))
        end = min(int(m.group(2)), total - 1) if m.group(2) else total - 1
    else:  # suffix range: last N bytes
        start, end = max(0, total - int(m.group(2))), total - 1
    if start >= total or start > end:
        return 416, b"", {"Content-Range": f"bytes */{total}"}
    return 206, body[start:end + 1], {"Content-Range": f"bytes {start}-{end}/{total}"}


def _episode_str(episode: Any) -> str:
    if isinstance(episode, float) and episode.is_integer():
        episode = int(episode)
    s = str(episode)
    if not NAME_RE.match(s):
        raise ProviderError(f"bad episode {episode!r}")
    return s


def _opt_ep(episode: Any) -> str | None:
    return None if episode is None else _episode_str(episode)


def _req_str(cmd: dict[str, Any], key: str) -> str:
    value = cmd.get(key)
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ProviderError(f"{key!r} must be a slug string")
    return value


def _matches(entry: dict[str, Any], match: dict[str, Any]) -> bool:
    for key, want in match.items():
        have = entry.get(key)
        if key == "episode" and want is not None:
            want = _episode_str(want)
        if have != want:
            return False
    return True


def episode_url(base_url: str, slug: str, episode: Any) -> str:
    return f"{base_url.rstrip('/')}/{slug}/{_episode_str(episode)}/{PLAYLIST_NAME}"


def read_log_file(path: Path | str) -> list[dict[str, Any]]:
    """Entries of an access-log file (JSON lines); a partial last line is ignored."""
    out = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


def wait_for_port_file(path: Path | str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> dict:
    """Wait (bounded) for a provider process's port file; returns its JSON.

    Polls the file (there is nothing to block on across processes without
    extra machinery); raises if ``proc`` exits first or on timeout.
    """
    path = Path(path)
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            pass
        if proc is not None and proc.poll() is not None:
            raise ProviderError(f"provider process exited with {proc.returncode} before writing {path}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no port file {path} after {timeout}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


class ProviderClient:
    """Client of the HTTP control API, for a provider running in another process."""

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def control(self, op: str, **args: Any) -> dict[str, Any]:
        body = json.dumps({"op": op, **args}).encode()
        timeout = self.timeout + float(args.get("timeout", 0) or 0)
        req = urllib.request.Request(f"{self.base_url}/_control", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - 127.0.0.1 only
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            payload = json.loads(exc.read() or b"{}")
            if exc.code == 408:
                raise TimeoutError(payload.get("error", "timeout")) from None
            raise ProviderError(payload.get("error", str(exc))) from None

    def set_behaviour(self, slug: str, episode: Any = None, **fields: Any) -> None:
        if "fail" in fields and fields["fail"]:
            fields["fail"] = {str(k): v for k, v in fields["fail"].items()}
        if "drop" in fields and fields["drop"]:
            fields["drop"] = {str(k): v for k, v in fields["drop"].items()}
        self.control("set", slug=slug, episode=None if episode is None else _episode_str(episode), **fields)

    def reset(self, slug: str | None = None, episode: Any = None) -> None:
        self.control("reset", slug=slug, episode=None if episode is None else _episode_str(episode))

    def prepare(self, slug: str, episode: Any) -> list[str]:
        return self.control("prepare", slug=slug, episode=_episode_str(episode))["segments"]

    def log(self, since: int = 0, **match: Any) -> list[dict[str, Any]]:
        return self.control("log", since=since, match=match)["entries"]

    def wait_for(self, *, timeout: float = 10.0, count: int = 1, since: int = 0, **match: Any) -> list[dict]:
        return self.control("wait", timeout=timeout, count=count, since=since, match=match)["entries"]

    def episode_url(self, slug: str, episode: Any) -> str:
        return episode_url(self.base_url, slug, episode)


# --------------------------------------------------------------------------- process entry point


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fakes.provider", description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", required=True, type=Path, help="where generated HLS media is cached")
    ap.add_argument("--port-file", required=True, type=Path,
                    help="written atomically with {base_url, port, pid} once listening")
    ap.add_argument("--access-log", type=Path, help="append the access log here as JSON lines")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 (default): any free port")
    ap.add_argument("--duration", type=float, default=DEFAULT_DURATION, help="default seconds per episode")
    ap.add_argument("--prepare", action="store_true", help="generate the default media before listening")
    args = ap.parse_args(list(argv) if argv is not None else None)

    provider = Provider(args.cache_dir, host=args.host, port=args.port, access_log=args.access_log,
                        default_duration=args.duration)
    if args.prepare:
        ensure_media(args.cache_dir, args.duration)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    provider.start()
    info = {"base_url": provider.base_url, "port": provider.port, "pid": os.getpid()}
    args.port_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.port_file.with_name(f".{args.port_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(info) + "\n", encoding="utf-8")
    os.replace(tmp, args.port_file)
    try:
        stop.wait()
    finally:
        provider.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
