"""The storage is really the external disk (issue 21 §2), end to end.

Real processes under the real supervisord and the simulated ani-cli. The "USB disk"
is a tmpfs at ``<root>/disk`` that keeps its contents while it is bind-mounted at
``storage_dir`` and lazily unmounted from it (``umount -l``: the disk dropping off;
``storage_dir`` is then an empty mount point on the system disk) and mounted there
again (the disk coming back). Mounting needs root (as on CI); those tests skip
with the reason elsewhere. What is checked is what a user checks: the rows, the
files on the disk, the bare mount point, ``anime-status``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from shared.protocol import DiskStateMsg, decode
from shared.storage import MARKER_NAME
from tests.integration.test_disk_safety import catalog, counts, start, starts, status
from tests.system import System, wait_for

pytestmark = pytest.mark.slow

TITLE = "Disk Budget"  # the catalog helper's query
MAL_ID = 4242
OWN_STORAGE = {"data": {"create_storage_dir": False},  # the default: protect the system disk
               "disk_management": {"expected_episode_size_mb": 0.05, "min_free_gb": 0}}


class Disk:
    """A disk that can drop off and come back: a tmpfs bind-mounted at storage_dir."""

    def __init__(self, system: System) -> None:
        self.at = system.storage
        self.backing = system.root / "disk"
        self.backing.mkdir()
        self.at.mkdir(exist_ok=True)
        self.mounted: list[Path] = []
        self._mount(["-t", "tmpfs", "-o", "size=64m", "tmpfs", str(self.backing)], self.backing)
        self.plug()

    def _mount(self, args: list[str], where: Path) -> None:
        done = subprocess.run(["mount", *args], capture_output=True, text=True)
        if done.returncode != 0:
            self.close()
            pytest.skip(f"cannot mount here (needs root): {done.stderr.strip()}")
        self.mounted.append(where)

    def plug(self) -> None:
        self._mount(["--bind", str(self.backing), str(self.at)], self.at)

    def unplug(self) -> None:
        subprocess.run(["umount", "-l", str(self.at)], check=True)
        self.mounted.remove(self.at)

    def read_only(self, on: bool) -> bool:
        """Remount it read-only (or back); False while a file is open for writing (EBUSY)."""
        done = subprocess.run(["mount", "-o", f"remount,bind,{'ro' if on else 'rw'}", str(self.at)],
                              capture_output=True, text=True)
        assert done.returncode == 0 or "busy" in done.stderr, done.stderr
        return done.returncode == 0

    def close(self) -> None:
        for where in reversed(self.mounted):
            subprocess.run(["umount", "-l", str(where)], check=False)
        self.mounted.clear()


@pytest.fixture
def disk_system(make_system):
    disks: list[Disk] = []

    def make(overrides: dict | None = None) -> tuple[System, Disk]:
        system = make_system({**OWN_STORAGE, **(overrides or {})})
        disks.append(Disk(system))
        return system, disks[-1]

    yield make
    for d in disks:  # after the processes (make_system's cleanup runs later): lazy unmounts
        d.close()


def running_downloads(system: System) -> list[dict]:
    ended = {r["pid"] for r in system.sim_runs("end")}
    return [r for r in system.sim_runs("start") if r["pid"] not in ended]


def mid_download(system: System, workers: int, duration: float) -> bool:
    """Every worker is in the middle of a download: none just started (its ani-cli has made
    its directories) and none is about to land."""
    runs = running_downloads(system)
    now = time.time()
    return (len(runs) == workers and all(now - r["time"] > 0.3 for r in runs)
            and all(now - r["time"] < duration - 0.8 for r in runs))


def refusal_of(system: System) -> dict:
    disk = status(system)["disk"]
    return disk if disk["state"] == "unavailable" and disk["reason"] else {}


def handed_back(system: System, landed: int) -> bool:
    """Nothing in flight, and every job not landed back in the queue."""
    c = counts(system)
    return c.get("downloading", 0) == 0 and c.get("queued", 0) == sum(c.values()) - landed


def assert_nothing_written_while(system: System, seconds: float) -> None:
    """The bare mount point stays empty and no download starts, for ``seconds``."""
    before = len(system.sim_runs("start"))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert os.listdir(system.storage) == [], f"written on the bare mount point: " \
                                                 f"{sorted(p.name for p in system.storage.iterdir())}"
        assert len(system.sim_runs("start")) == before, "a download started"
        time.sleep(0.05)  # sync-ok: polling interval of a bounded check of what must not happen


def landed_on_the_disk(system: System, disk_dir: Path) -> None:
    """Every job the database calls downloaded has its file on the disk."""
    for job in system.jobs():
        if job["stage"] == "downloaded":
            on_disk = disk_dir / Path(job["video_path"]).relative_to(system.storage)
            assert on_disk.is_file(), f"job {job['id']} is downloaded but not on the disk: {job}"


def test_a_disk_that_drops_off_mid_run_stops_everything_and_work_resumes_when_it_is_back(
        disk_system) -> None:
    system, disk = disk_system()
    catalog(system, episodes=12, size=50_000, duration=2.0)
    system.enqueue(MAL_ID, TITLE, list(range(1, 13)), selected_index=1)
    start(system, 3)
    wait_for(lambda: counts(system).get("downloaded", 0) >= 3 and mid_download(system, 3, 2.0),
             40, "3 episodes landed and 3 downloads half-way")
    landed = counts(system)["downloaded"]

    disk.unplug()
    disk_state = wait_for(lambda: refusal_of(system), 10, "anime-status to say unavailable")
    assert disk_state["reason"] == \
        f"storage_dir {system.storage} is no longer a mount point (is the disk mounted?)"
    assert disk_state["refusal"] == f"storage unavailable: {disk_state['reason']}"
    wait_for(lambda: handed_back(system, landed) and not running_downloads(system), 15,
             "the running downloads to be stopped and handed back")
    assert all(j["retry_count"] == 0 for j in system.jobs()), system.jobs()
    text = system.run("anime-status", "-c", str(system.config_path)).stdout
    assert f"storage unavailable: storage_dir {system.storage}" in text, text
    assert_nothing_written_while(system, 2.0)
    assert counts(system)["downloaded"] == landed
    system.wait_logged("disk-watcher", "storage unavailable reason=")

    disk.plug()
    wait_for(lambda: counts(system).get("downloaded", 0) == 12, 60, "every episode to land")
    assert all(j["retry_count"] == 0 for j in system.jobs()), system.jobs()
    landed_on_the_disk(system, disk.backing)
    assert len(list((disk.backing / "videos" / str(MAL_ID) / "episodes").iterdir())) == 12
    assert status(system)["disk"]["state"] == "running"


def test_a_disk_remounted_read_only_pauses_the_work_without_a_retry(disk_system) -> None:
    system, disk = disk_system()
    catalog(system, episodes=30, size=50_000, duration=0.0)  # files open for a moment only:
    system.enqueue(MAL_ID, TITLE, list(range(1, 31)), selected_index=1)  # a remount can get in
    start(system, 2)
    wait_for(lambda: counts(system).get("downloaded", 0) >= 2, 30, "two episodes to land")

    wait_for(lambda: disk.read_only(True), 10, "a moment with no file open for writing")
    disk_state = wait_for(lambda: refusal_of(system), 10, "anime-status to say unavailable")
    assert disk_state["reason"] == f"storage_dir {system.storage} is read-only (remount it read-write)"
    landed = counts(system)["downloaded"]
    wait_for(lambda: handed_back(system, landed), 15, "every job back in the queue")
    assert all(j["retry_count"] == 0 for j in system.jobs()), system.jobs()
    before = starts(system)
    time.sleep(1.5)  # sync-ok: a window in which no download may start
    assert starts(system) == before and counts(system)["downloaded"] == landed

    disk.read_only(False)
    wait_for(lambda: counts(system).get("downloaded", 0) == 30, 60, "every episode to land")
    assert all(j["retry_count"] == 0 for j in system.jobs()), system.jobs()


def test_a_deleted_marker_makes_the_storage_unavailable_until_it_is_back(make_system) -> None:
    system = make_system(OWN_STORAGE)  # a plain directory: no mount needed
    system.storage.mkdir()
    catalog(system, episodes=6, size=50_000, duration=2.0)
    system.enqueue(MAL_ID, TITLE, list(range(1, 7)), selected_index=1)
    start(system, 2)
    wait_for(lambda: counts(system).get("downloaded", 0) >= 1 and mid_download(system, 2, 2.0),
             40, "an episode landed and 2 downloads half-way")
    landed = counts(system)["downloaded"]

    marker = system.storage / MARKER_NAME
    saved = marker.read_bytes()
    marker.unlink()
    disk_state = wait_for(lambda: refusal_of(system), 10, "anime-status to say unavailable")
    assert disk_state["reason"] == \
        f"storage_dir {system.storage} has lost its marker {MARKER_NAME} (is the disk mounted?)"
    wait_for(lambda: handed_back(system, landed) and not running_downloads(system), 15,
             "the running downloads to be stopped and handed back")
    assert all(j["retry_count"] == 0 for j in system.jobs()), system.jobs()
    assert counts(system)["downloaded"] == landed

    marker.write_bytes(saved)
    wait_for(lambda: counts(system).get("downloaded", 0) == 6, 40, "every episode to land")
    assert all(j["retry_count"] == 0 for j in system.jobs()), system.jobs()


def test_a_second_installation_on_the_same_storage_is_refused(make_system) -> None:
    first = make_system(OWN_STORAGE)
    first.storage.mkdir()
    catalog(first, episodes=2, size=50_000, duration=6.0)
    first.enqueue(MAL_ID, TITLE, [1], selected_index=1)
    start(first, 1)
    private = first.storage / ".in_progress" / "job-1"
    wait_for(lambda: starts(first) == 1 and private.is_dir(), 20, "the first one's download to run")

    second = make_system({**OWN_STORAGE, "data": {"storage_dir": str(first.storage),
                                                  "create_storage_dir": False}})
    catalog(second, episodes=2, size=50_000, duration=0.1)
    second.enqueue(MAL_ID, TITLE, [1, 2], selected_index=1)  # job ids 1 and 2 again
    result = second.run("anime-downloader", "-c", str(second.config_path), "--exit-when-done",
                        timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(first.data) in lines[0] and str(second.data) in lines[0], lines
    assert "belongs to another installation" in lines[0]

    # Its services run directly (under a supervisord of its own): they refuse to sweep
    # or hand out anything on a storage that is not theirs.
    dispatcher = second.spawn("anime-dispatcher", "-c", str(second.config_path))
    wait_for(lambda: "not sweeping private directories" in second.output(dispatcher), 20,
             "the second dispatcher to leave the first one's private directories alone")
    assert private.is_dir(), "the second installation removed the first one's download"
    wait_for(lambda: counts(first).get("downloaded", 0) == 1, 30, "the first one's job to land")
    assert first.jobs()[0]["retry_count"] == 0 and second.stages() == {"queued": 2}


def test_a_missing_storage_dir_is_refused_at_start_unless_the_config_says_create_it(
        make_system) -> None:
    system = make_system(OWN_STORAGE)
    result = system.run("anime-downloader", "-c", str(system.config_path), "--exit-when-done",
                        timeout=30)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == (
        f"anime-downloader: storage_dir {system.storage} does not exist (is the disk mounted?); "
        "mount it, or set [data] create_storage_dir = true to create it")
    assert not system.storage.exists()
    assert not (system.data / "run").exists(), "it started something before refusing"

    # A service started (or restarted) on its own does not refuse: it says why, and waits.
    watcher = system.spawn("anime-disk-watcher", "-c", str(system.config_path))
    state = next_disk_state(system)
    assert (state.state, state.reason) == (
        "unavailable", f"storage_dir {system.storage} does not exist (is the disk mounted?)")
    assert watcher.poll() is None and not system.storage.exists()
    system.stop()

    config = system.config_path.read_text().replace("create_storage_dir = false",
                                                    "create_storage_dir = true")
    system.config_path.write_text(config)
    catalog(system, episodes=1, size=1000, duration=0.0)
    system.enqueue(MAL_ID, TITLE, [1], selected_index=1)
    result = system.run("anime-downloader", "-c", str(system.config_path), "--exit-when-done",
                        timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "summary: downloaded=1" in result.stdout
    marker = json.loads((system.storage / MARKER_NAME).read_text())
    assert marker["root_dir"] == str(system.data)


def next_disk_state(system: System) -> DiskStateMsg:
    import zmq

    from shared.config import load_config

    ctx = zmq.Context()
    try:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, DiskStateMsg.KIND.encode())
        sub.connect(load_config(system.config_path).zmq.disk_state)
        assert sub.poll(20_000), "no disk state within 20 s"
        msg = decode(sub.recv_multipart())
        assert isinstance(msg, DiskStateMsg)
        return msg
    finally:
        ctx.destroy(linger=0)
