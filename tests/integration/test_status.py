"""``anime-status`` against the real system under supervisord (issue: see what it is doing).

During a run with a slow simulated ani-cli, ``anime-status --json`` shows each busy
worker's job with a percent that rises between two polls, and the disk state; after
the run its counts match the database. With nothing running it says so in one line
and exits 1 within its timeout. The services' logs are key=value lines that reach
the launcher's terminal too.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from tests.system import System, wait_for

SIZE = 3_000_000
DURATION = 6.0  # seconds per simulated download: room for two polls under load
TITLE = "Slow Show"
MAL_ID = 4242
NO_SELECTION = 777
GB = 1000**3


def anime_status(system: System, *args: str, timeout: float = 20):
    return system.run("anime-status", "-c", str(system.config_path), *args, timeout=timeout)


def busy_jobs(status: dict | None) -> dict[str, dict] | None:
    """worker id -> job, when two workers download with a known percent that can still rise."""
    if status is None:
        return None
    jobs = {w["id"]: w["job"] for w in status["workers"]
            if w["state"] == "downloading" and w["job"] and w["job"]["percent"] is not None}
    if len(jobs) == 2 and all(j["percent"] < 85 for j in jobs.values()):
        return jobs
    return None


def test_status_during_and_after_a_run(make_system):
    system = make_system()
    system.write_catalog({"defaults": {"size": SIZE, "duration": DURATION}, "anime": [
        {"query": TITLE, "results": [{"title": TITLE, "episodes": 12, "episode_behaviour": {
            "3": {"fail": "Episode is released, but no valid sources!"}}}]}]})
    system.enqueue(MAL_ID, TITLE, [1, 2], selected_index=1)
    system.enqueue(MAL_ID, TITLE, [3], selected_index=1, max_retries=0)
    system.enqueue(NO_SELECTION, "Nobody Chose Me", [1])
    launcher = system.start_supervisord(2)

    # During the run: both workers' jobs, with a percent that rises between two polls.
    first = wait_for(lambda: busy_jobs(system.status_json()), 20, "two workers downloading")
    assert {j["episode"] for j in first.values()} == {1, 2}

    def risen():
        status = system.status_json()
        jobs = {w["id"]: w["job"] for w in (status or {}).get("workers", []) if w["job"]}
        if all(wid in jobs and jobs[wid]["id"] == job["id"] and jobs[wid]["percent"] is not None
               and jobs[wid]["percent"] > job["percent"] for wid, job in first.items()):
            return status
        return None
    status = wait_for(risen, 10, "both workers' percent to rise")
    for worker in status["workers"]:
        job = worker["job"]
        assert worker["state"] == "downloading" and worker["id"] in ("w01", "w02")
        assert (job["anime_id"], job["anime_title"]) == (MAL_ID, TITLE)
        assert 0 < job["percent"] <= 100 and 0 < job["bytes"] <= SIZE
        assert job["speed_bps"] > 0 and job["eta_seconds"] is not None
        assert 0 < job["running_seconds"] < 30
    disk = status["disk"]
    assert disk["state"] == "running"
    assert set(disk["breakdown"]) >= {"videos", "audio", "transcripts", "in_progress"}
    assert disk["usage_bytes"] >= disk["breakdown"]["in_progress"] > 0
    assert disk["free_bytes"] > 0 and disk["reserved_bytes"] > 0
    assert (disk["pause_threshold_bytes"], disk["resume_threshold_bytes"],
            disk["hard_limit_bytes"]) == (9 * GB, 8 * GB, 10 * GB)
    assert status["queue"]["waiting_for_selection"] == 1

    text = anime_status(system)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert any(line.startswith("  w01  downloading") and f"{TITLE} ep" in line for line in lines)
    assert sum("%" in line and "[" in line for line in lines) == 2  # two progress bar lines
    assert any(line.startswith("disk       running") for line in lines)

    # After the run: the counts are the database's.
    wait_for(lambda: system.stages() == {"downloaded": 2, "failed": 1, "queued": 1}, 30,
             "the run to end")

    def settled():
        status = system.status_json()
        if status is None:
            return None
        q = status["queue"]
        counts = {k: q[k] for k in ("queued", "downloading", "downloaded", "failed") if q[k]}
        idle = all(w["state"] == "idle" and w["job"] is None for w in status["workers"])
        return status if counts == system.stages() and idle else None
    status = wait_for(settled, 15, "anime-status to show the database's counts")
    assert status["queue"]["waiting_for_selection"] == 1 and status["queue"]["backing_off"] == 0
    assert len(status["workers"]) == 2
    assert status["last_hour"]["downloaded"] == 2
    assert status["last_hour"]["average_size_bytes"] == SIZE
    (failure,) = status["recent_failures"]
    assert (failure["anime_id"], failure["episode"]) == (MAL_ID, 3)
    assert "Episode is released, but no valid sources!" in failure["error"]
    assert failure["at"] is not None and failure["at"] <= status["generated_at"]
    text = anime_status(system)
    assert text.returncode == 0 and "no valid sources" in text.stdout

    # Logs: key=value lines per state change, in the files and on the launcher's terminal.
    worker_logs = system.log("worker_01") + system.log("worker_02")
    for episode in (1, 2, 3):
        assert any("ani-cli started" in line and f"episode={episode}" in line
                   and "worker_id=w0" in line and "job_id=" in line and f"anime_id={MAL_ID}" in line
                   for line in worker_logs.splitlines()), episode
    dispatcher_log = system.log("dispatcher")
    assert any(line.split(" INFO dispatcher ")[-1].startswith("downloaded job_id=")
               and f"anime_id={MAL_ID}" in line and "worker_id=w0" in line
               for line in dispatcher_log.splitlines())
    assert "failed" in dispatcher_log and "episode=3" in dispatcher_log
    wait_for(lambda: "ani-cli started" in system.output(launcher)
             and "dispatcher" in system.output(launcher), 10,
             "the services' log lines on the launcher's terminal")


def test_nothing_running_exits_1_within_the_timeout(make_system):
    system = make_system()
    # What the process costs before it asks (interpreter, imports), on this machine now:
    # the bound below allows for it, so a loaded machine does not fail the test, and a
    # second wait of 2 s (a retry, a linger on close) still does.
    started = time.monotonic()
    assert anime_status(system, "--help").returncode == 0
    start_up = time.monotonic() - started
    started = time.monotonic()
    result = anime_status(system, "--json")  # the default timeout: 2 s
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    # then the queue from jobs.db, read-only (tests/integration/test_first_hour.py): none here
    offline = json.loads(result.stdout)
    assert offline["dispatcher"] is None and offline["queue"] is None
    assert offline["source"]["read_only"] and "no database at" in offline["source"]["error"]
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("anime-status: no answer from the dispatcher at ipc://")
    assert "within 2s" in result.stderr
    assert 2.0 <= elapsed < 2.0 + 2 * start_up + 1.5, (elapsed, start_up)


def test_watch_keeps_asking_while_nothing_answers(make_system):
    system = make_system()
    proc = system.spawn("anime-status", "-c", str(system.config_path), "--watch", "0.1",
                        "--timeout", "0.2")
    
    wait_for(lambda: system.output(proc).count("no answer from the dispatcher") >= 2, 10,
             "two rounds of --watch")
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(timeout=10) == 0
    except subprocess.TimeoutExpired:
        raise AssertionError(f"anime-status --watch still runs 10 s after SIGINT: "
                             f"{process_state(proc.pid)}") from None


def process_state(pid: int) -> str:
    """Signal masks and where each thread waits, to tell an ignored or blocked SIGINT
    from a process stuck on its way out (seen once in ~400 runs, not reproduced)."""
    proc = Path(f"/proc/{pid}")
    fields = [line for line in (proc / "status").read_text().splitlines()
              if line.split(":")[0] in ("State", "SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt")]
    for task in sorted((proc / "task").iterdir()):
        comm = (task / "comm").read_text().strip()
        fields.append(f"thread {task.name} {comm} wchan={(task / 'wchan').read_text()}")
    return "; ".join(fields)


def test_the_terminal_gets_every_log_line_once_across_a_rotation(tmp_path, capsys):
    from services.launcher import LogFollower

    log = tmp_path / "worker_01.log"
    log.write_text("from an earlier run\n")
    (tmp_path / "supervisord.log").write_text("")
    follower = LogFollower(tmp_path)
    with open(log, "a") as fh:
        fh.write("assigned job_id=1\nhalf a li")
    follower.poll()
    with open(log, "a") as fh:
        fh.write("ne job_id=1\nwritten just before the rotation\n")
    log.rename(tmp_path / "worker_01.log.1")  # what supervisord does at logfile_maxbytes
    log.write_text("after\n")
    (tmp_path / "supervisord.log").write_text("not a service's line\n")
    follower.poll()
    follower.poll()
    assert capsys.readouterr().err.splitlines() == [
        "worker_01      | assigned job_id=1",
        "worker_01      | half a line job_id=1",
        "worker_01      | written just before the rotation",
        "worker_01      | after",
    ]
