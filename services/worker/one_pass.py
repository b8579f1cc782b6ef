"""Verifying a download while remuxing it to Matroska, in one read: ``verify_and_remux``.

After ani-cli finishes, the file is read once and the Matroska copy written once: the
ffmpeg that remuxes (``-map 0 -map -0:d? -c copy -f matroska``, as remux.py) runs with
``-loglevel level+info -progress pipe:1``, so its stderr and stdout say what the verify
pass of verify.py would have said (the ``Input #0`` banner, the demuxer's errors, how far
the packets went), and verify.py's own rules judge it (``sniff``, ``read_scan``,
``judge``). ffprobe is not run: the banner says the same of the container, the duration
and the streams.

Only a file that this pass finds wanting is read again: when it fails, the copy is
removed and ``verify_video`` gives the verdict as it always has, so a bad file is
refused with the same reason, and a good one that ffmpeg could not remux is a remux
failure (``RemuxError``), not a bad file. A full disk is lack of space (``no_space``),
a time-out is no verdict (``VerifyTimeout``), and ``Stopper.stop`` kills the ffmpeg at
once (``Stopped``); none of them removes the download. The copy sits next to the
download until it is complete, as a plain remux's does: the job's reservation of twice
the episode holds.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from services.worker import verify
from services.worker.media_tools import Stopped, Stopper, file_arg, find_ffmpeg, read_tail, run_tool
from services.worker.remux import RemuxError, no_space, write_failed
from services.worker.verify import NotAVideo, VerifyTimeout, VideoInfo

__all__ = ["remux_command", "verify_and_remux"]


def remux_command(ffmpeg: str, src: Path, dst: Path) -> list[str]:
    """The one ffmpeg run: every audio/video/subtitle stream copied into Matroska (data
    streams dropped: Matroska cannot hold them), its input's report on stderr, with levels,
    and its progress on stdout."""
    return [ffmpeg, "-nostdin", "-hide_banner", "-nostats", "-loglevel", "level+info", "-y",
            "-protocol_whitelist", "file", "-i", file_arg(src),
            "-map", "0", "-map", "-0:d?", "-c", "copy", "-f", "matroska",
            "-progress", "pipe:1", file_arg(dst)]


def verify_and_remux(src: Path, dst: Path, timeout_seconds: float = 600,
                     stopper: Stopper | None = None) -> VideoInfo:
    """Check that ``src`` is a whole video and copy it into the Matroska ``dst`` in one
    ffmpeg pass; return what verify_video would. Raises NotAVideo (the file is bad),
    VerifyTimeout, RemuxError (``no_space``: the disk is full) or Stopped; ``dst`` is
    removed on any of them. The caller renames ``dst`` into place and removes ``src``."""
    src, dst = Path(src), Path(dst)
    sniffed = verify.sniff(src)  # a playlist, a web page, a cut box: refused before ffmpeg runs
    ffmpeg = find_ffmpeg()
    if ffmpeg is None:
        raise RemuxError("no ffmpeg found (PATH or imageio-ffmpeg)")
    with tempfile.TemporaryFile() as err:
        try:
            rc, out = run_tool(remux_command(ffmpeg, src, dst), timeout_seconds, err, stopper)
        except subprocess.TimeoutExpired:
            _unlink(dst)
            raise VerifyTimeout(f"ffmpeg did not verify and remux the file within "
                                f"{timeout_seconds:.0f}s") from None
        except Stopped:
            _unlink(dst)
            raise
        except OSError as exc:
            _unlink(dst)
            raise RemuxError(f"cannot run ffmpeg: {exc}") from None
        scan = verify.read_scan(rc, err, out)
        tail = read_tail(err, 1000)
    errors = scan.errors or []
    failed = rc != 0 or write_failed(tail, *errors)  # some ffmpegs exit 0 with the copy cut short
    if failed and no_space(tail, *errors):
        _unlink(dst)
        raise RemuxError(f"ffmpeg exit {rc}: {tail or 'no message'}", no_space=True)
    try:
        info = verify.judge(sniffed, None, scan)
    except NotAVideo:
        info = None
    if info is not None and not failed and _written(dst):
        return info
    # Found wanting: the verify pass alone has the last word (the second read is only ever
    # paid for a file that does not land as it is).
    if failed:
        _unlink(dst)
    try:
        info = verify.verify_video(src, timeout_seconds, stopper)
    except BaseException:
        _unlink(dst)
        raise
    if failed:
        raise RemuxError(f"ffmpeg exit {rc}: {_summary(errors) or tail or 'no message'}")
    if not _written(dst):
        _unlink(dst)
        raise RemuxError("ffmpeg produced no output")
    return info  # the remux was whole; only what it printed beside it looked wrong


def _summary(errors: list[str]) -> str:
    """ffmpeg's first error (the cause: "Subtitle codec 94213 is not supported.") and its
    last two (what it gave up on), without the empty ones."""
    lines = [e.strip() for e in errors if e.strip()]
    return "; ".join(lines if len(lines) <= 3 else [lines[0], *lines[-2:]])


def _written(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
