"""The post step: verify the downloaded file, remux it to MKV, stage it for the landing.

With both, one ffmpeg pass does the two (one_pass.py): the download is read once and
its copy written once; with ``container = "keep"`` the verify pass reads it once and
the staging is a rename.

It runs in a thread, so heartbeats go on during a long check; the thread writes a
byte to a pipe the worker's poll waits on when it is done. ``stop()`` ends it at
once: it kills the tool that runs (a remux must not go on writing at the hard limit)
and frees the pipe. What it returns keeps the download unless the file is bad: a
time-out or a full disk says nothing against the file.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from shared.config import DownloaderConfig
from shared.logfmt import kv
from services.worker import download
from services.worker.private_dir import PrivateDir

if TYPE_CHECKING:  # the media modules are imported when a post step starts: an idle worker stays small
    from services.worker.media_tools import Stopper
    from services.worker.remux import RemuxError

log = logging.getLogger(__name__)
_warned_no_ffmpeg = False


@dataclass
class PostResult:
    """What verification and remuxing produced."""
    staged: Path | None = None
    ext: str = ""
    size: int = 0
    duration: float | None = None
    error: str | None = None
    no_space: bool = False
    timed_out: bool = False  # the check or remux ran out of time: the file is kept for a retry
    stopped: bool = False  # stop() ended it: no verdict


class PostStep:
    """One attempt's post step. ``on_tool_start(pid)`` hears of each tool it starts (the
    attempt records the group in its lock file, for a worker that gets killed)."""

    def __init__(self, settings: DownloaderConfig, private: PrivateDir,
                 on_tool_start: Callable[[int], None], context: dict) -> None:
        self.settings = settings
        self.private = private
        self.on_tool_start = on_tool_start
        self.context = context
        self.result: PostResult | None = None
        self.thread: threading.Thread | None = None
        self.wakeup: tuple[int, int] | None = None  # pipe: the thread writes a byte when done
        self.stopper: Stopper | None = None
        self._running = False  # guarded by _lock, as is wakeup once the thread runs
        self._orphaned = False  # let go of a thread that has not ended: it closes the pipe
        self._lock = threading.Lock()

    def start(self, file: Path) -> None:
        from services.worker.media_tools import Stopper

        self.wakeup = os.pipe()
        self.stopper = Stopper(on_start=self.on_tool_start)
        self._running = True
        self.thread = threading.Thread(target=self._run, args=(file,), daemon=True)
        self.thread.start()

    def done(self) -> bool:
        with self._lock:
            return self.thread is not None and not self._running

    def _run(self, file: Path) -> None:
        from services.worker.media_tools import Stopped

        try:
            self.result = self._verify_and_stage(file)
        except Stopped:
            self.result = PostResult(error="post-processing stopped", stopped=True)
        except OSError as exc:
            self.result = PostResult(error=f"Failed to write video file: {exc.strerror or exc}",
                                     no_space=download.is_no_space_error(exc))
        except Exception as exc:  # a bug here must fail the attempt, not hang it
            log.exception(kv("post-processing failed", **self.context))
            self.result = PostResult(error=f"post-processing failed: {exc}")
        finally:
            with self._lock:
                self._running = False
                if self._orphaned:
                    self._close_pipe()
                else:
                    os.write(self.wakeup[1], b"\0")  # wakes the worker's poller

    def stop(self, wait_seconds: float = 5.0) -> None:
        """Kill the tool it runs, wait for its thread, close its pipe. Idempotent; harmless
        when it never started. (A thread that does not end in time closes the pipe itself
        when it does.)"""
        if self.stopper is not None:
            self.stopper.stop()
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(wait_seconds)
        with self._lock:
            if self._running:
                self._orphaned = True
            else:
                self._close_pipe()

    def _close_pipe(self) -> None:
        if self.wakeup is not None:
            for fd in self.wakeup:
                os.close(fd)
            self.wakeup = None

    def _verify_and_stage(self, file: Path) -> PostResult:
        d = self.settings
        duration = None
        if d.verify or d.container == "mkv":
            from services.worker import media_tools, remux, verify

            stopper = self.stopper
            timeout = media_tools.timeout_for(file.stat().st_size, d.verify_timeout_seconds)
            remux_it = d.container == "mkv" and file.suffix.lower() != ".mkv"
            if d.verify and remux_it and media_tools.find_ffmpeg() is not None:
                return self._verify_while_remuxing(file, timeout)
            if d.verify:
                try:
                    duration = verify.verify_video(file, timeout, stopper).duration_seconds
                except verify.VerifyTimeout as exc:
                    return _verify_timed_out(exc)
                except verify.NotAVideo as exc:
                    file.unlink(missing_ok=True)  # a retry must not find it again
                    return PostResult(error=f"Downloaded file is not a playable video: {exc}")
            if remux_it:
                if media_tools.find_ffmpeg() is not None:
                    staged = self.private.staged_path(".mkv")
                    try:
                        remux.remux_to_mkv(file, staged, timeout, stopper)
                    except remux.RemuxError as exc:
                        return _remux_failed(exc)
                    if stopper is not None:
                        stopper.check()
                    file.unlink()
                    return _staged(staged, duration)
                _warn_no_ffmpeg()
        staged = self.private.staged_path(file.suffix.lower())
        os.rename(file, staged)
        return _staged(staged, duration)

    def _verify_while_remuxing(self, file: Path, timeout: float) -> PostResult:
        """verify and container = "mkv": one ffmpeg pass reads the download once and writes
        its Matroska copy once (one_pass.py), judged as the verify pass would be."""
        from services.worker import one_pass, remux, verify

        staged = self.private.staged_path(".mkv")
        try:
            info = one_pass.verify_and_remux(file, staged, timeout, self.stopper)
        except verify.VerifyTimeout as exc:
            return _verify_timed_out(exc)
        except verify.NotAVideo as exc:
            file.unlink(missing_ok=True)  # a retry must not find it again
            return PostResult(error=f"Downloaded file is not a playable video: {exc}")
        except remux.RemuxError as exc:
            return _remux_failed(exc)
        if self.stopper is not None:
            self.stopper.check()
        file.unlink()
        return _staged(staged, info.duration_seconds)


def _staged(path: Path, duration: float | None) -> PostResult:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
    return PostResult(staged=path, ext=path.suffix, size=path.stat().st_size, duration=duration)


def _verify_timed_out(exc: Exception) -> PostResult:
    return PostResult(error=f"verify timed out: {exc} (the file is kept for the retry; raise "
                            "[downloader] verify_timeout_seconds if the disk is slow)",
                      timed_out=True)


def _remux_failed(exc: RemuxError) -> PostResult:
    """A remux that failed keeps the download (removed only when the disk is full)."""
    if exc.no_space:
        return PostResult(error="Failed to write video file: No space left on device "
                                f"(remux: {exc})", no_space=True)
    if exc.timed_out:
        return PostResult(error=f"remux timed out: {exc} (the file is kept for the retry)",
                          timed_out=True)
    return PostResult(error=f"post-processing failed: {exc}")


def _warn_no_ffmpeg() -> None:
    global _warned_no_ffmpeg
    if not _warned_no_ffmpeg:
        _warned_no_ffmpeg = True
        log.warning("no ffmpeg found: keeping episodes in their downloaded container "
                    "(install ffmpeg or imageio-ffmpeg for .mkv)")
