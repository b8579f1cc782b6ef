"""Tests of shared.disk: du-compatible measurement, incremental re-measure, cache, state machine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    from shared import disk
except ModuleNotFoundError:  # pytest run without the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from shared import disk

from shared.disk import IN_PROGRESS_DIRNAME, DiskMonitor, DiskState, DiskUsage, Thresholds, next_state
from shared.config import GB

pytestmark = pytest.mark.skipif(shutil.which("du") is None, reason="needs GNU du")

OLD_NS = 1_600_000_000 * 10**9  # 2020: far from "now", so directories with this mtime are stable


def du(path: Path) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1", str(path)], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[0])


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def make_tree(root: Path) -> None:
    write(root / "videos/1/episodes/ep001.mkv", 70_000)
    write(root / "videos/1/episodes/ep002.mkv", 5_000)
    write(root / "videos/2/episodes/ep001.mkv", 12_345)
    write(root / "audio/1/ep001.wav", 30_000)
    write(root / "transcripts/1/ep001.json", 1_000)
    write(root / IN_PROGRESS_DIRNAME / "job1/ep003.mkv.part", 40_000)
    write(root / "jobs.sqlite", 9_000)
    write(root / "logs/worker.log", 100)


def make_old(root: Path) -> None:
    """Give every directory an old mtime, so the monitor considers them stable."""
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, ns=(OLD_NS, OLD_NS))


def assert_matches_du(usage: DiskUsage, root: Path) -> None:
    assert usage.total == du(root)
    for cat, name in [("videos", "videos"), ("audio", "audio"), ("transcripts", "transcripts"), ("in_progress", IN_PROGRESS_DIRNAME)]:
        expected = du(root / name) if (root / name).exists() else 0
        assert getattr(usage, cat) == expected, cat
    assert usage.other == usage.total - usage.videos - usage.audio - usage.transcripts - usage.in_progress


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "storage"
    make_tree(root)
    return root


# -- measurement ----------------------------------------------------------------------


def test_full_walk_matches_du_with_breakdown(tree: Path, clock: FakeClock) -> None:
    usage = DiskMonitor(tree, clock=clock).measure()
    assert usage.full_walk
    assert_matches_du(usage, tree)
    assert usage.breakdown() == {c: getattr(usage, c) for c in ("videos", "audio", "transcripts", "in_progress", "other")}
    assert usage.other >= du(tree / "logs") + (tree / "jobs.sqlite").stat().st_blocks * 512
    assert usage.free_bytes > 0


def test_allocated_not_apparent_size(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "s"
    (root / "videos").mkdir(parents=True)
    with open(root / "videos/sparse.mkv", "wb") as f:
        f.truncate(50 * 10**6)  # sparse: 50 MB apparent, ~nothing allocated
    usage = DiskMonitor(root, clock=clock).measure()
    assert usage.total == du(root)
    assert usage.videos < 10**6


def test_hard_links_counted_once(tree: Path, clock: FakeClock) -> None:
    src = tree / "videos/1/episodes/ep001.mkv"
    os.link(src, tree / "audio/1/same.mkv")
    os.link(src, tree / "videos/1/episodes/again.mkv")
    usage = DiskMonitor(tree, clock=clock).measure()
    assert usage.total == du(tree)
    # Counted once in total, in one of the two categories.
    assert usage.videos + usage.audio == du(tree / "videos") + du(tree / "audio") - src.stat().st_blocks * 512


def test_symlinks_not_followed(tree: Path, tmp_path: Path, clock: FakeClock) -> None:
    big = write(tmp_path / "outside/big.bin", 2_000_000)
    os.symlink(big, tree / "videos/link.mkv")
    os.symlink(big.parent, tree / "linkdir")
    usage = DiskMonitor(tree, clock=clock).measure()
    assert usage.total == du(tree)
    assert usage.total < 1_000_000


def test_nonexistent_storage_dir_gives_zeros_and_creates_nothing(tmp_path: Path, clock: FakeClock) -> None:
    root = tmp_path / "not" / "yet"
    mon = DiskMonitor(root, clock=clock)
    usage = mon.measure()
    assert usage.total == 0 and usage.breakdown() == dict.fromkeys(usage.breakdown(), 0)
    assert usage.free_bytes > 0
    assert not (tmp_path / "not").exists()
    # Once created, it is measured.
    make_tree(root)
    clock.advance(10)
    assert_matches_du(mon.measure(), root)


def test_vanishing_file_between_scandir_and_stat_is_skipped(tree: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    real_scandir = os.scandir

    class Ghost:
        name = "ghost.mkv"
        path = "/nonexistent/ghost.mkv"

        def is_dir(self, follow_symlinks: bool = True) -> bool:
            return False

        def stat(self, follow_symlinks: bool = True) -> os.stat_result:
            raise FileNotFoundError(self.path)

    class Wrapper:
        def __init__(self, path: str) -> None:
            self.it = real_scandir(path)

        def __enter__(self) -> "Wrapper":
            return self

        def __exit__(self, *exc: object) -> None:
            self.it.close()

        def __iter__(self):  # type: ignore[no-untyped-def]
            yield Ghost()
            yield from self.it

    monkeypatch.setattr(disk.os, "scandir", Wrapper)
    usage = DiskMonitor(tree, clock=clock).measure()
    monkeypatch.undo()
    assert usage.total == du(tree)


def expected_videos_with_locked_2(tree: Path) -> int:
    # videos/2 counts its own blocks, nothing below it.
    return du(tree / "videos/1") + (tree / "videos").stat().st_blocks * 512 + (tree / "videos/2").stat().st_blocks * 512


def test_permission_error_on_scandir_is_skipped(tree: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    real_scandir = os.scandir
    locked = str(tree / "videos/2")

    def scandir(path: str):  # type: ignore[no-untyped-def]
        if path == locked:
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(disk.os, "scandir", scandir)
    usage = DiskMonitor(tree, clock=clock).measure()
    monkeypatch.undo()
    assert usage.videos == expected_videos_with_locked_2(tree)
    assert usage.audio == du(tree / "audio")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_unreadable_directory_is_skipped(tree: Path, clock: FakeClock) -> None:
    locked = tree / "videos/2"
    locked.chmod(0)
    try:
        usage = DiskMonitor(tree, clock=clock).measure()
        assert usage.videos == expected_videos_with_locked_2(tree)
    finally:
        locked.chmod(0o755)


# -- incremental re-measure --------------------------------------------------------------


@pytest.fixture
def monitored(tree: Path, clock: FakeClock) -> tuple[Path, DiskMonitor]:
    make_old(tree)
    mon = DiskMonitor(tree, cache_duration_seconds=5, full_walk_interval_seconds=300, clock=clock)
    assert mon.measure().full_walk
    return tree, mon


def remeasure(mon: DiskMonitor, clock: FakeClock) -> DiskUsage:
    clock.advance(6)  # past the cache duration, well before the full walk interval
    usage = mon.measure()
    assert not usage.full_walk
    return usage


def test_routine_remeasure_touches_only_changed_dirs(monitored: tuple[Path, DiskMonitor], clock: FakeClock) -> None:
    tree, mon = monitored
    usage = remeasure(mon, clock)
    assert_matches_du(usage, tree)
    # root + .in_progress + its job dir are always scanned; the stable dirs only stat'ed.
    assert mon.last_scanned_dirs == 3
    assert mon.last_stat_dirs == sum(1 for _ in os.walk(tree))


def test_incremental_new_episode_dir(monitored: tuple[Path, DiskMonitor], clock: FakeClock) -> None:
    tree, mon = monitored
    write(tree / "videos/3/episodes/ep001.mkv", 80_000)
    usage = remeasure(mon, clock)
    assert_matches_du(usage, tree)
    write(tree / "videos/3/episodes/extra/deep/file.bin", 20_000)  # a new nested subdir
    assert_matches_du(remeasure(mon, clock), tree)


def test_incremental_deleted_episode_dir(monitored: tuple[Path, DiskMonitor], clock: FakeClock) -> None:
    tree, mon = monitored
    before = mon.measure().videos
    shutil.rmtree(tree / "videos/1")
    usage = remeasure(mon, clock)
    assert_matches_du(usage, tree)
    assert usage.videos < before
    assert not any("videos/1" in p for p in mon._dirs)  # the cache forgot it


def test_incremental_dir_replaced_by_file(monitored: tuple[Path, DiskMonitor], clock: FakeClock) -> None:
    tree, mon = monitored
    shutil.rmtree(tree / "videos/2")
    write(tree / "videos/2", 3_000)
    assert_matches_du(remeasure(mon, clock), tree)
    (tree / "videos/2").unlink()
    write(tree / "videos/2/episodes/ep001.mkv", 6_000)
    assert_matches_du(remeasure(mon, clock), tree)


def test_incremental_file_growing_in_progress(monitored: tuple[Path, DiskMonitor], clock: FakeClock) -> None:
    tree, mon = monitored
    part = tree / IN_PROGRESS_DIRNAME / "job1/ep003.mkv.part"
    before = mon.measure().in_progress
    dir_mtime = part.parent.stat().st_mtime_ns
    with open(part, "ab") as f:
        f.write(b"y" * 500_000)
    assert part.parent.stat().st_mtime_ns == dir_mtime  # growth does not touch the dir
    usage = remeasure(mon, clock)
    assert_matches_du(usage, tree)
    assert usage.in_progress >= before + 400_000


def test_incremental_rename_from_in_progress_into_videos(monitored: tuple[Path, DiskMonitor], clock: FakeClock) -> None:
    tree, mon = monitored
    before = mon.measure()
    part = tree / IN_PROGRESS_DIRNAME / "job1/ep003.mkv.part"
    size = part.stat().st_blocks * 512
    os.rename(part, tree / "videos/1/episodes/ep003.mkv")
    usage = remeasure(mon, clock)
    assert_matches_du(usage, tree)
    assert usage.videos == before.videos + size
    assert usage.in_progress == before.in_progress - size
    assert usage.total == before.total


def test_in_place_growth_of_stable_dir_needs_full_walk(monitored: tuple[Path, DiskMonitor], clock: FakeClock) -> None:
    tree, mon = monitored
    before = mon.measure()
    with open(tree / "videos/1/episodes/ep002.mkv", "ab") as f:
        f.write(b"z" * 300_000)
    usage = remeasure(mon, clock)
    assert usage.total == before.total  # not re-read: the dir is stable and unchanged
    assert usage.total != du(tree)
    clock.advance(300)  # the full walk interval elapsed
    usage = mon.measure()
    assert usage.full_walk
    assert_matches_du(usage, tree)
    assert not remeasure(mon, clock).full_walk  # the interval restarted


def test_unstable_dir_is_rescanned(tree: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    # Directories modified within ~1 s of their scan are re-scanned (a second change in the
    # same mtime tick would otherwise be missed): here the tree was just written.  The window
    # is widened so that a slow test machine cannot make the fresh dirs look stable.
    monkeypatch.setattr(disk, "UNSTABLE_WINDOW_NS", 3600 * 10**9)
    mon = DiskMonitor(tree, clock=clock)
    mon.measure()
    episodes = tree / "videos/1/episodes"
    mtime = episodes.stat().st_mtime_ns
    with open(episodes / "ep002.mkv", "ab") as f:
        f.write(b"z" * 300_000)
    assert episodes.stat().st_mtime_ns == mtime
    assert_matches_du(remeasure(mon, clock), tree)
    assert mon._dirs[str(episodes)].unstable
    # The same dir once its mtime is old: stable, no longer re-scanned.
    os.utime(episodes, ns=(OLD_NS, OLD_NS))
    remeasure(mon, clock)  # ctime changed -> re-scanned once, now stable
    assert not mon._dirs[str(episodes)].unstable
    with open(episodes / "ep002.mkv", "ab") as f:
        f.write(b"z" * 300_000)
    assert remeasure(mon, clock).total != du(tree)


def test_full_walk_resets_incremental_cache(monitored: tuple[Path, DiskMonitor], clock: FakeClock) -> None:
    tree, mon = monitored
    with open(tree / "videos/1/episodes/ep002.mkv", "ab") as f:
        f.write(b"z" * 300_000)
    usage = mon.full_walk()
    assert usage.full_walk
    assert_matches_du(usage, tree)
    assert mon.measure() is usage  # full_walk() refreshes the cached value too


# -- cache -----------------------------------------------------------------------------


def test_cache_within_duration_does_not_rewalk(tree: Path, clock: FakeClock) -> None:
    mon = DiskMonitor(tree, cache_duration_seconds=5, clock=clock)
    first = mon.measure()
    write(tree / "videos/9/episodes/ep001.mkv", 100_000)
    clock.advance(4.9)
    assert mon.measure() is first
    clock.advance(0.2)
    second = mon.measure()
    assert second is not first and second.total > first.total
    assert_matches_du(second, tree)


def test_invalidate_and_force(tree: Path, clock: FakeClock) -> None:
    mon = DiskMonitor(tree, cache_duration_seconds=5, clock=clock)
    first = mon.measure()
    write(tree / "videos/9/episodes/ep001.mkv", 100_000)
    assert mon.measure() is first
    mon.invalidate()
    second = mon.measure()
    assert second.total > first.total
    assert mon.measure() is second
    write(tree / "audio/9/ep001.wav", 100_000)
    third = mon.measure(force=True)
    assert third.total > second.total
    assert_matches_du(third, tree)


# -- state machine ------------------------------------------------------------------------

T = Thresholds(pause_bytes=80 * GB, resume_bytes=60 * GB, hard_limit_bytes=95 * GB, min_free_bytes=5 * GB)
OK_FREE = 100 * GB
LOW_FREE = 1 * GB
R, P, H = DiskState.RUNNING, DiskState.PAUSED, DiskState.HARD_LIMIT


@pytest.mark.parametrize(
    ("previous", "usage_gb", "free", "expected"),
    [
        # running
        (R, 10, OK_FREE, R),
        (R, 70, OK_FREE, R),  # between resume and pause: stays running
        (R, 79.999, OK_FREE, R),
        (R, 80, OK_FREE, P),  # reaches pause
        (R, 90, OK_FREE, P),
        (R, 10, LOW_FREE, P),  # low free space pauses whatever the usage
        (R, 95, OK_FREE, H),
        (R, 200, LOW_FREE, H),
        # paused
        (P, 90, OK_FREE, P),
        (P, 70, OK_FREE, P),  # hysteresis: between resume and pause stays paused
        (P, 60, OK_FREE, P),  # resume needs usage strictly below resume
        (P, 59.999, OK_FREE, R),
        (P, 10, OK_FREE, R),
        (P, 10, LOW_FREE, P),  # below resume but free space still too low
        (P, 10, 5 * GB, R),  # free == min_free is enough
        (P, 95, OK_FREE, H),
        # hard limit
        (H, 95, OK_FREE, H),
        (H, 94.999, OK_FREE, P),
        (H, 10, OK_FREE, P),  # leaves through paused, then the resume rule applies
        (H, 10, LOW_FREE, P),
    ],
)
def test_next_state_table(previous: DiskState, usage_gb: float, free: int, expected: DiskState) -> None:
    assert next_state(previous, int(usage_gb * GB), free, T) is expected


def test_next_state_sequence_with_hysteresis() -> None:
    state = R
    seen = []
    for usage_gb in [50, 79, 81, 70, 61, 59, 70, 96, 90, 50, 50]:
        state = next_state(state, usage_gb * GB, OK_FREE, T)
        seen.append(state)
    assert seen == [R, R, P, P, P, R, R, H, P, R, R]
    assert DiskState("hard_limit") is H and H == "hard_limit"
