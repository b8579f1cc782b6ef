"""Disk-aware coordination, end to end: the storage never passes hard_limit_gb.

Real processes under the real supervisord (disk-watcher, dispatcher, workers)
and the simulated ani-cli, with tiny thresholds (a few hundred kB). The test
plays the transcriber: it deletes landed videos to make room. Storage usage is
sampled like ``du`` (``DiskMonitor.full_walk``) on every poll of every wait.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from shared.config import GB, MB, load_config
from shared.disk import DiskMonitor
from shared.sockets import Sockets
from services.status import NoAnswer, fetch_status
from tests.system import System, mount_tmpfs, unmount, wait_for

pytestmark = pytest.mark.slow

KB = 1000
TITLE = "Disk Budget"
MAL_ID = 4242
POLL = 0.02  # seconds between samples in the waits below


def disk_config(pause_kb: float, resume_kb: float, hard_kb: float, expected_kb: float,
                min_free_gb: float = 0.0, workers: int = 4) -> dict:
    return {"disk_management": {
        "pause_threshold_gb": pause_kb * KB / GB, "resume_threshold_gb": resume_kb * KB / GB,
        "hard_limit_gb": hard_kb * KB / GB, "expected_episode_size_mb": expected_kb * KB / MB,
        "min_free_gb": min_free_gb, "max_concurrent_downloads": workers,
        "cache_duration_seconds": 1}}


def catalog(system: System, episodes: int, size: int, duration: float,
            episode_behaviour: dict | None = None, title: str = TITLE) -> None:
    """One anime (query TITLE); ``title`` is the site's title, which names ani-cli's file."""
    result = {"title": title, "episodes": episodes, "behaviour": {"size": size, "duration": duration}}
    if episode_behaviour:
        result["episode_behaviour"] = {str(k): v for k, v in episode_behaviour.items()}
    system.write_catalog({"defaults": {"size": size, "duration": duration},
                          "anime": [{"query": TITLE, "results": [result]}]})


class Probe:
    """Samples the storage's usage (allocated bytes, as ``du``) and remembers the peak."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.monitor = DiskMonitor(system.storage, cache_duration_seconds=0)
        self.peak = 0

    def usage(self) -> int:
        total = self.monitor.full_walk().total
        self.peak = max(self.peak, total)
        return total

    def wait(self, predicate, timeout: float, what: str):
        def sampled():
            self.usage()
            return predicate()
        return wait_for(sampled, timeout, what, interval=POLL)

    def never(self, predicate, seconds: float) -> bool:
        """Sample for ``seconds``; True if ``predicate`` stayed false all along."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.usage()
            if predicate():
                return False
            time.sleep(POLL)  # sync-ok: polling interval of a bounded wait for what must not happen
        return True


def status(system: System) -> dict:
    config = load_config(system.config_path)
    sockets = Sockets(config)
    try:
        return fetch_status(sockets, config.zmq.status, 2.0)
    finally:
        sockets.close()


def start(system: System, workers: int) -> None:
    """supervisord with ``workers`` workers, once the dispatcher answers."""
    system.start_supervisord(workers)

    def answers():
        try:
            return status(system)
        except NoAnswer:
            return None
    wait_for(answers, 30, "the dispatcher to answer status requests")


def counts(system: System) -> dict[str, int]:
    return system.stages()


def episode_files(system: System) -> list[Path]:
    return sorted((system.storage / "videos").glob("*/episodes/*"), key=lambda p: p.stat().st_mtime_ns)


def starts(system: System) -> int:
    return len(system.sim_runs("start"))


def claimed(system: System) -> int:
    """Jobs the dispatcher has handed out at least once."""
    return system.query("SELECT COUNT(*) FROM jobs WHERE attempt > 0")[0][0]


def transcribe_below(system: System, probe: Probe, limit: int) -> int:
    """Delete landed videos, oldest first, until usage is below ``limit``; returns how many."""
    deleted = 0
    for path in episode_files(system):
        if probe.usage() < limit:
            break
        path.unlink()
        deleted += 1
    return deleted


def test_fills_to_pause_never_past_hard_limit_and_resumes_when_transcribed(make_system):
    system = make_system(disk_config(pause_kb=500, resume_kb=300, hard_kb=700, expected_kb=100))
    catalog(system, episodes=12, size=100_000, duration=0.3)
    system.enqueue(MAL_ID, TITLE, list(range(1, 9)), selected_index=1)
    probe = Probe(system)
    start(system, 4)

    def stopped():  # nothing in flight, jobs queued, and the usage measured leaves no room
        c = counts(system)
        disk = status(system)["disk"]
        return (c.get("downloading", 0) == 0 and c.get("queued", 0) > 0 and disk["refusal"]
                and disk["usage_bytes"] is not None  # no state yet at the very start
                and disk["usage_bytes"] + 100_000 > 500 * KB and disk)
    disk = probe.wait(stopped, 30, "downloads to stop at the pause threshold with jobs still queued")
    assert disk["refusal"] == "disk paused: usage reached pause_threshold_gb" or (
        disk["refusal"].startswith("usage ")  # the budget, with its figures
        and disk["refusal"].endswith("would pass pause_threshold_gb 500.0 KB")), disk
    before = starts(system)
    assert probe.never(lambda: starts(system) > before, 1.5), "a download started above the budget"
    assert counts(system).get("queued", 0) > 0

    transcribe_below(system, probe, 300 * KB)
    probe.wait(lambda: starts(system) > before, 10, "downloads to resume after the transcriber")

    def finished():
        transcribe_below(system, probe, 300 * KB)
        return counts(system).get("downloaded", 0) == 8
    probe.wait(finished, 60, "every episode to download")
    assert probe.peak <= 700 * KB, f"usage peaked at {probe.peak} bytes, past hard_limit_gb"
    assert all(j["retry_count"] == 0 for j in system.jobs())


def test_hysteresis_stays_paused_between_resume_and_pause(make_system):
    system = make_system(disk_config(pause_kb=500, resume_kb=200, hard_kb=800, expected_kb=50,
                                     workers=2))
    catalog(system, episodes=6, size=50_000, duration=0.2)
    fillers = [system.storage / "audio" / f"filler{n}.bin" for n in range(6)]
    fillers[0].parent.mkdir(parents=True)
    for filler in fillers:  # 600 kB, above pause: paused from the start
        filler.write_bytes(b"\0" * 100_000)
    system.enqueue(MAL_ID, TITLE, [1, 2, 3, 4], selected_index=1)
    probe = Probe(system)
    start(system, 2)
    probe.wait(lambda: status(system)["disk"]["state"] == "paused", 20, "the disk state paused")

    for filler in fillers[3:]:  # usage between resume and pause: a job would fit the budget
        filler.unlink()
    probe.wait(lambda: (status(system)["disk"]["usage_bytes"] or 10**9) < 500 * KB, 10,
               "the disk-watcher to measure the smaller usage")
    disk = status(system)["disk"]
    assert disk["state"] == "paused" and disk["refusal"] == "disk paused: waiting for usage below resume_threshold_gb", disk
    assert probe.never(lambda: starts(system) > 0, 2.5), "a download started above resume_threshold_gb"

    for filler in fillers[:3]:
        filler.unlink()
    probe.wait(lambda: counts(system).get("downloaded", 0) == 4, 30, "downloads to resume below resume")
    assert probe.peak <= 800 * KB


def test_download_past_its_reservation_is_aborted_at_hard_limit_without_a_retry(make_system):
    # Reserved 50 kB each, but episode 1 writes 2 MB: usage reaches hard_limit_gb.
    system = make_system(disk_config(pause_kb=500, resume_kb=300, hard_kb=700, expected_kb=50,
                                     workers=2))
    catalog(system, episodes=2, size=50_000, duration=6.0, episode_behaviour={1: {"size": 2_000_000}})
    filler = system.storage / "audio" / "filler.bin"  # keeps the disk paused after the abort
    filler.parent.mkdir(parents=True)
    filler.write_bytes(b"\0" * 350_000)
    system.enqueue(MAL_ID, TITLE, [1, 2], selected_index=1)
    probe = Probe(system)
    start(system, 2)
    probe.wait(lambda: starts(system) == 2, 20, "both downloads to start")
    catalog(system, episodes=2, size=50_000, duration=0.2)  # what later runs will write

    def aborted():
        ends = system.sim_runs("end")
        return len(ends) == 2 and counts(system).get("queued", 0) == 2 and ends
    ends = probe.wait(aborted, 20, "both in-flight downloads to be aborted and requeued")
    assert {e["outcome"] for e in ends} == {"terminated"}, ends
    assert [j["retry_count"] for j in system.jobs()] == [0, 0]
    assert list(system.storage.rglob("*.part")) == [], "partial files left behind"
    assert "reason=hard_limit" in "".join(system.log(f"worker_{n:02d}") for n in (1, 2))
    assert probe.usage() < 500 * KB  # back to the filler and a few directories
    assert probe.never(lambda: starts(system) > 2, 1.5), "restarted while above resume_threshold_gb"

    filler.unlink()
    probe.wait(lambda: counts(system).get("downloaded", 0) == 2, 30, "both jobs to download after")
    assert [j["retry_count"] for j in system.jobs()] == [0, 0]


def test_full_filesystem_requeues_without_failing(make_system):
    system = make_system(disk_config(pause_kb=50_000, resume_kb=40_000, hard_kb=60_000,
                                     expected_kb=100, min_free_gb=0, workers=1))
    system.storage.mkdir()
    mount_tmpfs(system.storage, "2m")
    try:
        # 3 MB into a 2 MB filesystem: a real ENOSPC. The retry runs under another site
        # title, so the first attempt's partial file can be told apart from the retry's.
        catalog(system, episodes=1, size=3_000_000, duration=0.5)
        system.enqueue(MAL_ID, TITLE, [1], selected_index=1)
        start(system, 1)
        wait_for(lambda: starts(system) == 1, 20, "the first download to start")
        catalog(system, episodes=1, size=200_000, duration=2.0, title=f"{TITLE} v2")
        wait_for(lambda: starts(system) == 2, 20, "the job to be retried")
        assert [e["outcome"] for e in system.sim_runs("end")] == ["enospc"]
        assert list(system.storage.rglob(f"{TITLE} Episode 1.mp4*")) == [], \
            "the partial file of the attempt that hit ENOSPC is still there"
        job = system.jobs()[0]
        assert job["stage"] in ("queued", "downloading") and job["retry_count"] == 0, job
        wait_for(lambda: counts(system).get("downloaded", 0) == 1, 20, "the retry to land")
        job = system.jobs()[0]
        assert job["retry_count"] == 0 and job["video_size_bytes"] == 200_000, job
        system.wait_logged("worker_01", "reason=no_space")
        system.wait_logged("dispatcher", "requeued without counting a retry")
    finally:
        system.stop()
        unmount(system.storage)


def test_disk_watcher_down_stops_new_downloads_until_it_is_back(make_system):
    system = make_system(disk_config(pause_kb=50_000, resume_kb=40_000, hard_kb=60_000,
                                     expected_kb=50, workers=2))
    catalog(system, episodes=100, size=50_000, duration=0.3)
    system.enqueue(MAL_ID, TITLE, list(range(1, 81)), selected_index=1)  # more than it can do
    start(system, 2)
    wait_for(lambda: counts(system).get("downloaded", 0) >= 2, 20, "downloads to run")

    # kill -9: supervisord restarts it and downloads go on.
    pid = system.process_info("disk-watcher")["pid"]
    subprocess.run(["kill", "-9", str(pid)], check=True)
    wait_for(lambda: system.process_info("disk-watcher")["pid"] not in (0, pid) and
             system.process_info("disk-watcher")["statename"] == "RUNNING", 20,
             "supervisord to restart the disk-watcher")
    before = starts(system)
    wait_for(lambda: starts(system) >= before + 2, 20, "downloads to go on after the restart")

    # Down for longer than the staleness window: no new download may start.
    assert "stopped" in system.supervisorctl("stop", "disk-watcher").stdout
    wait_for(lambda: status(system)["disk"]["state"] == "stale", 15, "the dispatcher to see a stale state")
    before = claimed(system)  # the dispatcher's decisions (an ani-cli start lags its assignment)
    assert Probe(system).never(lambda: claimed(system) > before, 2.0), \
        "a job was handed out while the disk-watcher was down"
    system.wait_logged("dispatcher", "disk state is stale: handing out nothing")
    system.supervisorctl("start", "disk-watcher")
    wait_for(lambda: claimed(system) > before, 15, "downloads to resume with the disk-watcher back")


def test_min_free_above_the_filesystems_free_space_pauses(make_system):
    import psutil

    free_gb = psutil.disk_usage("/tmp").free / GB
    system = make_system(disk_config(pause_kb=50_000, resume_kb=40_000, hard_kb=60_000,
                                     expected_kb=50, min_free_gb=round(free_gb * 2 + 1), workers=2))
    catalog(system, episodes=4, size=50_000, duration=0.1)
    system.enqueue(MAL_ID, TITLE, [1, 2], selected_index=1)
    start(system, 2)
    disk = wait_for(lambda: (d := status(system)["disk"])["state"] == "paused" and d, 20,
                    "the disk state paused")
    assert "min_free_gb" in disk["refusal"], disk
    assert disk["free_bytes"] < disk["min_free_bytes"]
    assert Probe(system).never(lambda: starts(system) > 0, 2.0), "a download started"
    system.wait_logged("dispatcher", "min_free_gb")
    assert counts(system) == {"queued": 2}


@pytest.fixture
def hls_provider(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """The local HLS provider (real video: a remux needs it), and what the real yt-dlp
    inherits: no proxy for 127.0.0.1, no user configuration."""
    import shutil

    from services.worker import video
    from tests.fakes.provider import Provider
    from tests.system import BIN

    if not ((BIN / "yt-dlp").is_file() or shutil.which("yt-dlp")) or video.find_ffmpeg() is None:
        pytest.skip("needs yt-dlp and ffmpeg (pip install -e '.[test]')")
    for name in [n for n in os.environ if "proxy" in n.lower()]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    cache = tmp_path_factory.mktemp("hls")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(cache / "config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache / "cache"))
    with Provider(cache / "media") as p:
        yield p


def test_a_filesystem_of_exactly_hard_limit_never_fills_with_four_workers_remuxing(
        make_system, hls_provider) -> None:
    """Issue 21 §3: 4 MB episodes of real video into a tmpfs exactly as big as hard_limit_gb
    (pause at 3/4, resume at 1/2), four workers, container mkv: yt-dlp's fix-up and the
    MKV remux each hold a second copy of an episode for a moment. The transcriber frees
    space once downloads wait for it. No write may get ENOSPC, the filesystem never fills,
    nothing counts a retry."""
    episodes, hard = 6, 24_000 * KB
    system = make_system({
        **disk_config(pause_kb=18_000, resume_kb=12_000, hard_kb=24_000, expected_kb=4_000,
                      workers=4),
        "downloader": {"verify": True, "container": "mkv", "retry_backoff_seconds": 0,
                       "timeout_seconds": 60}})
    system.storage.mkdir()
    mount_tmpfs(system.storage, hard)
    try:
        slug = f"fill-{os.getpid()}"
        hls_provider.set_duration(slug, None, seconds=130)  # ~4 MB
        hls_provider.prepare(slug, 1)  # generated before the clock runs (all share it)
        system.write_catalog({"defaults": {"size": 2048, "duration": 0.0}, "anime": [
            {"query": TITLE, "results": [{"title": TITLE, "episodes": episodes, "behaviour": {
                "hls_url": f"{hls_provider.base_url}/{slug}/{{episode}}/index.m3u8"}}]}]})
        system.enqueue(MAL_ID, TITLE, list(range(1, episodes + 1)), selected_index=1)
        fs_size = os.statvfs(system.storage).f_blocks * os.statvfs(system.storage).f_frsize
        assert hard <= fs_size < hard + 4096  # a page of rounding
        probe = Probe(system)
        least_free, in_flight_over = [fs_size], []
        start(system, 4)

        def finished() -> bool:
            vfs = os.statvfs(system.storage)
            least_free[0] = min(least_free[0], vfs.f_bavail * vfs.f_frsize)
            disk = status(system)["disk"]
            measured = probe.monitor.full_walk().in_progress
            if measured > disk["reserved_bytes"] + 1 * MB:  # reserved_bytes tells the truth
                in_flight_over.append((measured, disk["reserved_bytes"]))
            if disk["refusal"]:  # the transcriber frees space once downloads wait for it
                transcribe_below(system, probe, 12_000 * KB)
            return counts(system).get("downloaded", 0) == episodes
        probe.wait(finished, 120, "every episode to land")
        logs = "".join(system.log(name) for name in ["dispatcher", "disk-watcher"] +
                       [f"worker_{n:02d}" for n in range(1, 5)])
        assert "No space left on device" not in logs, [line for line in logs.splitlines()
                                                       if "No space left" in line][:5]
        print(f"\n[fill] peak usage {probe.peak} of {hard}, least free {least_free[0]} bytes")
        assert least_free[0] > 0, "the filesystem filled up"
        assert probe.peak <= hard
        assert all(j["retry_count"] == 0 for j in system.jobs()), system.jobs()
        assert in_flight_over == [], "reserved_bytes was less than what downloads occupied"
    finally:
        system.stop()
        unmount(system.storage)
