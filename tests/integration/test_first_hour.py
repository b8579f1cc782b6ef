"""What a newcomer runs in the first hour, each as the real command (issue 20):
``anime-enqueue`` warns when the episodes will wait for a selection, ``--dry-run`` is not
held back by the disk budget, ``anime-status`` says why jobs back off and why nothing
starts, counts the last hour from the database, and shows the queue from ``jobs.db``
(read-only) when the dispatcher does not answer; ``anime-downloader --supervisorctl``
reaches the running instance."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import time

from shared.models import CONTRACT_DDL
from tests.system import System, wait_for


def test_enqueue_without_a_selection_warns_that_the_episodes_will_wait(make_system) -> None:
    system = make_system()
    done = system.run("anime-enqueue", "-c", str(system.config_path), "--mal-id", "5114",
                      "--title", "Fullmetal Alchemist: Brotherhood", "--episodes", "1-3")
    assert done.returncode == 0, done.stderr
    assert "queued 3 episode(s) of MAL ID 5114" in done.stdout
    assert "warning: MAL ID 5114 has no cached selection" in done.stderr
    assert "not downloaded until one is added" in done.stderr
    # how to add it: the same command with --selected-index
    assert ("anime-enqueue -c " + str(system.config_path) + " --mal-id 5114 --title "
            "'Fullmetal Alchemist: Brotherhood' --episodes 1-3 --selected-index N") in done.stderr

    again = system.run("anime-enqueue", "-c", str(system.config_path), "--mal-id", "5114",
                       "--title", "Fullmetal Alchemist: Brotherhood", "--episodes", "1-3",
                       "--selected-index", "2")
    assert again.returncode == 0 and again.stderr == "", again.stderr
    # once the anime has a selection, more episodes without --selected-index need no warning
    more = system.run("anime-enqueue", "-c", str(system.config_path), "--mal-id", "5114",
                      "--title", "Fullmetal Alchemist: Brotherhood", "--episodes", "4")
    assert more.returncode == 0 and more.stderr == "", more.stderr


def near_pause(usage_bytes: int) -> dict:
    """A disk budget of a few MB whose storage already holds ``usage_bytes`` of video."""
    return {"disk_management": {"hard_limit_gb": 0.010, "pause_threshold_gb": 0.006,
                                "resume_threshold_gb": 0.005, "expected_episode_size_mb": 1,
                                "min_free_gb": 0.001}}


def fill_storage(system: System, size: int) -> None:
    videos = system.storage / "videos" / "1" / "episodes"
    videos.mkdir(parents=True)
    (videos / "ep001.mkv").write_bytes(b"\0" * size)


def test_a_dry_run_near_the_pause_threshold_runs_every_job_and_exits(make_system) -> None:
    """--dry-run downloads nothing, so the disk budget must not hold it back: with the
    storage past the pause threshold every queued job is still shown and
    --exit-when-done exits with the summary (on main: every worker paused, no exit)."""
    system = make_system(near_pause(7_000_000))
    fill_storage(system, 7_000_000)  # past pause_threshold_gb: the disk-watcher says paused
    # an earlier real run identified the storage (a dry run writes not even its marker)
    first = system.run("anime-downloader", "-c", str(system.config_path), "-w", "1",
                       "--exit-when-done", timeout=60)
    assert first.returncode == 0, first.stderr[-3000:]
    system.enqueue(5114, "Fullmetal Alchemist: Brotherhood", [1, 2, 3], selected_index=2)
    done = system.run("anime-downloader", "-c", str(system.config_path), "-w", "2", "--dry-run",
                      "--exit-when-done", timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dry_run_would_download=3" in done.stdout, done.stdout
    assert "disk state state=paused" in system.log("disk-watcher"), system.log("disk-watcher")
    argv_lines = [line for line in done.stderr.splitlines()
                  if line.startswith("worker_") and "dry run: would run" in line]
    assert len(argv_lines) == 3, done.stderr[-3000:]
    assert system.stages() == {"queued": 3}  # nothing changed


def counted_bytes_catalog(system: System) -> None:
    """The simulated ani-cli writing counted bytes, not a video: what a user's own setup
    got from it before the recipe (every episode fails verification)."""
    catalog = {"defaults": {"size": 4096, "duration": 0.0}, "anime": []}
    system.add_anime(catalog, "Cowboy Bebop", [{"title": "Cowboy Bebop", "episodes": 2}])
    system.write_catalog(catalog)
    system.enqueue(1, "Cowboy Bebop", [1, 2], selected_index=1)


def status_text(system: System, *args: str) -> subprocess.CompletedProcess:
    return system.run("anime-status", "-c", str(system.config_path), *args, timeout=30)


def test_status_says_why_jobs_back_off_and_reads_the_database_when_nothing_answers(
        make_system) -> None:
    system = make_system({"downloader": {"verify": True, "container": "mkv",
                                         "retry_backoff_seconds": 60}})
    counted_bytes_catalog(system)
    launcher = system.start_supervisord(2)
    wait_for(lambda: system.stages().get("queued") == 2 and all(
        j["retry_count"] == 1 for j in system.jobs()), 60, "both episodes to fail verification once")

    def shown() -> str | None:
        text = status_text(system).stdout
        return text if "backing off: 2 x" in text else None
    text = wait_for(shown, 20, "anime-status to say why the jobs back off")
    joined = " ".join(line.strip() for line in text.splitlines())
    assert "backing off: 2 x Downloaded file is not a playable video" in joined, text
    assert "moov atom not found" in joined, text
    assert "2 back off (next retry " in joined, text

    launcher.send_signal(signal.SIGINT)  # Ctrl-C
    assert launcher.wait(timeout=60) == 0
    db_bytes, db_mtime = system.db_path.read_bytes(), system.db_path.stat().st_mtime_ns
    done = status_text(system, "--timeout", "0.5")
    assert done.returncode == 1
    assert "no answer from the dispatcher" in done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"from {system.db_path} (read-only: the dispatcher is not answering)")
    assert lines[1].startswith("queue      2 queued, 0 downloading, 0 downloaded, 0 failed"), lines
    assert "backing off: 2 x Downloaded file is not a playable video" in done.stdout
    as_json = json.loads(status_text(system, "--timeout", "0.5", "--json").stdout)
    assert as_json["dispatcher"] is None and as_json["source"]["read_only"] is True
    assert as_json["queue"]["queued"] == 2 and as_json["queue"]["backing_off"] == 2
    # read-only: the file is as it was (neither written nor touched)
    assert system.db_path.read_bytes() == db_bytes
    assert system.db_path.stat().st_mtime_ns == db_mtime


def test_status_from_a_locked_database_gives_up_after_a_bounded_wait(make_system) -> None:
    """A database another program holds locked (rollback journal, an exclusive lock) is
    waited for about a second, then named: never a hang."""
    system = make_system()
    system.data.mkdir(parents=True)
    conn = sqlite3.connect(system.db_path, isolation_level=None)
    for ddl in CONTRACT_DDL:
        conn.execute(ddl)
    conn.execute("INSERT INTO jobs (anime_id, anime_title, episode, stage) VALUES (1, 'A', 1, 'queued')")
    conn.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        done = status_text(system, "--timeout", "0.3")
        elapsed = time.monotonic() - started
    finally:
        conn.execute("ROLLBACK")
        conn.close()
    assert done.returncode == 1
    assert done.stdout.strip() == f"from the database (read-only): cannot read {system.db_path}: " \
                                  "locked by another program"
    assert elapsed < 10, elapsed


def test_a_budget_refusal_names_the_usage_and_the_expected_size(make_system) -> None:
    """Not "in-flight reservations would pass pause_threshold_gb" while nothing is
    reserved: what is used, what the next episode would add, the threshold."""
    system = make_system(near_pause(5_500_000))
    fill_storage(system, 5_500_000)  # below the pause threshold, but 1 MB more would pass it
    system.enqueue(5114, "Fullmetal Alchemist: Brotherhood", [1], selected_index=1)
    system.start_supervisord(1)

    def refusal() -> str | None:
        answer = status_text(system, "--json")
        return json.loads(answer.stdout)["disk"]["refusal"] if answer.returncode == 0 else None
    text = wait_for(lambda: (r := refusal()) and "would pass" in r and r, 20,
                    "the dispatcher to refuse the download for the budget")
    assert re.fullmatch(r"usage 5\.[5-9] MB \+ expected 1\.0 MB would pass pause_threshold_gb "
                        r"6\.0 MB", text), text
    shown = " ".join(status_text(system).stdout.split())
    assert f"not starting downloads: {text}" in shown, shown
    assert system.stages() == {"queued": 1}
