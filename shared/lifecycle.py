"""Process lifecycle shared by the services: logging set-up and stop requests.

Signal handlers only set a flag; ``signal.set_wakeup_fd`` writes a byte to a
pipe that each service registers in its zmq poller, so SIGTERM wakes the
main loop at once instead of after a poll timeout.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time
from typing import Callable, Protocol

DEBUG_ENV = "ANIME_DOWNLOADER_DEBUG"
_NEEDS_QUOTES = re.compile(r"[\s\"'=]")


def kv(message: str, **context: object) -> str:
    """``message key=value ...``; values with spaces are quoted (repr), lists are JSON
    (an argument list reads exactly as the program receives it)."""
    parts = [message]
    for key, value in context.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            parts.append(f"{key}={json.dumps(list(value), ensure_ascii=False)}")
            continue
        text = str(value)
        if not text or _NEEDS_QUOTES.search(text):
            text = repr(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


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


class StopRequest:
    """Counts SIGTERM/SIGINT; ``wakeup_fd`` becomes readable when one arrives."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.count = 0
        # A pipe, not a socketpair: importing socket costs every command-line tool ~2 ms.
        self._reader, self._writer = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._writer, warn_on_full_buffer=False)
        for sig in signals:
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


class Service(Protocol):
    def run(self) -> int: ...


def run_service(prog: str, build: Callable[[], Service]) -> int:
    """Build a service and run it, turning the expected start-up problems into one line
    on stderr: a bad config (or an endpoint refused at bind) exits 2, another instance
    already running (or no database for --dry-run) exits 3."""
    from shared.config import ConfigError
    from shared.singleton import AlreadyRunning

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


def config_or_exit(prog: str, path: str):
    """load_config for the command-line tools: a bad config is one line and exit 2."""
    from shared.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
