"""Process lifecycle shared by the services: logging set-up, stop requests, parent death.

Signal handlers only set a flag; ``signal.set_wakeup_fd`` writes a byte to a
pipe that each service registers in its zmq poller, so SIGTERM wakes the
main loop at once instead of after a poll timeout.

Nobody is left behind: a process that supervises others asks the kernel for a
SIGTERM when its own supervisor dies (``PR_SET_PDEATHSIG``), so a kill -9 of
``anime-downloader`` stops supervisord, and a kill -9 of supervisord stops its
programs, each through its ordinary graceful stop.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import time
from typing import Callable, Protocol

DEBUG_ENV = "ANIME_DOWNLOADER_DEBUG"
class _UTCFormatter(logging.Formatter):
    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


def setup_logging(service: str, verbose: bool = False) -> None:
    """Log to stderr (supervisord keeps and rotates the files)."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        verbose = True
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_UTCFormatter(f"%(asctime)s %(levelname)s {service} %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # The format names no source line, thread or process: skip looking them up for every
    # record (the logging HOWTO's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.getLogger("peewee").setLevel(logging.INFO)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class StopRequest:
    """Counts SIGTERM/SIGINT/SIGHUP; ``wakeup_fd`` becomes readable when one arrives.

    SIGHUP (the terminal or ssh session closed) is a stop like the others, not a
    death: by default it would end the process before it stops what it started.
    A SIGHUP that was ignored when the process started (``nohup``) stays ignored.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.count = 0
        # A pipe, not a socketpair: importing socket costs every command-line tool ~2 ms.
        self._reader, self._writer = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._writer, warn_on_full_buffer=False)
        for sig in signals:
            if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                continue
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.count += 1

    @property
    def wakeup_fd(self) -> int:
        return self._reader

    def drain(self) -> None:
        try:
            while os.read(self._reader, 512):
                pass
        except BlockingIOError:
            pass

    @property
    def requested(self) -> bool:
        return self.count > 0


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SUPERVISOR_ENV = "SUPERVISOR_ENABLED"  # set by supervisord in its programs' environment


@functools.cache
def load_prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up once (also before a fork, so a preexec_fn only calls it)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send ``sig`` to this process when its parent ``parent`` dies.

    False when ``parent`` is already gone (the request came too late: the caller is
    an orphan and must stop). Where prctl does not exist, only that check is done.
    Safe in a ``preexec_fn`` once ``load_prctl()`` has been called before the fork.
    """
    prctl = load_prctl()
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    return os.getppid() == parent


def _is_supervisord(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return b"supervisord" in fh.read()
    except OSError:
        return False


def stop_with_supervisord() -> str | None:
    """Under supervisord, ask for a SIGTERM when it dies: an orphaned worker must not
    go on downloading unsupervised (it stops gracefully: kills ani-cli, hands its job
    back). Returns why to exit at once when supervisord is gone already, else None.
    A service started by hand (no ``SUPERVISOR_ENABLED``) is left alone."""
    if not os.environ.get(SUPERVISOR_ENV):
        return None
    parent = os.getppid()
    if not _is_supervisord(parent):
        if parent == 1:
            return "supervisord exited before this process started; not running unsupervised"
        return None  # started under supervisord by something else (a shell): not ours to judge
    if not die_with_parent(parent):
        return f"supervisord (pid {parent}) exited while this process started; not running unsupervised"
    return None


class Service(Protocol):
    def run(self) -> int: ...


def run_service(prog: str, build: Callable[[], Service]) -> int:
    """Build a service and run it, turning the expected start-up problems into one line
    on stderr: a bad config (or an endpoint refused at bind) exits 2, another instance
    already running (or no database for --dry-run) exits 3, supervisord gone exits 1."""
    from shared.config import ConfigError
    from shared.singleton import AlreadyRunning

    orphaned = stop_with_supervisord()
    if orphaned:
        print(f"{prog}: {orphaned}", file=sys.stderr)
        return 1
    try:
        service = build()
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except (AlreadyRunning, FileNotFoundError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 3
    try:
        return service.run()
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
