"""``anime-ctl`` against the real system under supervisord (issue 18: operator controls).

Every command is run as the console script, over the real control endpoint, and
checked where a user would look: the database, the files, ``anime-status`` and the
logs. A manual pause holds across a kill -9 of the dispatcher; a cancelled job never
comes back; a retried failed job lands.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil

from tests.system import System, wait_for

SLOW, RUSH, BROKEN = 4242, 6161, 5151
BROKEN_ERROR = "Episode is released, but no valid sources!"


def ctl(system: System, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return system.run("anime-ctl", "-c", str(system.config_path), *args, timeout=timeout)


def ok(system: System, *args: str) -> str:
    """Run a command that must succeed: its one line of output."""
    result = ctl(system, *args)
    assert result.returncode == 0, (args, result.returncode, result.stdout, result.stderr)
    assert result.stdout.count("\n") == 1 and not result.stderr, (args, result.stdout, result.stderr)
    return result.stdout.strip()


def job(system: System, job_id: int) -> dict:
    return next(j for j in system.jobs() if j["id"] == job_id)


def downloading(system: System, job_id: int, attempt: int):
    """The status of a moment where ``job_id``'s ``attempt`` is downloading and has written."""
    def seen():
        status = system.status_json()
        for w in (status or {}).get("workers", []):
            j = w.get("job")
            if j and j["id"] == job_id and j["attempt"] == attempt and (j["bytes"] or 0) > 0:
                return status
        return None
    return wait_for(seen, 30, f"job {job_id} attempt {attempt} to download")


def kill_dispatcher(system: System) -> dict:
    """kill -9 the dispatcher; back when supervisord has restarted it and it answers with
    its first count of the queue (the pass runs on a thread of its own: counted_at)."""
    old = system.process_info("dispatcher")["pid"]
    os.kill(old, signal.SIGKILL)

    def back():
        info = system.process_info("dispatcher")
        status = system.status_json() if info["pid"] not in (0, old) else None
        return status if (status and status["dispatcher"]["pid"] == info["pid"]
                          and status["queue"]["counted_at"]) else None
    return wait_for(back, 30, "the dispatcher to be restarted after kill -9")


def workers_paused(system: System, count: int):
    def paused():
        status = system.status_json()
        workers = (status or {}).get("workers", [])
        if len(workers) == count and all(w["state"] == "paused" for w in workers):
            return status
        return None
    return wait_for(paused, 20, f"{count} workers to show as paused")


def test_a_manual_pause_holds_across_a_kill_9_and_ends_by_itself(make_system):
    system = make_system()
    system.write_catalog({"defaults": {"size": 2_000_000, "duration": 3.0}, "anime": [
        {"query": "Slow Show", "results": [{"title": "Slow Show", "episodes": 12}]}]})
    system.enqueue(SLOW, "Slow Show", [1, 2, 3, 4], selected_index=1)

    # Nothing runs: one line, exit 1, as anime-status says it.
    silent = ctl(system, "pause", "--timeout", "1")
    assert silent.returncode == 1 and silent.stdout == ""
    assert silent.stderr.startswith("anime-ctl: no answer from the dispatcher at ipc://")
    assert "(is anime-downloader running?)" in silent.stderr
    bad = ctl(system, "pause", "--for", "soon")
    assert bad.returncode == 2 and "anime-ctl: --for: must be a duration such as 30s" in bad.stderr

    system.start_supervisord(2)
    wait_for(lambda: len(system.sim_runs()) == 2, 30, "two downloads to start")
    line = ok(system, "pause")
    assert line == "paused until resumed; 2 running downloads finish", line
    # The running ones finish; nothing new starts, and a kill -9 does not lose the pause.
    wait_for(lambda: system.stages() == {"downloaded": 2, "queued": 2}, 30, "the two to land")
    status = workers_paused(system, 2)
    assert status["pause"]["paused"] and status["pause"]["by"] == "anime-ctl"
    assert status["pause"]["until"] is None
    assert status["disk"]["refusal"] == "paused by the operator"
    assert "paused     by the operator since" in system.status_text()
    kill_dispatcher(system)
    status = workers_paused(system, 2)  # the new dispatcher heard both and started nothing
    assert status["pause"]["paused"] and status["queue"]["queued"] == 2
    assert "paused by the operator (kept from before the restart)" in system.log("dispatcher")
    assert system.stages() == {"downloaded": 2, "queued": 2} and len(system.sim_runs()) == 2

    # pause --for: it ends by itself, and the rest lands.
    answer = json.loads(ok(system, "--json", "pause", "--for", "2s"))
    assert answer["ok"] and answer["message"].startswith("paused until ")
    assert 0 < answer["result"]["until"] - time.time() <= 2
    wait_for(lambda: system.stages() == {"downloaded": 4}, 40, "the queue to land after the pause")
    log = system.log("dispatcher")
    assert "paused by the operator source=anime-ctl" in log
    assert "manual pause over: resuming" in log
    assert not system.status_json()["pause"]["paused"]
    assert system.query("SELECT COUNT(*) FROM downloader_state") == [(0,)]


def test_each_command_against_the_running_system(make_system):
    system = make_system()
    slow = {"title": "Slow Show", "episodes": 12, "behaviour": {"duration": 8.0},
            "episode_behaviour": {"2": {"duration": 0.2}}}
    broken = {"title": "Broken Show", "episodes": 12,
              "episode_behaviour": {"1": {"fail": BROKEN_ERROR}}}
    catalog = {"defaults": {"size": 3_000_000, "duration": 0.2}, "anime": [
        {"query": "Slow Show", "results": [slow]},
        {"query": "Rush Show", "results": [{"title": "Rush Show", "episodes": 12}]},
        {"query": "Broken Show", "results": [broken]}]}
    system.write_catalog(catalog)
    system.enqueue(SLOW, "Slow Show", [1, 2, 3], selected_index=1)  # jobs 1-3
    system.enqueue(BROKEN, "Broken Show", [1], selected_index=1, max_retries=0)  # job 4
    system.enqueue(RUSH, "Rush Show", [1, 2], selected_index=1)  # jobs 5, 6
    system.start_supervisord(1)

    # pause --now: the running download goes back to the queue, no retry counted, its
    # partial file kept for the next attempt.
    downloading(system, 1, 1)
    line = ok(system, "pause", "--now")
    assert line.startswith("paused until resumed; 1 running download interrupted"), line
    wait_for(lambda: job(system, 1)["stage"] == "queued", 10, "job 1 back in the queue")
    row = job(system, 1)
    assert (row["retry_count"], row["attempt"], row["lease_owner"]) == (0, 1, None)
    partials = [p for p in (system.storage / ".in_progress" / "job-1").rglob("*.part")]
    assert partials and partials[0].stat().st_size > 0
    wait_for(lambda: "partials=kept" in system.log("worker_01"), 10, "the worker to stop it")
    status = workers_paused(system, 1)
    assert status["pause"]["interrupted"]

    # While paused: priorities, a cancel of a queued job, refusals with exit 2.
    assert ok(system, "priority", "--anime-id", str(RUSH), "high") == \
        f"MAL ID {RUSH}: 2 jobs at priority high (10)"
    assert system.query("SELECT id, priority FROM jobs WHERE priority != 0") == [(5, 10), (6, 10)]
    assert ok(system, "priority", "--job", "2", "-5") == "job 2: 1 job at priority -5"
    status = system.status_json()
    assert status["queue"]["priorities"][0] == {"anime_id": RUSH, "anime_title": "Rush Show",
                                                "priority": 10, "jobs": 2}
    assert "priority: Rush Show high (2 to do), Slow Show -5 (1 to do)" in system.status_text()
    assert ok(system, "cancel", "--job", "3").startswith("cancelled job 3 (Slow Show ep 3")
    assert job(system, 3)["stage"] == "cancelled"
    for args, words in [(("cancel", "--job", "999"), "no job 999 in the database"),
                        (("retry", "--job", "1"), "job 1 is queued"),
                        (("priority", "--anime-id", "1", "high"), "no job of MAL ID 1"),
                        (("bandwidth", "-3"), "MBPS")]:
        refused = ctl(system, *args)
        assert refused.returncode == 2 and words in refused.stderr, (args, refused.stderr)

    # resume: the higher priority first, then the interrupted job resumes (attempt 2).
    assert ok(system, "resume") == "resumed (the disk budget still applies)"
    downloading(system, 1, 2)
    started = {j["id"]: j["started_at"] for j in system.jobs()}
    assert started[5] < started[6] < started[1]
    assert [r["episode"] for r in system.sim_runs()][:4] == [1, 1, 2, 1]  # slow 1, rush 1-2, slow 1

    # bandwidth: the running download restarts at the new rate (no retry counted).
    line = ok(system, "bandwidth", "80")
    assert line == ("total bandwidth 80 Mbps (was unlimited) until the dispatcher restarts, "
                    "10.0 MB/s per download; 1 running download restarted at the new rate, "
                    "resuming from the partial files"), line
    downloading(system, 1, 3)
    assert job(system, 1)["retry_count"] == 0
    runs = [r for r in system.sim_runs() if r["query"] == "Slow Show" and r["episode"] == 1]
    assert [r["rate_limit_bps"] for r in runs] == [None, None, 10_000_000]
    status = system.status_json()
    assert status["bandwidth"]["total_mbps"] == 80 and status["bandwidth"]["changed"]
    assert "bandwidth  80 Mbps (config.toml: unlimited) until a restart" in system.status_text()

    # cancel a running download: its process group is killed, its partial files deleted.
    pid = runs[-1]["pid"]
    line = ok(system, "cancel", "--job", "1")
    assert line == "cancelled job 1 (Slow Show ep 1): its download is stopped and its partial " \
                   "files deleted", line
    assert job(system, 1)["stage"] == "cancelled"
    wait_for(lambda: not psutil.pid_exists(pid), 10, "the cancelled download's ani-cli to end")
    wait_for(lambda: not (system.storage / ".in_progress" / "job-1").exists(), 10,
             "job 1's private directory to be deleted")
    assert "partials=deleted" in system.log("worker_01")

    # The rest runs: job 2 lands, job 4 fails for good (max_retries 0).
    wait_for(lambda: system.stages() == {"downloaded": 3, "failed": 1, "cancelled": 2}, 30,
             "the queue to end")
    assert BROKEN_ERROR in job(system, 4)["error_message"]

    # retry --failed: once the site has the episode, the failed job lands.
    broken["episode_behaviour"] = {}
    system.write_catalog(catalog)
    assert ok(system, "retry", "--failed") == "1 failed job back in the queue"
    wait_for(lambda: job(system, 4)["stage"] == "downloaded", 30, "the retried job to land")
    assert job(system, 4)["retry_count"] == 0
    assert (system.storage / "videos" / str(BROKEN) / "episodes" / "ep001.mp4").exists()
    log = system.log("dispatcher")
    assert "retried by the operator: failed job back in the queue source=anime-ctl job_id=4" in log
    assert "no valid sources" in log.split("retried by the operator")[1].splitlines()[0]

    # A cancelled job never comes back: not by a retry, not after a kill -9.
    refused = ctl(system, "retry", "--job", "1", "3")
    assert refused.returncode == 2 and "job 1 is cancelled, job 3 is cancelled" in refused.stderr
    status = kill_dispatcher(system)
    assert status["queue"]["cancelled"] == 2
    assert system.stages() == {"downloaded": 4, "cancelled": 2}
    assert len([r for r in system.sim_runs() if r["query"] == "Slow Show" and r["episode"] == 1]) == 3
    assert "2 cancelled" in system.status_text()
    for action in ("paused by the operator", "priority set by the operator", "cancelled",
                   "bandwidth changed by the operator", "resumed by the operator"):
        assert any(action in line and "source=anime-ctl" in line for line in log.splitlines()), action
