"""A worker killed with SIGKILL leaves its ani-cli running in its own session; the worker
supervisord starts in its place stops it within the restart, not when (or if) a later
attempt of that job comes back to the private directory (issue 21 §4).
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.integration.test_crash_safety import hanging, pid_alive, running
from tests.system import wait_for

pytestmark = pytest.mark.slow


def test_a_killed_worker_s_ani_cli_stops_when_the_worker_is_restarted(make_system) -> None:
    # The retry waits 90 s or more: within this test only the restarted worker can stop it.
    system = make_system({"downloader": {"retry_backoff_seconds": 120}})
    catalog = {"defaults": {"size": 2048, "duration": 0.0}, "anime": []}
    system.add_anime(catalog, "Long Show", [{"title": "Long Show (site)", "episodes": 1,
                                             "behaviour": {"size": 200_000, "hang": True}}])
    system.write_catalog(catalog)
    system.enqueue(902, "Long Show", [1], selected_index=1)
    system.start_supervisord(1)
    # a hung ani-cli writes nothing more, so the closed pipes of its dead worker do not
    # end it (one that writes dies of SIGPIPE)
    wait_for(lambda: hanging(system, 200_000), 30, "ani-cli hanging half-way")
    orphan = system.sim_runs("start")[0]["pid"]
    os.kill(wait_for(lambda: running(system, "worker:worker_01"), 10, "worker_01 RUNNING"),
            signal.SIGKILL)
    wait_for(lambda: not pid_alive(orphan), 15, "the orphaned ani-cli to be stopped")
    assert len(system.sim_runs("start")) == 1, "a retry started: it, not the restart, stopped it"
    system.wait_logged("worker_01", "killed ani-cli left running by a killed worker")
    # the job is back in the queue for its retry, counted (its worker died during it)
    wait_for(lambda: system.stages() == {"queued": 1}, 15, f"the job requeued ({system.stages()})")
    assert system.jobs()[0]["retry_count"] == 1
