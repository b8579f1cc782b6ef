"""Nobody left behind: however ``anime-downloader`` ends (its terminal closed, SIGTERM,
kill -9, Ctrl-C with its output piped to a reader that is gone), nothing it started
keeps running, and the downloads it interrupted are back in the queue without a
retry counted. A second launcher, or a second worker with a taken id, is refused
with one line naming the pid, before it changes anything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import pytest

from tests.system import System, wait_for

pytestmark = pytest.mark.slow

STOP_BOUND = 20.0  # the workers' stopwaitsecs: the longest supervisord waits for a program
EPISODES = 3
SIZE = 100_000


def installation_processes(system: System) -> list[str]:
    """Every live process of this installation (its root in the command line or the
    environment: supervisord, the services, ani-cli and its children), as text."""
    root = str(system.root)
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.cmdline())
            if root in cmdline or any(root in v for v in proc.environ().values()):
                found.append(f"{proc.pid} (ppid {proc.ppid()}): {cmdline[:100]}")
        except psutil.Error:
            continue
    return found


def hanging_downloads(system: System) -> None:
    """EPISODES jobs whose ani-cli writes half the file, then hangs until stopped."""
    catalog = {"defaults": {"size": 2048, "duration": 0.0}, "anime": []}
    system.add_anime(catalog, "Hang Show", [{"title": "Hang Show (site)", "episodes": EPISODES,
                                             "behaviour": {"size": SIZE, "hang": True,
                                                           "spawn_child": True}}])
    system.write_catalog(catalog)
    system.enqueue(700, "Hang Show", list(range(1, EPISODES + 1)), selected_index=1)


def all_hanging(system: System) -> bool:
    """Every download is in flight: a row each, and each ani-cli has its child and half its bytes."""
    parts = [p for d in system.private_dirs() for p in d.glob("dl/*.part") if p.stat().st_size >= SIZE // 2]
    return (system.stages().get("downloading", 0) == EPISODES and len(parts) == EPISODES
            and len(system.sim_runs("child")) == EPISODES)


def assert_nothing_left_and_jobs_queued(system: System, since: float) -> None:
    try:
        wait_for(lambda: not installation_processes(system), STOP_BOUND, "every process to end")
    except AssertionError:
        raise AssertionError("left running: " + "; ".join(installation_processes(system))) from None
    print(f"everything stopped {time.monotonic() - since:.2f}s after the signal")
    jobs = [(j["stage"], j["retry_count"]) for j in system.jobs()]
    assert jobs == [("queued", 0)] * EPISODES, jobs


def test_a_second_live_worker_with_the_same_id_is_refused(make_system) -> None:
    system = make_system()
    config = str(system.config_path)
    first = system.spawn("anime-worker", "-c", config, "--worker-id", "w01")
    wait_for(lambda: "worker started" in system.output(first), 20, "worker w01 running")
    second = system.run("anime-worker", "-c", config, "--worker-id", "w01", timeout=20)
    assert second.returncode == 3, second
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"already running (pid {first.pid})" in lines[0], second.stderr
    assert "worker w01" in lines[0]
    assert first.poll() is None
    other = system.spawn("anime-worker", "-c", config, "--worker-id", "w02")
    wait_for(lambda: "worker started" in system.output(other), 20, "worker w02 running beside it")
