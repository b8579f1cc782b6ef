"""Disk usage of the storage directory, measured like ``du``, and the disk state machine.

``DiskMonitor`` counts ALLOCATED bytes (``st_blocks * 512``) like ``du -s --block-size=1``:
symlinks are not followed (their own blocks count), a hard-linked file counts once,
directories count their own blocks too.  A full walk of a 100,000-file tree costs
about as much as ``du`` itself (~0.3 s), so routine re-measures are incremental:

* a per-directory cache keeps ``(inode, mtime_ns, ctime_ns)`` of each directory, the
  allocated bytes of its direct non-directory entries and the names of its subdirs;
* a routine pass ``lstat``s every known directory and re-scans only those whose
  inode/mtime/ctime changed (adding/removing/renaming an entry changes the mtime),
  plus the "unstable" ones: a directory whose mtime was within ``UNSTABLE_WINDOW_NS``
  of its scan could have been modified again within the same timestamp tick (git's
  "racy clean" problem), so it is re-scanned until its mtime is old enough;
* ``.in_progress`` is always walked entirely: files there grow in place, which does
  not touch their directory's mtime;
* every ``full_walk_interval_seconds`` everything is walked again, to catch what the
  incremental pass cannot see (a finished file rewritten in place, a hard link made
  to a file of an unchanged directory).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable

import psutil

log = logging.getLogger(__name__)

from shared.layout import IN_PROGRESS_DIRNAME

BLOCK_SIZE = 512  # unit of st_blocks on Linux, whatever the filesystem block size
UNSTABLE_WINDOW_NS = 1_000_000_000  # dirs modified this close to their scan are re-scanned

CATEGORIES = ("videos", "audio", "transcripts", "in_progress", "other")
_TOP_LEVEL = {"videos": "videos", "audio": "audio", "transcripts": "transcripts", IN_PROGRESS_DIRNAME: "in_progress"}


def _category(top_level_name: str) -> str:
    return _TOP_LEVEL.get(top_level_name, "other")


@dataclass(frozen=True)
class DiskUsage:
    videos: int
    audio: int
    transcripts: int
    in_progress: int
    other: int
    free_bytes: int
    measured_at: float  # time.time() of the measurement
    full_walk: bool  # whether this measurement walked everything

    @property
    def total(self) -> int:
        return self.videos + self.audio + self.transcripts + self.in_progress + self.other

    def breakdown(self) -> dict[str, int]:
        return {c: getattr(self, c) for c in CATEGORIES}


@dataclass(frozen=True, slots=True)
class _Dir:
    """What a scan of one directory found (its own blocks are read from each pass's lstat)."""

    ino: int
    mtime_ns: int
    ctime_ns: int
    files: int  # allocated bytes of direct non-directory entries with st_nlink == 1
    links: dict[tuple[int, int], int]  # (dev, ino) -> allocated bytes, entries with st_nlink > 1
    subdirs: tuple[str, ...]  # full paths (joined once, at scan time)
    unstable: bool  # mtime too close to the scan: re-scan next time


def _scan(path: str, st: os.stat_result, now_ns: int, named: list[tuple[str, int, tuple[int, int] | None]] | None = None) -> _Dir:
    """Scan the direct entries of ``path`` (``st`` is its lstat taken BEFORE the scan).

    If ``named`` is given, each non-directory entry is also appended to it as
    ``(name, bytes, link_key or None)`` (used for the root, whose entries fall in different categories).
    """
    files = 0
    links: dict[tuple[int, int], int] = {}
    subdirs: list[str] = []
    try:
        with os.scandir(path) as it:
            for entry in it:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(entry.path)
                        continue
                    est = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # vanished between readdir and stat
                except OSError as exc:
                    log.debug("cannot stat %s: %s", entry.path, exc)
                    continue
                size = est.st_blocks * BLOCK_SIZE
                key = (est.st_dev, est.st_ino) if est.st_nlink > 1 else None
                if key is None:
                    files += size
                else:
                    links[key] = size
                if named is not None:
                    named.append((entry.name, size, key))
    except FileNotFoundError:
        pass  # removed since its lstat: the parent's change will be seen next pass
    except OSError as exc:  # PermissionError, NotADirectoryError (replaced by a file), ...
        log.debug("cannot scan %s: %s", path, exc)
    return _Dir(
        ino=st.st_ino,
        mtime_ns=st.st_mtime_ns,
        ctime_ns=st.st_ctime_ns,
        files=files,
        links=links,
        subdirs=tuple(subdirs),
        unstable=st.st_mtime_ns >= now_ns - UNSTABLE_WINDOW_NS,
    )


class DiskMonitor:
    """Measures ``storage_dir`` like ``du``; cached, incremental (see the module docstring)."""

    def __init__(
        self,
        storage_dir: Path,
        cache_duration_seconds: float = 5.0,
        full_walk_interval_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.storage_dir = Path(storage_dir)
        self.cache_duration_seconds = cache_duration_seconds
        self.full_walk_interval_seconds = full_walk_interval_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._dirs: dict[str, _Dir] = {}  # incremental cache: dir path -> last scan
        self._last: DiskUsage | None = None
        self._last_at = 0.0  # clock() of self._last
        self._last_full_at: float | None = None  # clock() of the last full walk
        self.last_scanned_dirs = 0  # directories scandir'd by the last measurement (for tests/bench)
        self.last_stat_dirs = 0  # directories visited (lstat'd) by the last measurement

    def invalidate(self) -> None:
        with self._lock:
            self._last = None

    def measure(self, force: bool = False) -> DiskUsage:
        """The cached usage, re-measured if ``force``, invalidated or older than the cache duration."""
        with self._lock:
            now = self._clock()
            if not force and self._last is not None and now - self._last_at < self.cache_duration_seconds:
                return self._last
            full = self._last_full_at is None or now - self._last_full_at >= self.full_walk_interval_seconds
            return self._measure(full, now)

    def full_walk(self) -> DiskUsage:
        """Walk everything now (also rebuilds the incremental cache)."""
        with self._lock:
            return self._measure(True, self._clock())

    # -- internals -----------------------------------------------------------------

    def _measure(self, full: bool, now: float) -> DiskUsage:
        usage = self._walk(full)
        self._last, self._last_at = usage, now
        if full:
            self._last_full_at = now
        return usage

    def _free_bytes(self) -> int:
        path = self.storage_dir.absolute()
        while not path.exists() and path != path.parent:
            path = path.parent
        try:
            return int(psutil.disk_usage(str(path)).free)
        except OSError as exc:
            log.debug("disk_usage(%s) failed: %s", path, exc)
            return 0

    def _walk(self, full: bool) -> DiskUsage:
        totals = dict.fromkeys(CATEGORIES, 0)
        free = self._free_bytes()
        root = str(self.storage_dir)
        old = {} if full else self._dirs
        new: dict[str, _Dir] = {}
        seen: set[tuple[int, int]] = set()
        scanned = visited = 0
        try:
            root_st = os.stat(root)  # the root itself may be a symlink (e.g. to a bigger disk)
        except OSError:
            root_st = None
        if root_st is None or not stat.S_ISDIR(root_st.st_mode):
            self._dirs = {}
            self.last_scanned_dirs = self.last_stat_dirs = 0
            return DiskUsage(**totals, free_bytes=free, measured_at=time.time(), full_walk=full)

        now_ns = time.time_ns()
        named: list[tuple[str, int, tuple[int, int] | None]] = []
        root_dir = _scan(root, root_st, now_ns, named)  # the root is always re-scanned: few entries
        scanned = visited = 1
        totals["other"] += root_st.st_blocks * BLOCK_SIZE
        for name, size, key in named:
            if key is None or key not in seen:
                totals[_category(name)] += size
                if key is not None:
                    seen.add(key)

        for top in root_dir.subdirs:  # one subtree per top-level dir: its category for everything below
            name = os.path.basename(top)
            always = name == IN_PROGRESS_DIRNAME  # files there grow in place: always re-walked
            nbytes = 0
            stack = [top]
            while stack:
                path = stack.pop()
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    log.debug("cannot stat %s: %s", path, exc)
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    continue  # replaced by a file since the parent's scan: counted next pass
                visited += 1
                d = old.get(path)
                if (
                    always
                    or d is None
                    or d.unstable
                    or d.mtime_ns != st.st_mtime_ns
                    or d.ctime_ns != st.st_ctime_ns
                    or d.ino != st.st_ino
                ):
                    d = _scan(path, st, now_ns)
                    scanned += 1
                new[path] = d
                nbytes += st.st_blocks * BLOCK_SIZE + d.files
                if d.links:
                    for key, size in d.links.items():
                        if key not in seen:
                            seen.add(key)
                            nbytes += size
                stack += d.subdirs
            totals[_category(name)] += nbytes

        self._dirs = new
        self.last_scanned_dirs, self.last_stat_dirs = scanned, visited
        return DiskUsage(**totals, free_bytes=free, measured_at=time.time(), full_walk=full)


# -- the disk state machine ---------------------------------------------------------------


class DiskState(str, Enum):
    RUNNING = "running"
    PAUSED = "paused"
    HARD_LIMIT = "hard_limit"


@dataclass(frozen=True)
class Thresholds:
    pause_bytes: int
    resume_bytes: int
    hard_limit_bytes: int
    min_free_bytes: int


def next_state(previous: DiskState, usage_bytes: int, free_bytes: int, t: Thresholds) -> DiskState:
    """Pure transition function with hysteresis (resume < pause <= hard_limit)."""
    if usage_bytes >= t.hard_limit_bytes:
        return DiskState.HARD_LIMIT
    low_free = free_bytes < t.min_free_bytes
    if previous == DiskState.RUNNING:
        return DiskState.PAUSED if usage_bytes >= t.pause_bytes or low_free else DiskState.RUNNING
    if previous == DiskState.HARD_LIMIT:
        return DiskState.PAUSED  # below the hard limit: only the resume rule leads back to running
    return DiskState.RUNNING if usage_bytes < t.resume_bytes and not low_free else DiskState.PAUSED
