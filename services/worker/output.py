"""Reading ani-cli's pipes: progress figures, the error tail, and its die() mark.

Each stream has its own parser and tail (interleaving two streams' partial lines
garbles both). With a pidfd for ani-cli's exit, its output is read at most every
``OUTPUT_READ_SECONDS``: every write of a progress line woke the worker at once (and a
woken worker preempts the writer on a busy machine); 64 KiB of pipe buffer holds far
more than a tenth of a second of it.
"""

from __future__ import annotations

import os
import subprocess
import time

from services.worker.progress import OutputTail, Progress, ProgressParser

OUTPUT_READ_SECONDS = 0.1
BIG_READ = 32 * 1024  # a read this large: read again at once, the writer is chatty
# ani-cli's die(): "\33[2K\r\033[1;31m<message>\033[0m" on stderr. Every failure of the
# script prints it; its INT/HUP/TERM trap exits 1 without it.
DIE_MARK = b"\x1b[1;31m"
STREAMS = ("stdout", "stderr")


class AniCliOutput:
    """What one ani-cli run printed, and when its pipes are next due to be read."""

    def __init__(self) -> None:
        self.parsers = {name: ProgressParser() for name in STREAMS}
        self.tails = {name: OutputTail() for name in STREAMS}
        self.latest: Progress | None = None
        # Running max of this download's percent: yt-dlp's HLS percent swings with its
        # estimated total (-N 16 finishes fragments out of order), a bar must not go back.
        self.max_percent: float | None = None
        self._new_download = False  # the last figure ended a download; the next starts another
        self.died = False  # ani-cli printed a die() message
        self._stderr_edge = b""  # the last bytes of stderr, for a mark split across reads
        self.read_due = 0.0  # monotonic time from which the pipes are polled again

    # --- reading ------------------------------------------------------------

    def fds(self, proc: subprocess.Popen, paced: bool) -> list[int]:
        """ani-cli's open pipes while they are due (always, when not ``paced`` by a pidfd)."""
        if paced and time.monotonic() < self.read_due:
            return []
        return [p.fileno() for p in (proc.stdout, proc.stderr) if p and not p.closed]

    def seconds_to_read(self) -> float:
        """How long a poll may sleep before the pipes are due (0 when they are)."""
        return max(0.0, self.read_due - time.monotonic())

    def read(self, proc: subprocess.Popen) -> None:
        """Read whatever both pipes hold now; a pipe at EOF is closed."""
        got = 0
        for name, pipe in zip(STREAMS, (proc.stdout, proc.stderr)):
            if pipe is None or pipe.closed:
                continue
            while True:
                try:
                    chunk = os.read(pipe.fileno(), 65536)
                except BlockingIOError:
                    break
                if not chunk:
                    pipe.close()
                    break
                got += len(chunk)
                self.feed(name, chunk)
        self.read_due = time.monotonic() + (0.0 if got >= BIG_READ else OUTPUT_READ_SECONDS)

    def feed(self, stream: str, chunk: bytes) -> None:
        """Account a chunk of ``stream`` ("stdout" or "stderr"): its own parser and tail,
        the latest figure, the running max, the die() mark."""
        for figure in self.parsers[stream].feed(chunk):
            if self._new_download:
                self.max_percent, self._new_download = None, False
            self.latest = figure
            if figure.percent is not None:
                self.max_percent = max(self.max_percent or 0.0, figure.percent)
            self._new_download = figure.done
        self.tails[stream].feed(chunk)
        if stream == "stderr" and not self.died:
            seen = self._stderr_edge + chunk
            self.died = DIE_MARK in seen
            self._stderr_edge = seen[-(len(DIE_MARK) - 1):]

    # --- what it said -------------------------------------------------------

    def destination(self) -> str | None:
        """Where the downloader said it writes (yt-dlp's ``[download] Destination:``)."""
        return self.parsers["stdout"].destination or self.parsers["stderr"].destination

    def progress(self) -> tuple[float | None, float | None, float | None]:
        """(percent, speed_bps, eta_seconds) for the heartbeat. The percent is the running max
        of the current download, None while the latest figure has none (ffmpeg's never does);
        without an ETA from the tool (yt-dlp's HLS says Unknown) one from its estimated total."""
        p = self.latest
        if p is None:
            return None, None, None
        eta = p.eta_seconds
        if eta is None and p.total_bytes and p.downloaded_bytes is not None and p.speed_bps:
            eta = round(max(0, p.total_bytes - p.downloaded_bytes) / p.speed_bps, 1)
        return (self.max_percent if p.percent is not None else None), p.speed_bps, eta

    def tail(self) -> str:
        """The last lines of stderr (what the spec's error message carries), else stdout."""
        return self.tails["stderr"].text() or self.tails["stdout"].text()
