"""A filesystem on a disk as slow as a USB one, for bench/disk_io.py (run by hand, as root).

The storage the project is written for is an external USB disk: a hard disk moves
100-200 MB/s, a USB 2.0 stick or an old enclosure 30-40. This VM's disk moves ~900
MB/s, so every comparison with ``cp`` on it measures the CPU, not the disk. Here: an
ext4 filesystem on a loop device whose image file is read and written with O_DIRECT
(so the host's page cache does not serve it), and the kernel's block throttle on that
device, read and write, in the root blkio cgroup (cgroup v1), which also holds the
kernel's writeback threads: buffered writes are flushed at the throttled rate too, as
they are on a slow disk.

Needs root, ``losetup``, ``mkfs.ext4`` and cgroup v1's blkio controller at
/sys/fs/cgroup/blkio; says which is missing otherwise. cgroup v2's ``io.max`` is not
settable on the root cgroup, and writes by the writeback threads would escape a child.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

BLKIO = Path("/sys/fs/cgroup/blkio")
THROTTLES = ("blkio.throttle.read_bps_device", "blkio.throttle.write_bps_device")


class SlowDiskUnavailable(RuntimeError):
    pass


def why_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (losetup, mount and the blkio throttle)"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    missing = [name for name in THROTTLES if not (BLKIO / name).exists()]
    if missing:
        return f"needs cgroup v1's blkio throttle ({BLKIO / missing[0]} does not exist)"
    return None


def _run(*argv: str) -> str:
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0:
        raise SlowDiskUnavailable(f"{' '.join(argv)}: exit {res.returncode}: {res.stderr.strip()}")
    return res.stdout.strip()


def _throttle(device: str, bytes_per_second: int) -> None:
    """0 lifts the limit."""
    major_minor = _run("lsblk", "-dno", "MAJ:MIN", device).replace(" ", "")
    for name in THROTTLES:
        (BLKIO / name).write_text(f"{major_minor} {bytes_per_second}\n")


@contextlib.contextmanager
def slow_disk(mbytes_per_second: float, size_gb: float, image_dir: Path) -> Iterator[Path]:
    """A mounted, empty ext4 filesystem that reads and writes at ``mbytes_per_second``
    MB/s each; unmounted and removed at the end."""
    reason = why_unavailable()
    if reason:
        raise SlowDiskUnavailable(f"a slow disk {reason}")
    work = Path(tempfile.mkdtemp(prefix="adb-slow-disk-", dir=image_dir))
    image, mountpoint = work / "disk.img", work / "mnt"
    device = None
    mounted = False
    try:
        with open(image, "wb") as fh:
            fh.truncate(int(size_gb * 1e9))
        device = _run("losetup", "--find", "--show", "--direct-io=on", str(image))
        _run("mkfs.ext4", "-q", "-F", device)
        mountpoint.mkdir()
        _run("mount", device, str(mountpoint))
        mounted = True
        _throttle(device, int(mbytes_per_second * 1e6))
        yield mountpoint
    finally:
        if device:
            with contextlib.suppress(SlowDiskUnavailable, OSError):
                _throttle(device, 0)
        if mounted:
            subprocess.run(["umount", str(mountpoint)], check=False)
        if device:
            subprocess.run(["losetup", "-d", device], check=False)
        shutil.rmtree(work, ignore_errors=True)
