"""What the worker does with a downloaded file: verify it is a whole video, remux it to MKV.

Tools: ``ffprobe`` on PATH if any; ``ffmpeg`` on PATH, else the binary shipped by
imageio-ffmpeg (imported lazily: the worker stays small), else none. Every tool
runs as an argument list (never a shell), stdin from /dev/null, in its own process
group, with a timeout after which the group is killed; a ``Stopper`` lets another
thread kill it at once (the worker's cancel, stop or hard-limit abort). Paths are
passed as ``file:/abs/path`` so a title containing ``:`` ("Re:Zero Episode 1.mp4")
is not taken for a protocol, and inputs are restricted to the ``file`` protocol so
a playlist cannot make ffmpeg fetch URLs.

How ``verify_video`` decides (first failing check wins; ``str(NotAVideo)`` says which):

1. The file exists, is regular and not empty.
2. Its first 4 KiB are not text: an HLS playlist (``#EXTM3U``, ani-cli #1108:
   the m3u8 saved as the .mp4), an HTML/XML page (an error page saved as the
   video, or yt-dlp concatenating HTML "segments", ani-cli #1116) or other text
   are rejected before any tool runs.
3. Cheap structural checks that need no tool (also the whole verdict when
   neither ffmpeg nor ffprobe exists):
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
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

SNIFF_BYTES = 4096
TS_PACKET = 188
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


class NotAVideo(Exception):
    """The file is not a complete, playable video. ``str(exc)`` is the reason."""


class VerifyTimeout(NotAVideo):
    """The tool did not finish within the time allowed (the file may still be fine)."""


class RemuxError(Exception):
    """ffmpeg could not remux the file; ``str(exc)`` is the reason. ``no_space``: it ran
    out of space writing the copy; ``timed_out``: it did not finish in time."""

    def __init__(self, reason: str, no_space: bool = False, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.no_space = no_space
        self.timed_out = timed_out


class Stopped(Exception):
    """The check or remux was stopped from outside (``Stopper.stop``): no verdict."""


NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded")  # ffmpeg's strerror
GB = 10**9


def timeout_for(size_bytes: int, seconds_per_gb: float) -> float:
    """The time allowed to check or remux a file: ``seconds_per_gb`` for each GB, and at
    least that for a smaller one (reading it is the cost: size over the disk's speed)."""
    return seconds_per_gb * max(1.0, size_bytes / GB)


class Stopper:
    """Lets another thread stop what a verify or remux runs: ``stop()`` kills the tool's
    process group now, and any tool it would start later raises ``Stopped``.
    ``on_start(pid)`` hears of each tool started (the worker notes its group in the
    attempt's lock file, for a worker that gets killed meanwhile)."""

    def __init__(self, on_start: Callable[[int], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._on_start = on_start
        self.stopped = False

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            proc = self._proc
        if proc is not None:
            _kill_group(proc)

    def check(self) -> None:
        if self.stopped:
            raise Stopped("stopped before it finished")

    def started(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._proc = proc
            stopped = self.stopped
        if stopped:
            _kill_group(proc)
        elif self._on_start is not None:
            self._on_start(proc.pid)

    def ended(self) -> None:
        with self._lock:
            self._proc = None


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.returncode is not None:
        return  # reaped: its pid may be someone else's by now
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@dataclass(frozen=True)
class VideoInfo:
    duration_seconds: float | None
    container: str | None
    has_video: bool
    has_audio: bool


# --------------------------------------------------------------------------- tools


def find_ffmpeg() -> str | None:
    """``ffmpeg`` on PATH, else imageio-ffmpeg's bundled binary, else None."""
    exe = shutil.which("ffmpeg")
    if exe:
        return exe
    try:
        import imageio_ffmpeg  # lazy: only a worker that verifies pays for it
    except ImportError:
        return None
    try:
        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:  # noqa: BLE001 - RuntimeError when the wheel has no binary for this platform
        return None
    return exe if exe and os.access(exe, os.X_OK) else None


def find_ffprobe() -> str | None:
    """``ffprobe`` on PATH, else None (imageio-ffmpeg does not ship one)."""
    return shutil.which("ffprobe")


def _file_arg(path: Path) -> str:
    return "file:" + os.path.abspath(path)


def _run(cmd: list[str], timeout: float, stderr_file: IO[bytes],
         stopper: Stopper | None = None) -> tuple[int, bytes]:
    """Run ``cmd`` with stdin /dev/null, stdout captured, stderr to ``stderr_file``, in its
    own process group.

    Kills the group and raises ``subprocess.TimeoutExpired`` after ``timeout`` s, or
    ``Stopped`` when ``stopper`` was stopped (before or while it ran).
    """
    if stopper is not None:
        stopper.check()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr_file,
                            close_fds=True, start_new_session=True)
    if stopper is not None:
        stopper.started(proc)
    try:
        out, _ = proc.communicate(timeout=max(timeout, 0.1))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.communicate()
        raise
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    finally:
        if stopper is not None:
            stopper.ended()
    if stopper is not None:
        stopper.check()
    return proc.returncode, out


def _tail(f: IO[bytes], limit: int = 2000) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - limit))
    return f.read().decode("utf-8", "replace").strip()


# --------------------------------------------------------------------------- sniffing


def _reject_text(head: bytes, size: int) -> None:
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    low = stripped[:1024].lower()
    if stripped.startswith(b"#EXTM3U"):
        raise NotAVideo(f"an HLS playlist (m3u8, {size} bytes), not a video: the playlist was saved "
                        "instead of its segments")
    if low.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in low:
        title = re.search(rb"<title>(.*?)</title>", stripped[:SNIFF_BYTES], re.I | re.S)
        what = f" ({title.group(1).decode('utf-8', 'replace').strip()[:80]!r})" if title else ""
        raise NotAVideo(f"an HTML page{what}, {size} bytes, not a video")
    if low.startswith(b"<?xml") or low.startswith(b"<mpd"):
        raise NotAVideo(f"an XML document ({size} bytes), not a video")
    if _looks_like_text(head):
        raise NotAVideo(f"a text file ({size} bytes), not a video")


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 4:  # not just a character cut at the end of the sniff window
            return False
        text = head[: exc.start].decode("utf-8")
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return printable >= 0.97 * max(len(text), 1)


def _ts_stride(head: bytes) -> bool:
    """MPEG-TS with 188-byte packets: sync byte at 0, 188, 376, ... (as far as ``head`` goes)."""
    if len(head) < TS_PACKET or head[0] != 0x47:
        return False
    return all(head[i] == 0x47 for i in range(0, min(len(head), TS_PACKET * 8), TS_PACKET))


_MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"moof", b"styp", b"sidx", b"uuid",
              b"pdin", b"meta", b"mfra", b"emsg", b"prft"}


def _mp4_check(path: Path, size: int) -> None:
    """Walk top-level boxes: raise NotAVideo if one runs past EOF or there is no moov."""
    seen: set[bytes] = set()
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            f.seek(pos)
            hdr = f.read(16)
            if len(hdr) < 8:
                break  # a few stray bytes after the last box: players ignore them, so do we
            box_size, box_type = struct.unpack(">I4s", hdr[:8])
            if box_size == 1:
                if len(hdr) < 16:
                    raise NotAVideo("truncated MP4: a box header is cut")
                box_size = struct.unpack(">Q", hdr[8:16])[0]
            elif box_size == 0:
                box_size = size - pos  # to the end of the file
            if box_size < 8:
                raise NotAVideo(f"corrupt MP4: box {box_type!r} at offset {pos} has size {box_size}")
            seen.add(box_type)
            if pos + box_size > size:
                raise NotAVideo(
                    f"truncated MP4: box {box_type.decode('latin-1')!r} at offset {pos} needs "
                    f"{box_size} bytes, the file ends {pos + box_size - size} bytes early")
            pos += box_size
    if b"moov" not in seen:
        raise NotAVideo("incomplete MP4: no moov atom (the download or the remux did not finish)")


def _read_vint(buf: bytes, pos: int) -> tuple[int, int, bool]:
    """EBML variable-length integer at ``pos``: (value, length, all_ones=unknown size)."""
    first = buf[pos]
    length = 1
    mask = 0x80
    while length <= 8 and not first & mask:
        mask >>= 1
        length += 1
    if length > 8 or pos + length > len(buf):
        raise ValueError("bad vint")
    value = first & (mask - 1)
    for b in buf[pos + 1: pos + length]:
        value = (value << 8) | b
    return value, length, value == (1 << (7 * length)) - 1


def _mkv_check(head: bytes, size: int) -> None:
    """EBML header, then the Segment: a known Segment size beyond EOF means truncated."""
    try:
        hdr_size, n, _ = _read_vint(head, 4)
        pos = 4 + n + hdr_size
        if head[pos:pos + 4] != b"\x18\x53\x80\x67":
            return  # not where we expected it: let the tools judge
        seg_size, n, unknown = _read_vint(head, pos + 4)
    except (ValueError, IndexError):
        return
    if not unknown and pos + 4 + n + seg_size > size:
        raise NotAVideo(f"truncated Matroska: the segment needs {pos + 4 + n + seg_size} bytes, "
                        f"the file has {size}")


def _structural_check(path: Path, head: bytes, size: int) -> str | None:
    """Tool-free checks; returns the container name (ffmpeg's spelling) if recognised."""
    if len(head) >= 8 and head[4:8] in _MP4_BOXES and head[4:8] != b"uuid":
        _mp4_check(path, size)
        return "mov,mp4,m4a,3gp,3g2,mj2"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        _mkv_check(head, size)
        return "matroska,webm"
    if _ts_stride(head):
        stray = size % TS_PACKET
        if stray:
            raise NotAVideo(f"truncated MPEG-TS: the last packet is cut ({stray} stray bytes; "
                            f"{size} is not a multiple of {TS_PACKET})")
        return "mpegts"
    return None


MP4_FORMAT = "mov,mp4,m4a,3gp,3g2,mj2"

# --------------------------------------------------------------------------- tools: ffprobe / ffmpeg


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
           "-of", "json", _file_arg(path)]
    with tempfile.TemporaryFile() as err:
        try:
            rc, out = _run(cmd, timeout, err, stopper)
        except subprocess.TimeoutExpired:
            raise VerifyTimeout(f"ffprobe did not finish within {timeout:.0f}s") from None
        if rc != 0:
            raise NotAVideo(_reason_from_errors(_tail(err).splitlines(), "ffprobe cannot read it"))
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
           "-protocol_whitelist", "file", "-i", _file_arg(path),
           "-c", "copy", "-f", "null", "-progress", "pipe:1", "-"]
    with tempfile.TemporaryFile() as err:
        try:
            rc, out = _run(cmd, timeout, err, stopper)
        except subprocess.TimeoutExpired:
            raise VerifyTimeout(f"ffmpeg did not read the file within {timeout:.0f}s") from None
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


def verify_video(path: Path, timeout_seconds: float = 120, stopper: Stopper | None = None) -> VideoInfo:
    """Check that ``path`` is a whole video; return what was learnt or raise NotAVideo (see
    module doc): VerifyTimeout when the tools took longer than ``timeout_seconds`` in all,
    Stopped (not a NotAVideo) when ``stopper`` stopped them."""
    path = Path(path)
    deadline = time.monotonic() + timeout_seconds
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
    _reject_text(head, size)
    magic_container = _structural_check(path, head, size)

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
    if scan is not None:
        if scan.rc != 0:
            raise NotAVideo(_reason_from_errors(scan.errors or [], f"ffmpeg cannot read it (exit {scan.rc})",
                                                looks_mp4=magic_container in (None, MP4_FORMAT) and
                                                head[4:8] in _MP4_BOXES))

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


def remux_to_mkv(src: Path, dst: Path, timeout_seconds: float = 600,
                 stopper: Stopper | None = None) -> None:
    """Copy every audio/video/subtitle stream of ``src`` into a Matroska ``dst``, losslessly.

    ``dst`` is overwritten; on failure (or when stopped) it is removed and RemuxError
    (or Stopped) is raised. Data streams (e.g. HLS timed ID3) are dropped: Matroska
    cannot hold them. The caller renames ``dst`` into place atomically.
    """
    ffmpeg = find_ffmpeg()
    if ffmpeg is None:
        raise RemuxError("no ffmpeg found (PATH or imageio-ffmpeg)")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise RemuxError(f"no such file: {src}")
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-v", "error", "-y", "-protocol_whitelist", "file",
           "-i", _file_arg(src), "-map", "0", "-map", "-0:d?", "-c", "copy", "-f", "matroska", _file_arg(dst)]
    with tempfile.TemporaryFile() as err:
        try:
            rc, _ = _run(cmd, timeout_seconds, err, stopper)
        except subprocess.TimeoutExpired:
            _unlink(dst)
            raise RemuxError(f"ffmpeg did not finish the remux within {timeout_seconds:.0f}s",
                             timed_out=True) from None
        except Stopped:
            _unlink(dst)
            raise
        except OSError as exc:
            raise RemuxError(f"cannot run ffmpeg: {exc}") from None
        if rc != 0:
            _unlink(dst)
            tail = _tail(err, 1000)
            raise RemuxError(f"ffmpeg exit {rc}: {tail or 'no message'}",
                             no_space=any(text in tail for text in NO_SPACE_TEXTS))
    if not dst.is_file() or dst.stat().st_size == 0:
        _unlink(dst)
        raise RemuxError("ffmpeg produced no output")


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
