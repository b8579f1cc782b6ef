"""A rename that never replaces what is at its target: renameat2(RENAME_NOREPLACE).

The landing hard-links the staged file to its final name (link(2) fails on an existing
name). On a filesystem without hard links (some SMB mounts) it must rename instead, and
a check for the target followed by rename(2) can replace an episode that appeared in
between. renameat2 with RENAME_NOREPLACE (Linux 3.15+, glibc 2.28+) decides atomically
in the kernel. Where the call or the flag is missing (old glibc, a filesystem that
refuses the flag with EINVAL), the caller's lock makes the check-then-rename safe among
this system's workers: ``rename_noreplace`` takes it there.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
from functools import lru_cache
from pathlib import Path

AT_FDCWD = -100
RENAME_NOREPLACE = 1


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
