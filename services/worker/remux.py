"""Copying a verified download into a Matroska file, losslessly: ``remux_to_mkv``.

The copy sits next to the download until it is complete (the job reserves room for
both); ffmpeg runs as services/worker/media_tools.py says. A remux that runs out of
space says so (``RemuxError.no_space``): lack of space, not a bad file.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from services.worker.media_tools import Stopped, Stopper, file_arg, find_ffmpeg, read_tail, run_tool

NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded")  # ffmpeg's strerror
# ffmpeg's words when it could not write its output. Some ffmpeg releases exit 0 after
# them (Debian 12's 5.1, when the disk fills while it writes the trailer: the copy is cut
# short), so they fail a remux whatever the exit code.
WRITE_FAILURE_TEXTS = ("Error writing trailer", "Error closing file", "av_interleaved_write_frame",
                       "Error muxing a packet", *NO_SPACE_TEXTS)


class RemuxError(Exception):
    """ffmpeg could not remux the file; ``str(exc)`` is the reason. ``no_space``: it ran
    out of space writing the copy; ``timed_out``: it did not finish in time."""

    def __init__(self, reason: str, no_space: bool = False, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.no_space = no_space
        self.timed_out = timed_out


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
           "-i", file_arg(src), "-map", "0", "-map", "-0:d?", "-c", "copy", "-f", "matroska", file_arg(dst)]
    with tempfile.TemporaryFile() as err:
        try:
            rc, _ = run_tool(cmd, timeout_seconds, err, stopper)
        except subprocess.TimeoutExpired:
            _unlink(dst)
            raise RemuxError(f"ffmpeg did not finish the remux within {timeout_seconds:.0f}s",
                             timed_out=True) from None
        except Stopped:
            _unlink(dst)
            raise
        except OSError as exc:
            raise RemuxError(f"cannot run ffmpeg: {exc}") from None
        tail = read_tail(err, 1000)
        if rc != 0 or write_failed(tail):
            _unlink(dst)
            raise RemuxError(f"ffmpeg exit {rc}: {tail or 'no message'}", no_space=no_space(tail))
    if not dst.is_file() or dst.stat().st_size == 0:
        _unlink(dst)
        raise RemuxError("ffmpeg produced no output")


def write_failed(*texts: str) -> bool:
    """ffmpeg said it could not write (all of) its output."""
    return _says(WRITE_FAILURE_TEXTS, texts)


def no_space(*texts: str) -> bool:
    return _says(NO_SPACE_TEXTS, texts)


def _says(markers: tuple[str, ...], texts: tuple[str, ...]) -> bool:
    return any(marker in text for marker in markers for text in texts)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
