"""The dispatcher on a stop request: it records the hand-backs of workers that stop with
it, and a stop that has none to wait for stays as fast as before.

kill -9 of supervisord: the kernel sends every program SIGTERM at once (they ask for it
with PR_SET_PDEATHSIG), so the workers' hand-backs (JobFailed interrupted) reach a
dispatcher that is stopping too; it keeps its loop until they are recorded.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.integration.test_launcher import (EPISODES, all_hanging,
                                             assert_nothing_left_and_jobs_queued,
                                             hanging_downloads)
from tests.system import wait_for

pytestmark = pytest.mark.slow


def test_kill_9_of_supervisord_hands_every_download_back_without_a_retry(make_system) -> None:
    system = make_system()
    hanging_downloads(system)
    system.start_supervisord(EPISODES)
    wait_for(lambda: all_hanging(system), 30, "three downloads hanging half-way")
    supervisord = system.rpc().supervisor.getPID()
    t0 = time.monotonic()
    os.kill(supervisord, signal.SIGKILL)
    # every process ends, and each download is back in the queue, no retry counted
    assert_nothing_left_and_jobs_queued(system, t0)


def test_a_normal_stop_finds_nothing_to_wait_for_and_stays_fast(make_system) -> None:
    """supervisord stops the workers first (they hand their jobs back), then the
    dispatcher: it has no lease left to wait for and ends at once."""
    system = make_system()
    hanging_downloads(system)
    launcher = system.start_supervisord(EPISODES)
    wait_for(lambda: all_hanging(system), 30, "three downloads hanging half-way")
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 0
    log = system.log("dispatcher")
    assert "stop requested" in log and "dispatcher stopped" in log, log[-2000:]
    assert "waiting for the hand-backs" not in log, log[-2000:]
    jobs = [(j["stage"], j["retry_count"]) for j in system.jobs()]
    assert jobs == [("queued", 0)] * EPISODES, jobs
