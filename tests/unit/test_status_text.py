"""The status document (services/dispatcher/status_view.py) and its text rendering
(services/status_text.py): the documented shape, worker states, no database access per
request, and a rendering that fits 80 columns.
"""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path

import pytest

from services.dispatcher.core import Dispatcher
from services.dispatcher.effects import FileEffects
from services.dispatcher.status_view import WORKER_STATES, build_status
from services.dispatcher.store import SqlJobStore
from services.enqueue import enqueue
from services.status_text import MAX_WIDTH, WIDTH, bar, human_bytes, human_seconds, render_text
from shared.config import load_config
from shared.protocol import (DiskStateMsg, JobFailed, JobFinished, JobHeartbeat, StatusReply,
                             WorkerReady, decode, encode)
from tests.system import render_toml

GB = 1000**3
NOW = 1_800_000_000.0

# The documented shape (docs/status-json.md): these keys are stable.
QUEUE_KEYS = {"queued", "downloading", "downloaded", "failed", "waiting_for_selection",
              "backing_off", "next_retry_at"}
WORKER_KEYS = {"id", "state", "job"}
JOB_KEYS = {"id", "anime_id", "anime_title", "episode", "percent", "bytes", "speed_bps",
            "eta_seconds", "running_seconds"}
DISK_KEYS = {"state", "usage_bytes", "breakdown", "reserved_bytes", "free_bytes",
             "pause_threshold_bytes", "resume_threshold_bytes", "hard_limit_bytes"}


def sample(title: str = "Fullmetal Alchemist: Brotherhood") -> dict:
    job = {"id": 17, "anime_id": 5114, "anime_title": title, "episode": 12, "attempt": 1,
           "phase": "downloading", "percent": 42.3, "bytes": 507_000_000, "speed_bps": 3_250_000.0,
           "eta_seconds": 252.0, "running_seconds": 3725.0}
    return {
        "generated_at": NOW,
        "dispatcher": {"pid": 1, "dry_run": False, "anime_id": None, "stopping": False},
        "queue": {"queued": 120, "downloading": 2, "downloaded": 4031, "failed": 7,
                  "waiting_for_selection": 3, "backing_off": 2, "next_retry_at": NOW + 300,
                  "backoff_reasons": [{"reason": "ani-cli returned non-zero exit code: 1: "
                                                 "Episode not released!",
                                       "count": 2, "next_retry_at": NOW + 300}],
                  "other_stages": {"transcribed": 900}, "counted_at": NOW - 1,
                  "cancelled": 0, "priorities": [],
                  "by_anime": [{"anime_id": 5114, "anime_title": "Show", "queued": 2,
                                "downloading": 1, "downloaded": 1, "failed": 0,
                                "waiting_release": 0, "priority": 0}]},
        "workers": [
            {"id": "w01", "host": "h", "state": "downloading", "last_seen_seconds": 0.4, "job": job},
            {"id": "w02", "host": "h", "state": "verifying", "last_seen_seconds": 0.1,
             "job": dict(job, id=18, episode=13, phase="verifying", percent=None, speed_bps=None,
                         eta_seconds=None)},
            {"id": "w03", "host": "h", "state": "paused", "last_seen_seconds": 0.9, "job": None},
            {"id": "w04", "host": "h", "state": "idle", "last_seen_seconds": 0.2, "job": None},
        ],
        "disk": {"state": "paused", "usage_bytes": int(9.2 * GB),
                 "breakdown": {"videos": int(8.1 * GB), "audio": int(0.5 * GB), "transcripts": 10_000,
                               "in_progress": int(0.6 * GB), "other": 4096},
                 "reserved_bytes": 1_000_000_000, "free_bytes": 120 * GB,
                 "pause_threshold_bytes": 9 * GB, "resume_threshold_bytes": 8 * GB,
                 "hard_limit_bytes": 10 * GB, "min_free_bytes": GB, "measured_at": NOW - 0.5,
                 "age_seconds": 0.5, "admitting": False, "refusal": "disk paused",
                 "reason": None},
        "recent_failures": [
            {"id": 3, "anime_id": 1, "anime_title": "Some Show", "episode": 2, "at": NOW - 60,
             "error": "ani-cli returned non-zero exit code: 1\nPlaying episode 2...\nEpisode not released!"},
            {"id": 4, "anime_id": 2, "anime_title": "Other", "episode": 1, "at": None,
             "error": "No cached selection for MAL ID 2"},
        ],
        "last_hour": {"downloaded": 12, "bytes": 12 * 480_000_000, "average_size_bytes": 480_000_000},
        "title_mismatches": [
            {"id": 21, "anime_id": 10087, "anime_title": "Fate/Zero", "episode": 1,
             "selected_title": "Fate/Zero", "site_title": "Fate/Zero Season 2", "at": NOW - 30},
        ],
        "database": {"busy_since": None, "error": None, "pending_writes": 0},
        "pause": {"paused": False, "at": None, "until": None, "by": None, "interrupted": False},
        "bandwidth": {"total_mbps": 0.0, "configured_mbps": 0.0, "changed": False,
                      "per_download_bps": 0},
    }


# --------------------------------------------------------------------------- text


def test_a_show_that_is_not_the_selected_one_is_shown_with_both_titles() -> None:
    lines = render_text(sample()).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("titles"))
    assert lines[at].startswith("titles     job 21 Fate/Zero ep 1 at ")
    assert lines[at + 1].strip() == "site 'Fate/Zero Season 2', selected 'Fate/Zero'"


def test_the_text_fits_80_columns_and_shows_everything() -> None:
    text = render_text(sample())
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= WIDTH, "\n".join(lines)
    assert "120 queued, 2 downloading, 4031 downloaded, 7 failed" in text
    assert "of which 3 wait for a selection, 2 back off (next retry" in text
    assert "transcribed 900" in text
    # A busy worker: what it downloads, then its progress bar line.
    i = next(i for i, line in enumerate(lines) if line.startswith("  w01"))
    assert "downloading" in lines[i] and "Fullmetal Alchemist: Brotherhood ep 12" in lines[i]
    assert "job 17, 1:02:05" in lines[i]
    assert f"{bar(42.3)}  42.3%  507.0 MB  3.2 MB/s  ETA 04:12" in lines[i + 1]
    assert "[??????" in lines[i + 3] and "ETA --:--" in lines[i + 3]  # w02 verifying, no figures
    assert any(line.split() == ["w03", "paused"] for line in lines)
    assert any(line.split() == ["w04", "idle"] for line in lines)
    assert "4 connected (1 downloading, 1 idle, 1 paused, 1 verifying)" in text
    # The disk: state, usage against the limits, the breakdown, reserved and free.
    assert "paused" in text and "9.2 GB of 10.0 GB hard limit" in text
    assert "pause at 9.0 GB, resume below 8.0 GB; reserved 1.0 GB, free 120.0 GB" in text
    assert "videos 8.1 GB, audio 500.0 MB, transcripts 10.0 KB," in text
    assert "in progress 600.0 MB, other 4.1 KB" in text
    assert "not starting downloads: disk paused" in text
    assert "12 episodes downloaded, average 480.0 MB" in text
    # Failures: what failed (first line) and why (last line).
    assert "job 3 Some Show ep 2 at" in text and "ani-cli returned non-zero exit code: 1" in text
    assert "  Episode not released!" in text and "Playing episode" not in text
    assert "job 4 Other ep 1: No cached selection for MAL ID 2" in text


def test_long_titles_and_messages_are_cut_to_the_width() -> None:
    status = sample(title="A" * 300)
    status["recent_failures"][0]["error"] = "x" * 500
    lines = render_text(status).splitlines()
    assert max(len(line) for line in lines) <= MAX_WIDTH
    worker = next(line for line in lines if line.startswith("  w01"))
    assert len(worker) == WIDTH and "AAA..." in worker and worker.endswith("job 17, 1:02:05")


def knowing_nothing(queue: dict) -> dict:
    """The document of a dispatcher that has just started: no disk state, no worker."""
    return {"generated_at": NOW, "queue": queue, "workers": [],
            "disk": {"state": "unknown", "usage_bytes": None, "breakdown": {}, "reserved_bytes": 0,
                     "free_bytes": None, "pause_threshold_bytes": 9 * GB,
                     "resume_threshold_bytes": 8 * GB, "hard_limit_bytes": 10 * GB,
                     "refusal": "no disk state yet"},
            "recent_failures": [], "last_hour": {"downloaded": 0, "average_size_bytes": None}}


def test_a_dispatcher_that_knows_nothing_yet_renders() -> None:
    text = render_text(knowing_nothing({}))
    assert "0 queued, 0 downloading, 0 downloaded, 0 failed" in text
    assert "0 connected" in text
    assert "unknown" in text and "? of 10.0 GB hard limit" in text
    assert "0 episodes downloaded, average ?" in text


def test_an_unavailable_storage_says_why_under_the_disk_line() -> None:
    status = sample()
    why = "storage_dir /mnt/usb/anime is no longer a mount point (is the disk mounted?)"
    status["disk"].update(state="unavailable", reason=why, refusal=f"storage unavailable: {why}")
    lines = render_text(status).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("disk"))
    assert lines[at].startswith("disk       unavailable [")
    assert " ".join(line.strip() for line in lines[at + 1:at + 3]).startswith(f"storage unavailable: {why}")
    assert not any("not starting downloads" in line for line in lines)
    assert max(len(line) for line in lines) <= MAX_WIDTH


@pytest.mark.parametrize("value, text", [(None, "?"), (0, "0 B"), (999, "999 B"), (1000, "1.0 KB"),
                                         (3_250_000, "3.2 MB"), (2.5e12, "2.5 TB"), (4e15, "4000.0 TB")])
def test_human_bytes(value, text) -> None:
    assert human_bytes(value) == text


def test_human_seconds_and_bar() -> None:
    assert human_seconds(None) == "--:--"
    assert human_seconds(252) == "04:12"
    assert human_seconds(3725) == "1:02:05"
    assert bar(0, 10) == "[----------]"
    assert bar(50, 10) == "[#####-----]"
    assert bar(150, 10) == "[##########]"
    assert bar(None, 4) == "[????]"
    assert bar(10, 10, mark=90) == "[#--------|]"


# --------------------------------------------------------------------------- the document


class NoStore:
    """Stands in for the store while status requests are served: any use fails the test."""

    def __getattr__(self, name: str):
        raise AssertionError(f"a status request used the database ({name})")


@pytest.fixture
def dispatcher(tmp_path: Path) -> Dispatcher:
    path = tmp_path / "config.toml"
    path.write_text(render_toml({
        "data": {"root_dir": "data", "storage_dir": "storage"},
        "disk_management": {"hard_limit_gb": 10, "pause_threshold_gb": 9, "resume_threshold_gb": 8,
                            "min_free_gb": 0.01, "expected_episode_size_mb": 100},
        "downloader": {"retry_backoff_seconds": 60},
        "queue": {"lease_seconds": 6, "heartbeat_seconds": 1},
        "zmq": {"dispatcher": "tcp://127.0.0.1:1", "status": "tcp://127.0.0.1:2",
                "disk_state": "tcp://127.0.0.1:3", "disk_control": "tcp://127.0.0.1:4"},
    }))
    config = load_config(path)
    enqueue(config.db_path, 5114, "Show", [1, 2, 3], 3, (1, "Show (site)", "high"))
    enqueue(config.db_path, 9999, "No Selection", [1], 3, None)
    d = Dispatcher(SqlJobStore(config.db_path), FileEffects(config), config, rng=random.Random(1))
    d.start(NOW)
    return d


def disk(state: str, now: float, seq: int) -> DiskStateMsg:
    return DiskStateMsg(seq=seq, state=state, usage_bytes=2 * GB,
                        breakdown={"videos": GB, "audio": 0, "transcripts": 0, "in_progress": GB, "other": 0},
                        free_bytes=50 * GB, pause_threshold_bytes=9 * GB, resume_threshold_bytes=8 * GB,
                        hard_limit_bytes=10 * GB, min_free_bytes=10**7, measured_at=now, published_at=now)


def served(d: Dispatcher, now: float) -> dict:
    """The document as anime-status receives it (msgpack round trip), with no database."""
    store, d.store = d.store, NoStore()
    try:
        return decode(encode(StatusReply(status=build_status(d.snapshot(now))))).status
    finally:
        d.store = store


def beat(worker: str, job_id: int, percent: float | None, state: str = "downloading") -> JobHeartbeat:
    return JobHeartbeat(worker_id=worker, session="s", job_id=job_id, attempt=1, bytes=1_000_000,
                        percent=percent, speed_bps=500_000.0, eta_seconds=4.0, state=state)


def test_the_document_has_the_documented_shape_and_worker_states(dispatcher: Dispatcher) -> None:
    d, t = dispatcher, NOW
    A, B, C = b"w01/s", b"w02/s", b"w03/s"
    d.on_disk_state(disk("running", t, 1), t)
    out = d.handle(A, WorkerReady(worker_id="w01", session="s", seq=0), t)
    out += d.handle(B, WorkerReady(worker_id="w02", session="s", seq=0), t)
    jobs = {ident: msg.job_id for ident, msg in out}
    assert set(jobs) == {A, B}
    d.handle(A, beat("w01", jobs[A], 42.0), t + 1)
    d.handle(B, JobFinished(worker_id="w02", session="s", job_id=jobs[B], attempt=1, ext=".mp4",
                            size_bytes=1000), t + 1)
    d.handle(B, beat("w02", jobs[B], 100.0, state="awaiting_commit"), t + 1)
    d.handle(C, WorkerReady(worker_id="w03", session="s", seq=0), t + 1)  # gets the third job
    d.tick(t + 2)

    s = served(d, t + 2)
    assert QUEUE_KEYS <= set(s["queue"]) and DISK_KEYS <= set(s["disk"])
    # Exactly the keys of the example in docs/status-json.md (sample() mirrors
    # it), and "database" (README, "The database contract").
    doc = sample()
    # ... and the keys of docs/failures.md (failures that know what they are)
    doc["queue"].update(waiting_for_release=0, next_recheck_at=None)
    doc.update(failure_classes={}, selection_review=[])
    assert set(s) == set(doc)
    for part in ("dispatcher", "queue", "disk", "last_hour", "database", "pause", "bandwidth"):
        assert set(s[part]) == set(doc[part]), part
    assert {k for w in s["workers"] for k in w} == set(doc["workers"][0])
    assert {k for w in s["workers"] for k in w["job"]} == set(doc["workers"][0]["job"])
    assert s["queue"]["waiting_for_selection"] == 1
    assert s["queue"]["queued"] == 1 and s["queue"]["downloading"] == 3
    workers = {w["id"]: w for w in s["workers"]}
    assert [w["id"] for w in s["workers"]] == ["w01", "w02", "w03"]
    for w in s["workers"]:
        assert WORKER_KEYS <= set(w) and w["state"] in WORKER_STATES
        assert JOB_KEYS <= set(w["job"])
    a = workers["w01"]
    assert a["state"] == "downloading"
    assert a["job"]["id"] == jobs[A]
    assert (a["job"]["anime_id"], a["job"]["anime_title"], a["job"]["percent"]) == (5114, "Show", 42.0)
    assert (a["job"]["bytes"], a["job"]["speed_bps"], a["job"]["eta_seconds"]) == (1_000_000, 500_000.0, 4.0)
    assert a["job"]["running_seconds"] == 2.0
    assert workers["w02"]["state"] == "verifying" and workers["w02"]["job"]["phase"] == "awaiting_commit"
    assert workers["w03"]["state"] == "downloading" and workers["w03"]["job"]["percent"] is None
    assert s["disk"]["state"] == "running" and s["disk"]["usage_bytes"] == 2 * GB
    assert s["disk"]["free_bytes"] == 50 * GB and s["disk"]["reserved_bytes"] >= 3 * 100 * 10**6

    # The third worker fails (a retry backs off), the disk pauses: an idle worker is paused.
    d.handle(C, JobFailed(worker_id="w03", session="s", job_id=workers["w03"]["job"]["id"], attempt=1,
                          reason="error", error="ani-cli returned non-zero exit code: 1"), t + 3)
    d.on_disk_state(disk("paused", t + 3, 2), t + 3)
    d.handle(C, WorkerReady(worker_id="w03", session="s", seq=1), t + 3)
    d.handle(A, beat("w01", jobs[A], 60.0, state="stopping"), t + 3)
    d.tick(t + 4)
    s = served(d, t + 4)
    workers = {w["id"]: w for w in s["workers"]}
    assert workers["w03"] == dict(workers["w03"], state="paused", job=None)
    assert workers["w01"]["state"] == "stopping" and workers["w01"]["job"]["percent"] == 60.0
    assert s["queue"]["backing_off"] == 1
    assert t + 3 + 40 <= s["queue"]["next_retry_at"] <= t + 3 + 80  # 60 s, jittered
    assert s["disk"]["state"] == "paused" and s["disk"]["refusal"].startswith("disk paused")
    text = render_text(s)
    assert "w03  paused" in text and "next retry" in text


def test_last_hour_counts_only_the_last_hour(dispatcher: Dispatcher) -> None:
    d = dispatcher
    for at, size in [(NOW - 4000, 1), (NOW - 3000, 100), (NOW - 10, 300)]:
        d.recent.landing(at, size)
    assert served(d, NOW)["last_hour"] == {"downloaded": 2, "bytes": 400, "average_size_bytes": 200}


def test_a_busy_database_shows_as_one_line_under_the_header() -> None:
    doc = sample()
    assert "database" not in render_text(doc)
    doc["database"] = {"busy_since": NOW - 5, "error": "database is locked", "pending_writes": 2}
    lines = render_text(doc).splitlines()
    assert lines[1] == f"database busy since {time.strftime('%H:%M:%S', time.localtime(NOW - 5))} (2 writes waiting)"
    assert "database is locked" in lines[2]
    assert max(len(line) for line in lines) <= 80


# --------------------------------------------------------------------------- issue 20


def test_the_text_says_why_jobs_back_off() -> None:
    lines = render_text(sample()).splitlines()
    at = time.strftime("%H:%M:%S", time.localtime(NOW + 300))
    i = next(i for i, line in enumerate(lines) if "backing off:" in line)
    assert lines[i] == " " * 11 + "backing off: 2 x ani-cli returned non-zero exit code: 1: Episode not"
    assert lines[i + 1] == " " * 13 + f"released! (next retry {at})"
    assert max(len(line) for line in lines) <= 80


def fail(d: Dispatcher, ident: bytes, worker: str, job_id: int, error: str, now: float) -> None:
    d.handle(ident, JobFailed(worker_id=worker, session="s", job_id=job_id, attempt=1,
                              reason="error", error=error), now)


def test_backoff_reasons_and_the_next_retry_once_one_backoff_ran_out(dispatcher: Dispatcher) -> None:
    """Each backing-off job's last error, grouped; when the soonest backoff has run out
    (its job not handed out again yet: no idle worker), the next one is still shown."""
    d, t = dispatcher, NOW
    A, B = b"w01/s", b"w02/s"
    d.on_disk_state(disk("running", t, 1), t)
    out = d.handle(A, WorkerReady(worker_id="w01", session="s", seq=0), t)
    out += d.handle(B, WorkerReady(worker_id="w02", session="s", seq=0), t)
    jobs = {ident: msg.job_id for ident, msg in out}
    moov = ("Downloaded file is not a playable video: incomplete MP4: moov atom not found "
            "(the download or remux did not finish)")
    fail(d, A, "w01", jobs[A], moov, t + 1)
    # (not "Episode not released!": that one waits for a re-check, docs/failures.md)
    fail(d, B, "w02", jobs[B], "ani-cli returned non-zero exit code: 1\nlast lines\nNo sources found for sub!",
         t + 40)  # backoffs of 60 s +-25 %: A's ends in t+46..76, B's in t+85..115
    d.tick(t + 42)
    q = served(d, t + 42)["queue"]
    assert q["backing_off"] == 2
    first, second = sorted(q["backoff_reasons"], key=lambda r: r["next_retry_at"])
    assert (first["reason"], first["count"]) == (moov, 1)
    assert (second["reason"], second["count"]) == ("ani-cli returned non-zero exit code: 1: "
                                                   "No sources found for sub!", 1)
    assert q["next_retry_at"] == first["next_retry_at"]
    later = first["next_retry_at"] + 2  # job A's backoff ran out; no worker asks for it
    d.tick(later)
    q = served(d, later)["queue"]
    assert q["backing_off"] == 1 and q["next_retry_at"] == second["next_retry_at"]
    assert [r["reason"] for r in q["backoff_reasons"]] == [second["reason"]]


def test_last_hour_counts_the_databases_finish_times_from_before_the_start(tmp_path: Path) -> None:
    """A restarted dispatcher shows what an earlier run downloaded in the last hour."""
    path = tmp_path / "config.toml"
    path.write_text(render_toml({"data": {"root_dir": "data", "storage_dir": "storage"},
                                 "disk_management": {"hard_limit_gb": 10, "pause_threshold_gb": 9,
                                                     "resume_threshold_gb": 8}}))
    config = load_config(path)
    enqueue(config.db_path, 5114, "Show", [1, 2, 3, 4], 3, (1, "Show", "high"))
    first = Dispatcher(SqlJobStore(config.db_path), FileEffects(config), config)
    first.start(NOW - 7200)  # adds the dispatcher's columns
    first.store.close()
    conn = sqlite3.connect(config.db_path)
    for episode, finished in [(1, NOW - 4000), (2, NOW - 1800), (3, NOW - 60)]:
        conn.execute("UPDATE jobs SET stage = 'downloaded', video_path = ?, video_size_bytes = ?, "
                     "finished_at = ? WHERE episode = ?", (f"/s/ep{episode}.mkv", 1000 * episode,
                                                          finished, episode))
    conn.execute("UPDATE jobs SET stage = 'transcribed' WHERE episode = 2")  # moved on since
    conn.commit()
    conn.close()
    d = Dispatcher(SqlJobStore(config.db_path), FileEffects(config), config)
    d.start(NOW)
    assert served(d, NOW)["last_hour"] == {"downloaded": 2, "bytes": 5000, "average_size_bytes": 2500}
    assert served(d, NOW + 1801)["last_hour"]["downloaded"] == 1  # the window moves on


def test_a_queue_not_counted_yet_says_so_instead_of_zeros() -> None:
    """Right after a start the first count runs on the pass's thread: counted_at null."""
    text = render_text(knowing_nothing({"counted_at": None}))
    assert "not counted yet" in text and "0 queued" not in text, text
