"""What a worker killed with SIGKILL leaves running is stopped when a worker starts
(services/worker/private_dir.py sweep_orphans), and nothing a live attempt holds is
touched. The "killed worker" is a real process that locks a private directory, starts a
downloader in its own session, records its group, and dies of SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from services.worker import private_dir, process
from shared import layout
from tests.system import REPO, wait_for
from tests.unit.test_post_step import running

# Locks the private directory of job <job>, starts `sleep 60` in its own session (as
# ani-cli is), records the group in the lock file, says the pid, then waits to be killed.
WORKER = textwrap.dedent("""
    import sys, subprocess, time
    from pathlib import Path
    from services.worker import process
    from services.worker.private_dir import PrivateDir
    d = PrivateDir(Path(sys.argv[1]), int(sys.argv[2]), 1)
    d.lock()
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    process.record_group(d.lock_fd, child.pid)
    print(child.pid, flush=True)
    time.sleep(60)  # sync-ok: a holder of the lock that the test kills
""")


@pytest.fixture
def workers(tmp_path: Path):
    """Start "workers" that each hold job N's directory with a downloader running."""
    started: list[tuple[subprocess.Popen, int]] = []

    def start(job_id: int) -> tuple[subprocess.Popen, int]:
        proc = subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), str(job_id)],
                                cwd=REPO, stdout=subprocess.PIPE, text=True)
        child = int(proc.stdout.readline())
        started.append((proc, child))
        return proc, child

    yield start
    for proc, child in started:
        for pid in (proc.pid, child):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def test_a_killed_worker_s_downloader_is_killed_at_the_next_worker_start(tmp_path: Path,
                                                                         workers) -> None:
    worker, orphan = workers(4)
    worker.kill()  # SIGKILL: the worker's lock goes, its downloader runs on
    worker.wait()
    assert running(orphan)
    assert private_dir.sweep_orphans(tmp_path) == 1
    wait_for(lambda: not running(orphan), 5, "the orphaned downloader to be killed")
    lock = layout.job_dir(tmp_path, 4) / private_dir.LOCK_FILE
    assert lock.read_bytes() == b""  # the record is gone: nobody kills by it again
    assert private_dir.sweep_orphans(tmp_path) == 0


def test_a_directory_whose_lock_is_held_is_not_touched(tmp_path: Path, workers) -> None:
    _, child = workers(5)  # alive: its attempt holds the lock
    lock = layout.job_dir(tmp_path, 5) / private_dir.LOCK_FILE
    record = lock.read_bytes()
    assert private_dir.sweep_orphans(tmp_path) == 0
    assert running(child) and lock.read_bytes() == record


def test_a_recorded_pid_that_is_now_another_process_is_not_killed(tmp_path: Path) -> None:
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)  # not ours: other start time
    try:
        d = private_dir.PrivateDir(tmp_path, 6, 1)
        d.lock()
        os.pwrite(d.lock_fd, f"{other.pid} 1\n".encode(), 0)
        os.close(d.lock_fd)  # as a killed worker lets go: the record stays
        assert private_dir.sweep_orphans(tmp_path) == 0
        assert running(other.pid)
    finally:
        other.kill()
        other.wait()


def test_the_sweep_creates_nothing(tmp_path: Path) -> None:
    assert private_dir.sweep_orphans(tmp_path / "gone") == 0  # no storage: nothing to do
    job_dir = layout.job_dir(tmp_path, 7)
    job_dir.mkdir(parents=True)
    assert private_dir.sweep_orphans(tmp_path) == 0
    assert list(job_dir.iterdir()) == []  # no lock file made


def test_an_attempt_that_ends_erases_its_record(tmp_path: Path) -> None:
    d = private_dir.PrivateDir(tmp_path, 8, 1)
    d.lock()
    process.record_group(d.lock_fd, os.getpid())
    d.release()
    assert (d.path / private_dir.LOCK_FILE).read_bytes() == b""
