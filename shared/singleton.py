"""One process per role and installation: an flock on a file in ``<root_dir>/run/``.

The kernel drops an flock when its holder dies, however it dies, so a lock file
left by a crash never blocks a start; a live holder always does. The holder
writes its pid into the file, so a refusal can name the process to stop.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class AlreadyRunning(Exception):
    pass


def hold_lock(path: Path, what: str) -> int:
    """Take the lock for the life of the process; raise AlreadyRunning if taken."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # run/ is private
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        raise AlreadyRunning(f"another {what} is already running (pid {holder}); "
                             f"stop it first (kill {holder}) (lock {path})") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def lock_holder(path: Path) -> str | None:
    """The pid written by whoever holds the lock at ``path`` ("?" if it wrote none yet), or
    None when nobody holds it. Never creates the file and never keeps the lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_pid(fd: int) -> str:
    return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
