"""A job's private directory on the storage, its lock, and what is in it.

``<storage>/.in_progress/job-<id>/`` is ani-cli's private history directory,
``dl/`` in it ani-cli's download directory (kept across retries, so a resuming
downloader resumes), ``.lock`` the lock an attempt holds while it runs (with the
record of its process groups, services/worker/process.py), and
``ready-a<attempt>.<ext>`` the verified file waiting for the dispatcher's go-ahead.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import stat
from pathlib import Path

from shared import layout
from shared.logfmt import kv
from services.worker import process

log = logging.getLogger(__name__)
LOCK_FILE = ".lock"


class DirectoryBusy(RuntimeError):
    """Another attempt holds the private directory's lock."""


class PrivateDir:
    """One job's private directory; ``lock()`` takes it for an attempt, ``release()`` lets go."""

    def __init__(self, storage_dir: Path, job_id: int, attempt: int) -> None:
        self.path = layout.job_dir(storage_dir, job_id)
        self.download_dir = self.path / "dl"
        self.attempt = attempt
        self.lock_fd: int | None = None

    def lock(self) -> None:
        """Create and lock the directory. One that was there already belongs to an earlier
        attempt: kill what a killed worker left running in it, drop its staged files.
        (Few files per job: on ext4 every inode freed slows the next allocations.)"""
        fresh = _make_dir(self.path)
        os.makedirs(self.download_dir, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DirectoryBusy("private directory is in use by another attempt") from None
        self.lock_fd = fd
        if not fresh:
            process.kill_recorded_group(fd, self.path)
            for staged in self.path.glob("ready-a*"):
                staged.unlink(missing_ok=True)

    def staged_path(self, ext: str) -> Path:
        return self.path / f"ready-a{self.attempt}{ext}"

    def staged_bytes(self) -> int:
        """The bytes of this attempt's staged file (a remux's copy while it is written)."""
        total = 0
        for staged in self.path.glob(f"ready-a{self.attempt}*"):
            try:
                total += staged.stat().st_size
            except OSError:
                continue
        return total

    def drop_staged(self) -> None:
        for staged in self.path.glob(f"ready-a{self.attempt}*"):
            try:
                staged.unlink(missing_ok=True)
            except OSError:  # a read-only or failing storage: the next attempt removes it
                pass

    def clear_partials(self) -> None:
        shutil.rmtree(self.download_dir, ignore_errors=True)

    def remove(self) -> None:
        remove(self.path)

    def release(self) -> None:
        """Let go of the lock; the attempt's groups have ended, so their record goes."""
        if self.lock_fd is not None:
            process.forget_group(self.lock_fd)
            os.close(self.lock_fd)
            self.lock_fd = None


def _make_dir(path: Path) -> bool:
    """Create ``path`` (and ``.in_progress`` above it, never storage_dir itself); False if it
    was there already."""
    try:
        os.mkdir(path)
        return True
    except FileExistsError:
        return False
    except FileNotFoundError:
        try:
            os.mkdir(path.parent)
        except FileExistsError:
            pass
        return _make_dir(path)


def remove(path: Path) -> None:
    """Remove a job's private directory. After a landing it holds the lock file, ani-cli's
    history and the empty ``dl/``: remove those directly (a few syscalls, once per job),
    anything deeper with rmtree."""
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        os.rmdir(entry.path)
                    else:
                        os.unlink(entry.path)
                except OSError:
                    shutil.rmtree(entry.path, ignore_errors=True)
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def bytes_in(directory: Path) -> int:
    """Bytes written so far under a download directory (the fallback progress); a
    subdirectory is there when the site's title has a ``/`` in it."""
    total = 0
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                try:
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
                    elif entry.is_dir(follow_symlinks=False):
                        total += bytes_in(Path(entry.path))
                except OSError:
                    continue
    except OSError:
        return 0
    return total


def files_under(directory: Path) -> list[tuple[str, int]]:
    """(name relative to ``directory``, size) of every regular file below it, sorted. A
    file that vanishes while it is listed (a downloader's temporary file) is left out."""
    found = []
    for root, _dirs, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((os.path.relpath(path, directory), st.st_size))
    return sorted(found)


def sweep_orphans(storage_dir: Path) -> int:
    """At worker start: kill what workers killed with SIGKILL left running. Every private
    directory whose lock is free (no live attempt holds it) and whose lock file records
    a live process group of ours gets that group killed, at once rather than when a later
    attempt of that job reuses the directory (after its backoff, or never). A directory
    whose lock is held is not touched, and no lock file is created. Returns the groups
    killed."""
    try:
        entries = list(os.scandir(layout.in_progress_root(storage_dir)))
    except OSError:  # no private directories (or no storage): nothing can be running
        return 0
    killed = 0
    for entry in entries:
        if layout.job_id_of_dir(Path(entry.path)) is None:
            continue
        try:
            fd = os.open(os.path.join(entry.path, LOCK_FILE), os.O_RDWR)
        except OSError:  # no lock file, or a storage that cannot be written
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: a live attempt owns whatever runs there
            os.close(fd)
            continue
        try:
            killed += process.kill_recorded_group(fd, Path(entry.path))
        finally:
            os.close(fd)
    if killed:
        log.info(kv("swept private directories at start", killed=killed, storage_dir=storage_dir))
    return killed
