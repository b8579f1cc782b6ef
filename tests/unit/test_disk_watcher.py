"""The disk-watcher's cadence while downloads run: fast near a threshold, relaxed far away."""

from __future__ import annotations

from pathlib import Path

from services.disk_watcher.core import ASSUMED_WRITE_BPS, HEADROOM_SECONDS, DiskWatcher
from shared.config import GB, load_config
from shared.disk import DiskUsage
from tests.system import render_toml


def watcher(tmp_path: Path, pause_gb: float = 280, min_free_gb: float = 5) -> DiskWatcher:
    tables = {
        "data": {"root_dir": "data", "storage_dir": "storage"},
        "disk_management": {"hard_limit_gb": 300, "pause_threshold_gb": pause_gb,
                            "resume_threshold_gb": pause_gb - 30, "min_free_gb": min_free_gb},
        "zmq": {"dispatcher": "tcp://127.0.0.1:1", "status": "tcp://127.0.0.1:2",
                "disk_state": "tcp://127.0.0.1:3", "disk_control": "tcp://127.0.0.1:4"},
    }
    path = tmp_path / "config.toml"
    path.write_text(render_toml(tables))
    return DiskWatcher(load_config(path))


def usage(videos: float, free: float, at: float) -> DiskUsage:
    return DiskUsage(videos=int(videos), audio=0, transcripts=0, in_progress=0, other=0,
                     free_bytes=int(free), measured_at=at, full_walk=False)


def test_unknown_until_the_first_measurement(tmp_path: Path) -> None:
    assert watcher(tmp_path).near_a_threshold()


def test_far_from_every_threshold_at_download_speeds_is_relaxed(tmp_path: Path) -> None:
    w = watcher(tmp_path)
    for i in range(5):  # 50 MB/s into a disk with 270 GB of headroom
        w.observe(usage(10 * GB + i * 50e6, 900 * GB - i * 50e6, at=100.0 + i), now=100.0 + i)
    assert not w.near_a_threshold()


def test_near_pause_at_the_assumed_link_speed(tmp_path: Path) -> None:
    w = watcher(tmp_path)
    headroom = ASSUMED_WRITE_BPS * HEADROOM_SECONDS * 0.9
    w.observe(usage(280 * GB - headroom, 900 * GB, at=100.0), now=100.0)
    assert w.near_a_threshold()


def test_fast_growth_seen_lately_counts_even_far_from_pause(tmp_path: Path) -> None:
    w = watcher(tmp_path)
    w.observe(usage(10 * GB, 900 * GB, at=100.0), now=100.0)
    w.observe(usage(40 * GB, 870 * GB, at=101.0), now=101.0)  # 30 GB in a second
    assert w.near_a_threshold()  # 240 GB left: 8 s at that rate
    for i in range(2, 8):  # then it calms down; the burst ages out after five intervals
        w.observe(usage(40 * GB, 870 * GB, at=100.0 + i), now=100.0 + i)
    assert not w.near_a_threshold()


def test_free_space_taken_by_others_counts_as_growth(tmp_path: Path) -> None:
    w = watcher(tmp_path, min_free_gb=5)
    w.observe(usage(10 * GB, 6 * GB, at=100.0), now=100.0)  # 1 GB above min_free
    assert w.near_a_threshold()


def test_an_unavailable_storage_is_published_with_its_reason_and_the_state_stands_still(
        tmp_path: Path) -> None:
    w = watcher(tmp_path)
    first = w.observe(usage(290 * GB, 900 * GB, at=100.0), now=100.0, storage_id="abc")
    assert first.state == "paused" and first.reason == "" and first.storage_id == "abc"
    why = "storage_dir /srv/anime has lost its marker (is the disk mounted?)"
    # The bare mount point measures as empty: that must not read as "below resume".
    gone = w.observe(usage(0, 900 * GB, at=101.0), now=101.0, problem=why)
    assert (type(gone).__name__, gone.state, gone.reason) == ("DiskStateMsg", "unavailable", why)
    assert w.observe(usage(0, 900 * GB, at=102.0), now=102.0, problem=why).state == "unavailable"
    back = w.observe(usage(290 * GB, 900 * GB, at=103.0), now=103.0, storage_id="abc")
    assert (type(back).__name__, back.state, back.reason) == ("DiskStateMsg", "paused", "")
