"""Whether a downloaded file is a whole, playable video: ``verify_video``.

The tools are found and run as services/worker/media_tools.py says (argument lists,
own process group, time-out, ``Stopper``); inputs are restricted to the ``file``
protocol so a playlist cannot make ffmpeg fetch URLs.

How ``verify_video`` decides (first failing check wins; ``str(NotAVideo)`` says which):

1. The file exists, is regular and not empty.
2. Its first 4 KiB are not text: an HLS playlist (``#EXTM3U``, ani-cli #1108:
   the m3u8 saved as the .mp4), an HTML/XML page (an error page saved as the
   video, or yt-dlp concatenating HTML "segments", ani-cli #1116) or other text
   are rejected before any tool runs.
3. Cheap structural checks that need no tool (containers.py; also the whole verdict
   when neither ffmpeg nor ffprobe exists):
   - MP4/MOV: walk the top-level boxes; a box running past the end of the
     file means a truncated download; no ``moov`` box means an unfinished one
     (ffmpeg writes moov last unless +faststart).
   - Matroska: the EBML magic; a Segment with a known size larger than the file
     means truncated.
   - MPEG-TS (sync byte 0x47 every 188 bytes): a size that is not a multiple
     of 188 means the last packet is cut, i.e. a truncated download. HLS
     segments are whole packets, so a complete yt-dlp/ffmpeg concatenation
     always is a multiple of 188.
   Without tools the result is ``VideoInfo(None, <container>, True, False)``:
   duration None tells the caller nothing was decoded and streams are unknown.
4. ffprobe, if installed: ``-show_entries format=duration,format_name:stream=codec_type``
   gives container, declared duration and stream types (JSON, no banner parsing).
5. ffmpeg, if available: one full pass ``-i FILE -c copy -f null -`` (demux every
   packet, decode nothing: I/O bound, seconds for an episode) with
   ``-loglevel level+info`` so each stderr line carries its level, and
   ``-progress pipe:1`` whose ``out_time_us`` is how far the packets really go.
   From the ``info`` banner of ``Input #0`` it takes container, declared
   ``Duration:`` and streams (when ffprobe did not); it rejects on a non-zero
   exit (e.g. "moov atom not found"), on demuxer errors that mean truncation
   ("partial file", "File ended prematurely", ...), on 10 or more error lines
   (corrupt), and when the packets stop short of the declared duration by more
   than max(1 s, 1 %) (a truncated MP4 with moov at the front, a cut MKV).
   A truncated MPEG-TS has no declared duration of its own (ffmpeg estimates it
   from the last timestamps present), so for TS the 188-byte check of step 3 is
   what catches truncation; a TS cut exactly on a packet boundary passes as a
   shorter video: compare ``duration_seconds`` with what you expected if you
   know it.
6. The container must not be a playlist/image/text demuxer, and there must be
   a video stream that is not just cover art (``attached pic``).
"""


from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from services.worker.containers import (MP4_BOXES, MP4_FORMAT, SNIFF_BYTES, NotAVideo,
                                        reject_text, structural_check)
from services.worker.media_tools import (Stopped, Stopper, file_arg, find_ffmpeg, find_ffprobe,
                                         read_tail, run_tool)

__all__ = ["NotAVideo", "Sniffed", "Stopped", "VerifyTimeout", "VideoInfo", "judge", "read_scan",
           "sniff", "verify_video"]

MAX_ERROR_LINES = 10  # this many error-level lines from ffmpeg: corrupt
_TRUNCATION_PATTERNS = (
    "partial file", "ended prematurely", "truncat", "moov atom not found", "unexpected end",
    "end of file", "premature", "incomplete",
)
# ffmpeg demuxers that can "open" a file without it being a video file.
_NOT_VIDEO_FORMATS = {
    "hls": "an HLS playlist", "applehttp": "an HLS playlist", "dash": "a DASH manifest",
    "concat": "a concat list", "tty": "a text file", "srt": "a subtitle file", "webvtt": "a subtitle file",
    "ass": "a subtitle file", "lavfi": "a filter graph", "image2": "an image", "gif": "a GIF image",
    "html": "an HTML page",
}


class VerifyTimeout(NotAVideo):
    """The tool did not finish within the time allowed (the file may still be fine)."""


@dataclass(frozen=True)
class VideoInfo:
    duration_seconds: float | None
    container: str | None
    has_video: bool
    has_audio: bool


@dataclass
class _Probe:
    container: str | None = None
    declared: float | None = None
    has_video: bool = False
    has_audio: bool = False
    streams_known: bool = False


def _probe_ffprobe(ffprobe: str, path: Path, timeout: float, stopper: Stopper | None = None) -> _Probe:
    cmd = [ffprobe, "-v", "error", "-protocol_whitelist", "file",
           "-show_entries", "format=duration,format_name:stream=codec_type:stream_disposition=attached_pic",
           "-of", "json", file_arg(path)]
    with tempfile.TemporaryFile() as err:
        try:
            rc, out = run_tool(cmd, timeout, err, stopper)
        except subprocess.TimeoutExpired:
            raise VerifyTimeout(f"ffprobe did not finish within {timeout:.0f}s") from None
        if rc != 0:
            raise NotAVideo(_reason_from_errors(read_tail(err).splitlines(), "ffprobe cannot read it"))
    try:
        data = json.loads(out or b"{}")
    except ValueError:
        raise NotAVideo("ffprobe printed no JSON") from None
    fmt = data.get("format") or {}
    p = _Probe(container=fmt.get("format_name"), declared=_float(fmt.get("duration")), streams_known=True)
    for s in data.get("streams") or []:
        attached = bool((s.get("disposition") or {}).get("attached_pic"))
        if s.get("codec_type") == "video" and not attached:
            p.has_video = True
        elif s.get("codec_type") == "audio":
            p.has_audio = True
    return p


_LEVEL_RE = re.compile(r"\[(trace|debug|verbose|info|warning|error|fatal|panic)\] ?(.*)$")
_INPUT_RE = re.compile(r"^Input #0, (.+?), from '")
_DURATION_RE = re.compile(r"^\s*Duration: (?:N/A|(\d+):(\d\d):(\d\d(?:\.\d+)?))")
_STREAM_RE = re.compile(r"^\s*Stream #0:\d+\S*: (Video|Audio|Subtitle|Data|Attachment): ?(.*)$")


@dataclass
class _Scan:
    rc: int
    container: str | None = None
    declared: float | None = None
    has_video: bool = False
    has_audio: bool = False
    read: float | None = None  # seconds of packets actually demuxed
    errors: list[str] | None = None
    error_count: int = 0


def _scan_ffmpeg(ffmpeg: str, path: Path, timeout: float, stopper: Stopper | None = None) -> _Scan:
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-nostats", "-loglevel", "level+info",
           "-protocol_whitelist", "file", "-i", file_arg(path),
           "-c", "copy", "-f", "null", "-progress", "pipe:1", "-"]
    with tempfile.TemporaryFile() as err:
        try:
            rc, out = run_tool(cmd, timeout, err, stopper)
        except subprocess.TimeoutExpired:
            raise VerifyTimeout(f"ffmpeg did not read the file within {timeout:.0f}s") from None
        return read_scan(rc, err, out)


def read_scan(rc: int, err: IO[bytes], out: bytes) -> _Scan:
    """What an ffmpeg run with ``-loglevel level+info -progress pipe:1`` says of its input:
    container, declared duration and streams (the ``Input #0`` banner), its error lines, and
    how far the packets went (``out_time_us``). ``err`` is its stderr file, read from the
    start; ``out`` its stdout."""
    err.seek(0)
    scan = _Scan(rc=rc, errors=[])
    in_input = False
    for raw in err:  # streamed: memory stays bounded whatever ffmpeg prints
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        m = _LEVEL_RE.search(line)
        if not m:
            continue
        level, msg = m.groups()
        if level in ("error", "fatal", "panic"):
            scan.error_count += 1
            if len(scan.errors) < 20:
                scan.errors.append(msg.strip())
            continue
        if level != "info":
            continue
        im = _INPUT_RE.match(msg)
        if im:
            scan.container = im.group(1)
            in_input = True
            continue
        if msg.startswith(("Output #", "Stream mapping:")):
            in_input = False
            continue
        if not in_input:
            continue
        dm = _DURATION_RE.match(msg)
        if dm:
            if dm.group(1) is not None:
                scan.declared = int(dm.group(1)) * 3600 + int(dm.group(2)) * 60 + float(dm.group(3))
            continue
        sm = _STREAM_RE.match(msg)
        if sm:
            kind, rest = sm.groups()
            if kind == "Video" and "(attached pic)" not in rest:
                scan.has_video = True
            elif kind == "Audio":
                scan.has_audio = True
    for line in out.decode("utf-8", "replace").splitlines():
        if line.startswith("out_time_us="):
            value = line.split("=", 1)[1].strip()
            if value.lstrip("-").isdigit() and int(value) >= 0:
                scan.read = int(value) / 1e6
    return scan


def _float(value: object) -> float | None:
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if f >= 0 else None


def _reason_from_errors(errors: list[str], default: str, looks_mp4: bool = True) -> str:
    errors = [e for e in errors if e]
    for e in errors:
        if "moov atom not found" in e.lower():
            if looks_mp4:
                return "incomplete MP4: moov atom not found (the download or remux did not finish)"
            return f"{default}: not a known video format (tried as MP4 because of its name: {e})"
    for e in errors:
        if any(p in e.lower() for p in _TRUNCATION_PATTERNS):
            return f"truncated: {e}"
    if errors:
        return f"{default}: {errors[-1]}"
    return default


# --------------------------------------------------------------------------- public API


@dataclass(frozen=True)
class Sniffed:
    """What the tool-free checks learnt of a file (steps 1 to 3)."""
    size: int
    head: bytes
    container: str | None  # from its magic, when recognised


def sniff(path: Path) -> Sniffed:
    """Steps 1 to 3 of the module doc: raise NotAVideo, or say what the first bytes are."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise NotAVideo(f"no such file: {path}") from None
    if not path.is_file():
        raise NotAVideo(f"not a regular file: {path}")
    size = st.st_size
    if size == 0:
        raise NotAVideo("empty file (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    reject_text(head, size)
    return Sniffed(size=size, head=head, container=structural_check(path, head, size))


def verify_video(path: Path, timeout_seconds: float = 120, stopper: Stopper | None = None) -> VideoInfo:
    """Check that ``path`` is a whole video; return what was learnt or raise NotAVideo (see
    module doc): VerifyTimeout when the tools took longer than ``timeout_seconds`` in all,
    Stopped (not a NotAVideo) when ``stopper`` stopped them."""
    path = Path(path)
    deadline = time.monotonic() + timeout_seconds
    sniffed = sniff(path)
    magic_container = sniffed.container

    ffprobe = find_ffprobe()
    ffmpeg = find_ffmpeg()
    if ffprobe is None and ffmpeg is None:
        if magic_container is None:
            raise NotAVideo("unrecognised format (no MP4/Matroska/MPEG-TS signature) and no "
                            "ffmpeg/ffprobe to inspect it")
        return VideoInfo(duration_seconds=None, container=magic_container, has_video=True, has_audio=False)

    probe: _Probe | None = None
    if ffprobe is not None:
        try:
            probe = _probe_ffprobe(ffprobe, path, deadline - time.monotonic(), stopper)
        except OSError:  # found but not runnable: as if absent
            probe = None
    scan: _Scan | None = None
    if ffmpeg is not None:
        try:
            scan = _scan_ffmpeg(ffmpeg, path, deadline - time.monotonic(), stopper)
        except OSError:
            scan = None
    if probe is None and scan is None:
        if magic_container is None:
            raise NotAVideo("unrecognised format and ffmpeg/ffprobe could not be run")
        return VideoInfo(duration_seconds=None, container=magic_container, has_video=True, has_audio=False)
    return judge(sniffed, probe, scan)


def judge(sniffed: Sniffed, probe: _Probe | None, scan: _Scan | None) -> VideoInfo:
    """Steps 5 and 6 of the module doc, on what ffprobe and the ffmpeg pass said (one of
    them at least): the VideoInfo, or NotAVideo saying why not."""
    magic_container, head = sniffed.container, sniffed.head
    if scan is not None:
        if scan.rc != 0:
            raise NotAVideo(_reason_from_errors(scan.errors or [], f"ffmpeg cannot read it (exit {scan.rc})",
                                                looks_mp4=magic_container in (None, MP4_FORMAT) and
                                                head[4:8] in MP4_BOXES))

    container = (probe.container if probe else None) or (scan.container if scan else None)
    declared = (probe.declared if probe else None)
    if declared is None and scan is not None:
        declared = scan.declared
    if probe is not None and probe.streams_known:
        has_video, has_audio = probe.has_video, probe.has_audio
    else:
        assert scan is not None
        has_video, has_audio = scan.has_video, scan.has_audio

    if container is None:
        raise NotAVideo("ffmpeg recognised no container")
    for name in container.split(","):
        if name in _NOT_VIDEO_FORMATS:
            raise NotAVideo(f"{_NOT_VIDEO_FORMATS[name]} ({container}), not a video")
        if name.endswith("_pipe"):
            raise NotAVideo(f"an image ({name}), not a video")

    if scan is not None:
        truncation = [e for e in scan.errors or [] if any(p in e.lower() for p in _TRUNCATION_PATTERNS)]
        if truncation:
            raise NotAVideo(f"truncated: {truncation[0]}")
        if scan.error_count >= MAX_ERROR_LINES:
            raise NotAVideo(f"corrupt: ffmpeg reported {scan.error_count} errors, first: {scan.errors[0]}")
        if declared is not None and scan.read is not None:
            tolerance = max(1.0, 0.01 * declared)
            if scan.read < declared - tolerance:
                raise NotAVideo(f"truncated: packets stop at {scan.read:.2f}s of a declared {declared:.2f}s")

    if not has_video:
        raise NotAVideo(f"no video stream ({'audio only' if has_audio else 'no audio either'}, "
                        f"container {container})")

    duration = declared
    if duration is None and scan is not None:
        duration = scan.read
    return VideoInfo(duration_seconds=duration, container=container, has_video=has_video, has_audio=has_audio)
