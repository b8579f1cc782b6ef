"""Putting a staged episode at its final path, never replacing one that is there.

The staged file is hard-linked to ``videos/<mal_id>/episodes/ep001.<ext>``: link(2)
fails on an existing name, so two attempts can never both land. On a filesystem
without hard links (some SMB mounts) it is renamed instead, with
renameat2(RENAME_NOREPLACE) (Linux 3.15+, glibc 2.28+), which decides atomically in
the kernel; a check for the target followed by rename(2) could replace an episode that
appeared in between. Where the call or the flag is missing (old glibc, a filesystem
that refuses the flag with EINVAL), the anime's lock makes the check-then-rename safe
among this system's workers. Only after the link: the directory's fsync and
metadata.json.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
from functools import lru_cache
from pathlib import Path

from shared import layout
from shared.protocol import JobAssign
from shared import metadata

AT_FDCWD = -100
RENAME_NOREPLACE = 1


def land(storage_dir: Path, job: JobAssign, staged: Path, target: Path,
         duration: float | None, site_title: str | None, title_mismatch: bool) -> None:
    """Put ``staged`` at ``target`` (FileExistsError if another file is there), then record
    the episode in metadata.json. The caller checked that the storage is there."""
    layout.make_dirs_below(storage_dir, target.parent)
    try:
        os.link(staged, target)
    except FileExistsError:
        if not os.path.samefile(staged, target):
            raise
    except OSError:
        rename_noreplace(staged, target, metadata.lock_path(storage_dir, job.anime_id))
    staged.unlink(missing_ok=True)
    _fsync_dir(target.parent)
    # Only now: metadata.json never lists an episode whose link failed.
    metadata.write(storage_dir, job, target, duration, site_title, title_mismatch)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@lru_cache(maxsize=1)
def _renameat2():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def rename_noreplace(src: Path, dst: Path, lock_path: Path) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists, whatever the timing.
    ``lock_path``: the file every landing of this anime locks (the fallback's guard)."""
    func = _renameat2()
    if func is not None:
        if func(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(src))
    _locked_check_then_rename(src, dst, lock_path)


def _locked_check_then_rename(src: Path, dst: Path, lock_path: Path) -> None:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        os.rename(src, dst)
    finally:
        os.close(fd)
