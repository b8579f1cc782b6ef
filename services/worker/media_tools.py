"""Finding and running the media tools of the post step: ffmpeg and ffprobe.

Tools: ``ffprobe`` on PATH if any; ``ffmpeg`` on PATH, else the binary shipped by
imageio-ffmpeg (imported lazily: the worker stays small), else none. Every tool
runs as an argument list (never a shell), stdin from /dev/null, in its own process
group, with a timeout after which the group is killed; a ``Stopper`` lets another
thread kill it at once (the worker's cancel, stop or hard-limit abort). Paths are
passed as ``file:/abs/path`` so a title containing ``:`` ("Re:Zero Episode 1.mp4")
is not taken for a protocol.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import IO, Callable

from services.worker import process


class Stopped(Exception):
    """The check or remux was stopped from outside (``Stopper.stop``): no verdict."""


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
    if proc.returncode is None:  # once reaped, its pid may be someone else's
        process.kill_group(proc)


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


def file_arg(path: Path) -> str:
    """A path as ffmpeg must take it: never a protocol (``Re:Zero Episode 1.mp4``)."""
    return "file:" + os.path.abspath(path)


def run_tool(cmd: list[str], timeout: float, stderr_file: IO[bytes],
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


def read_tail(f: IO[bytes], limit: int = 2000) -> str:
    """The last ``limit`` bytes of a tool's captured stderr, as text."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - limit))
    return f.read().decode("utf-8", "replace").strip()
