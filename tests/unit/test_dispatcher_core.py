"""The dispatcher's logic driven with an injected clock: leases, heartbeats,
retries and backoff, fencing, worker and dispatcher restarts, invalid rows.

A real SQLite file (``SqlJobStore``), no sockets, no sleeping: every test
hands ``handle(identity, msg, now)`` and ``tick(now)`` the time it wants.
"""

from __future__ import annotations

import json
import fcntl
import os
import random
import sqlite3
from pathlib import Path

import pytest

from services.dispatcher.core import Dispatcher
from services.dispatcher.effects import FileEffects
from services.dispatcher.status_view import build_status
from services.dispatcher.store import SqlJobStore
from services.enqueue import enqueue
from shared import layout
from shared.config import Config, load_config
from shared.models import CONTRACT_DDL
from shared.protocol import (REASON_ERROR, REASON_HARD_LIMIT, REASON_INTERRUPTED,
                             REASON_NO_SPACE, REASON_TIMEOUT, DiskStateMsg, JobAck, JobAssign,
                             JobCancel, JobCommit, JobFailed, JobFinished, JobHeartbeat,
                             JobLanded, WorkerReady)
from tests.system import render_toml

LEASE = 6.0
GB = 1024 ** 3
A = b"w01/aaaa"
B = b"w02/bbbb"


def make_config(tmp_path: Path, **downloader: object) -> Config:
    tables = {
        "data": {"root_dir": "data", "storage_dir": "storage"},
        "disk_management": {"hard_limit_gb": 1000, "pause_threshold_gb": 900,
                            "resume_threshold_gb": 800, "min_free_gb": 0.01,
                            "expected_episode_size_mb": 1, "cache_duration_seconds": 60},
        "downloader": {"retry_backoff_seconds": 0, "retry_backoff_max_seconds": 3600,
                       **downloader},
        "queue": {"lease_seconds": LEASE, "heartbeat_seconds": 1},
        # never bound here; tcp keeps the long pytest tmp_path out of ipc limits
        "zmq": {"dispatcher": "tcp://127.0.0.1:1", "status": "tcp://127.0.0.1:2",
                "disk_state": "tcp://127.0.0.1:3", "disk_control": "tcp://127.0.0.1:4"},
    }
    path = tmp_path / "config.toml"
    path.write_text(render_toml(tables))
    return load_config(path)


class Rig:
    """A Dispatcher over a real database, a fresh disk state before every step."""

    def __init__(self, tmp_path: Path, **downloader: object) -> None:
        self.config = make_config(tmp_path, **downloader)
        self.seq = 0
        self.sessions: dict[bytes, int] = {}
        self.d = self.new_dispatcher(0.0)

    def new_dispatcher(self, now: float, seed: int = 1) -> Dispatcher:
        store = SqlJobStore(self.config.db_path)
        d = Dispatcher(store, FileEffects(self.config), self.config, rng=random.Random(seed))
        d.start(now)
        self.d = d
        return d

    def enqueue(self, mal_id: int, episodes: list[int], max_retries: int = 3,
                index: int = 1) -> None:
        enqueue(self.config.db_path, mal_id, f"Anime {mal_id}", episodes, max_retries,
                (index, f"Anime {mal_id} (site)", "high"))

    def disk(self, now: float) -> list:
        self.seq += 1
        msg = DiskStateMsg(seq=self.seq, state="running", usage_bytes=0, breakdown={},
                           free_bytes=500 * GB, pause_threshold_bytes=900 * GB,
                           resume_threshold_bytes=800 * GB, hard_limit_bytes=1000 * GB,
                           min_free_bytes=0, measured_at=now, published_at=now)
        return self.d.on_disk_state(msg, now)

    def send(self, identity: bytes, msg, now: float) -> list:
        out = self.disk(now)
        return out + self.d.handle(identity, msg, now)

    def tick(self, now: float) -> list:
        return self.disk(now) + self.d.tick(now)

    def ready(self, identity: bytes, now: float, seq: int | None = None) -> list:
        if seq is None:
            seq = self.sessions[identity] = self.sessions.get(identity, -1) + 1
        worker_id, session = identity.decode().split("/")
        return self.send(identity, WorkerReady(worker_id=worker_id, session=session, seq=seq), now)

    def beat(self, identity: bytes, job: JobAssign, now: float, attempt: int | None = None) -> list:
        worker_id, session = identity.decode().split("/")
        return self.send(identity, JobHeartbeat(
            worker_id=worker_id, session=session, job_id=job.job_id,
            attempt=job.attempt if attempt is None else attempt, bytes=100), now)

    def finished(self, identity: bytes, job: JobAssign, now: float) -> list:
        worker_id, session = identity.decode().split("/")
        return self.send(identity, JobFinished(
            worker_id=worker_id, session=session, job_id=job.job_id, attempt=job.attempt,
            ext=".mp4", size_bytes=2048), now)

    def landed(self, identity: bytes, job: JobAssign, path: str, now: float) -> list:
        worker_id, session = identity.decode().split("/")
        return self.send(identity, JobLanded(
            worker_id=worker_id, session=session, job_id=job.job_id, attempt=job.attempt,
            video_path=path, size_bytes=2048), now)

    def failed(self, identity: bytes, job: JobAssign, reason: str, now: float) -> list:
        worker_id, session = identity.decode().split("/")
        return self.send(identity, JobFailed(
            worker_id=worker_id, session=session, job_id=job.job_id, attempt=job.attempt,
            reason=reason, error=f"{reason} happened"), now)

    def row(self, job_id: int) -> dict:
        conn = sqlite3.connect(self.config.db_path)
        conn.row_factory = sqlite3.Row
        try:
            return dict(conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
        finally:
            conn.close()

    def land_file(self, job: JobAssign, size: int = 2048) -> Path:
        path = layout.episode_path(self.config.storage_dir, job.anime_id, job.episode, ".mp4")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"v" * size)
        return path


def status(d: Dispatcher, now: float) -> dict:
    """The status document, as the server builds it."""
    return build_status(d.snapshot(now))


def assigns(out: list, identity: bytes | None = None) -> list[JobAssign]:
    return [m for i, m in out if isinstance(m, JobAssign) and (identity is None or i == identity)]


def only_assign(out: list, identity: bytes) -> JobAssign:
    found = assigns(out)
    assert len(found) == 1, out
    assert [i for i, m in out if isinstance(m, JobAssign)] == [identity]
    return found[0]


def of_type(out: list, cls: type) -> list:
    return [m for _, m in out if isinstance(m, cls)]


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path)
    yield r
    r.d.store.close()


# --- handing out ---------------------------------------------------------------

def test_a_lease_goes_only_to_a_worker_that_asked_for_work(rig: Rig) -> None:
    rig.enqueue(1, [1, 2, 3])
    assert assigns(rig.tick(1.0)) == []  # nobody asked
    job = only_assign(rig.ready(A, 1.0), A)
    assert (job.job_id, job.attempt, job.lease_seconds) == (1, 1, LEASE)
    row = rig.row(1)
    assert row["stage"] == "downloading" and row["lease_owner"] == A.decode()
    assert row["lease_deadline"] == pytest.approx(1.0 + LEASE)
    # the credit is used up: ticks and a repeat of the same seq hand out nothing
    assert assigns(rig.tick(1.5)) == []
    assert assigns(rig.ready(A, 1.6, seq=0)) == []
    assert rig.row(2)["stage"] == "queued"
    # a new idle period (seq 1) is a new credit
    assert only_assign(rig.ready(A, 2.0), A).job_id == 2


def test_a_landing_handled_after_the_workers_ready_keeps_its_credit(rig: Rig) -> None:
    """A worker asks for work right behind its landing; when the landing is handled after
    that ready (a re-send of one the dispatcher could not record), the credit stands."""
    rig.enqueue(1, [1])
    job = only_assign(rig.ready(A, 1.0), A)
    rig.finished(A, job, 1.1)
    path = rig.land_file(job)
    assert assigns(rig.ready(A, 1.2)) == []  # nothing queued: the credit waits
    rig.landed(A, job, str(path), 1.3)
    assert rig.row(1)["stage"] == "downloaded"
    rig.enqueue(1, [2])
    assert only_assign(rig.tick(1.4), A).job_id == 2


def test_work_added_by_another_program_is_handed_out_without_a_restart(rig: Rig) -> None:
    rig.enqueue(1, [1])
    job = only_assign(rig.ready(A, 1.0), A)
    rig.finished(A, job, 1.1)
    rig.landed(A, job, str(layout.episode_path(rig.config.storage_dir, 1, 1, ".mp4")), 1.2)
    assert assigns(rig.ready(A, 1.3)) == []  # the queue is empty: A waits idle
    rig.tick(1.4)  # a refresh pass ran just now, so the next one is rate-limited
    rig.enqueue(2, [1])  # anime-enqueue commits from its own connection
    rig.tick(1.5)  # seen, inside the rate limit: must not be forgotten
    assert only_assign(rig.tick(2.6), A).job_id == 2


def test_no_lease_without_a_fresh_disk_state(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    r.enqueue(1, [1, 2])
    out = r.d.handle(A, WorkerReady(worker_id="w01", session="aaaa", seq=0), 1.0)
    assert assigns(out) == [] and assigns(r.d.tick(1.5)) == []  # no disk state yet
    assert only_assign(r.disk(2.0), A).job_id == 1  # the first state admits at once
    r.d.handle(A, JobFailed(worker_id="w01", session="aaaa", job_id=1, attempt=1,
                            reason=REASON_INTERRUPTED, error="x"), 2.5)
    out = r.d.handle(A, WorkerReady(worker_id="w01", session="aaaa", seq=1), 10.0)
    assert assigns(out) == [] and assigns(r.d.tick(10.0)) == []  # the state of t=2 is stale
    assert "stale" in status(r.d, 10.0)["disk"]["refusal"]
    assert only_assign(r.disk(10.5), A).job_id == 1
    r.d.store.close()


# --- heartbeats and expiry -----------------------------------------------------

def test_heartbeats_extend_the_lease_and_silence_requeues_with_a_retry(rig: Rig) -> None:
    rig.enqueue(1, [1])
    job = only_assign(rig.ready(A, 0.0), A)
    for t in (4.0, 8.0, 12.0):
        assert rig.beat(A, job, t) == []
        assert rig.tick(t + LEASE - 0.5) == []
        assert rig.row(1)["stage"] == "downloading"
        assert rig.row(1)["lease_deadline"] == pytest.approx(t + LEASE)
    rig.tick(12.0 + LEASE + 0.1)
    row = rig.row(1)
    assert (row["stage"], row["retry_count"], row["lease_owner"]) == ("queued", 1, None)
    assert "Lease lost" in row["error_message"] and "no heartbeat" in row["error_message"]
    assert job.job_id not in rig.d.leases
    # handed out again as a new attempt
    again = only_assign(rig.ready(B, 20.0), B)
    assert (again.job_id, again.attempt) == (1, 2)


def test_expiries_end_failed_after_max_retries(rig: Rig) -> None:
    rig.enqueue(1, [1], max_retries=2)
    now = 0.0
    stages = []
    for _ in range(3):
        job = only_assign(rig.ready(A, now), A)
        now += LEASE + 1
        rig.tick(now)
        row = rig.row(job.job_id)
        stages.append((row["stage"], row["retry_count"]))
    # retry_count < max_retries -> queued (count + 1), else failed
    assert stages == [("queued", 1), ("queued", 2), ("failed", 2)]
    assert assigns(rig.ready(A, now + 1)) == []


def test_counted_failures_follow_the_same_rule(rig: Rig) -> None:
    rig.enqueue(1, [1], max_retries=1)
    job = only_assign(rig.ready(A, 0.0), A)
    assert of_type(rig.failed(A, job, REASON_TIMEOUT, 1.0), JobAck)
    assert (rig.row(1)["stage"], rig.row(1)["retry_count"]) == ("queued", 1)
    job = only_assign(rig.ready(A, 2.0), A)
    rig.failed(A, job, REASON_ERROR, 3.0)
    row = rig.row(1)
    assert (row["stage"], row["retry_count"]) == ("failed", 1)
    assert row["error_message"] == "error happened"
    # a repeat of the failure (the worker re-sends until acked) changes nothing
    assert of_type(rig.failed(A, job, REASON_ERROR, 3.5), JobAck)
    assert (rig.row(1)["stage"], rig.row(1)["retry_count"]) == ("failed", 1)


@pytest.mark.parametrize("reason", [REASON_INTERRUPTED, REASON_NO_SPACE, REASON_HARD_LIMIT])
def test_operator_stop_full_disk_and_hard_limit_requeue_without_a_retry(
        rig: Rig, reason: str) -> None:
    rig.enqueue(1, [1], max_retries=0)
    job = only_assign(rig.ready(A, 0.0), A)
    assert of_type(rig.failed(A, job, reason, 1.0), JobAck)
    row = rig.row(1)
    assert (row["stage"], row["retry_count"], row["next_attempt_at"]) == ("queued", 0, None)
    assert not rig.d.leases and not rig.d.admission.reservations


# --- backoff -------------------------------------------------------------------

def test_backoff_doubles_with_jitter_and_is_capped(tmp_path: Path) -> None:
    r = Rig(tmp_path, retry_backoff_seconds=10, retry_backoff_max_seconds=35)
    r.enqueue(1, list(range(1, 21)), max_retries=10)
    delays: dict[int, list[float]] = {n: [] for n in range(1, 6)}
    now = 0.0
    for retry in range(1, 6):
        jobs = []
        for _ in range(20):
            jobs += assigns(r.ready(A, now), A)
        # every job is handed out again once its backoff is over
        assert len(jobs) == 20, (retry, len(jobs))
        for job in jobs:
            r.failed(A, job, REASON_ERROR, now)
            row = r.row(job.job_id)
            assert row["retry_count"] == retry
            delays[retry].append(row["next_attempt_at"] - now)
        now += 100.0
    for retry, values in delays.items():
        nominal = min(35.0, 10.0 * 2 ** (retry - 1))
        assert all(0.75 * nominal <= v <= min(35.0, 1.25 * nominal) for v in values), (retry, values)
        distinct = len({round(v, 6) for v in values})
        assert distinct > (10 if 1.25 * nominal <= 35.0 else 3), f"no jitter at retry {retry}"
    assert max(delays[5]) <= 35.0  # the cap holds with the jitter
    r.d.store.close()


def test_a_backing_off_job_is_not_handed_out_before_its_time(tmp_path: Path) -> None:
    r = Rig(tmp_path, retry_backoff_seconds=30)
    r.enqueue(1, [1])
    job = only_assign(r.ready(A, 0.0), A)
    r.failed(A, job, REASON_ERROR, 1.0)
    due = r.row(1)["next_attempt_at"]
    assert 1.0 + 22.5 <= due <= 1.0 + 37.5
    assert assigns(r.ready(A, 2.0)) == []
    t = 2.0
    while t < due - 0.5:  # the idle worker re-sends its credit every heartbeat
        assert assigns(r.ready(A, t, seq=1) + r.tick(t)) == [], f"handed out at {t}, due {due}"
        t += 0.5
    assert status(r.d, t)["queue"]["backing_off"] == 1
    # handed out as soon as the backoff is over, not at the next periodic refresh
    out = r.ready(A, due + 0.2, seq=1) + r.tick(due + 0.3)
    again = only_assign(out, A)
    assert (again.job_id, again.attempt) == (1, 2)
    r.d.store.close()


# --- fencing -------------------------------------------------------------------

def test_a_worker_that_lost_its_lease_gets_cancel_never_commit(rig: Rig) -> None:
    rig.enqueue(1, [1])
    old = only_assign(rig.ready(A, 0.0), A)
    rig.tick(LEASE + 1)  # A went silent
    new = only_assign(rig.ready(B, LEASE + 2), B)
    assert new.attempt == old.attempt + 1
    for out in (rig.beat(A, old, LEASE + 3), rig.finished(A, old, LEASE + 3)):
        assert of_type(out, JobCommit) == []
        cancels = of_type(out, JobCancel)
        assert [(c.job_id, c.attempt) for c in cancels] == [(1, old.attempt)]
    # B, the holder, lands it
    commit = of_type(rig.finished(B, new, LEASE + 4), JobCommit)
    assert [(c.job_id, c.attempt) for c in commit] == [(1, new.attempt)]
    path = rig.land_file(new)
    assert commit[0].video_path == str(path)
    assert of_type(rig.landed(B, new, str(path), LEASE + 5), JobAck)
    row = rig.row(1)
    assert (row["stage"], row["video_path"], row["attempt"]) == ("downloaded", str(path), 2)
    # a stale heartbeat after the end is still refused
    assert of_type(rig.beat(A, old, LEASE + 6), JobCancel)
    # a repeated JobLanded is acked, nothing changes
    assert of_type(rig.landed(B, new, str(path), LEASE + 7), JobAck)
    assert rig.row(1)["stage"] == "downloaded"


def test_a_wrong_attempt_number_from_the_holder_is_refused(rig: Rig) -> None:
    rig.enqueue(1, [1])
    job = only_assign(rig.ready(A, 0.0), A)
    assert of_type(rig.beat(A, job, 1.0, attempt=job.attempt + 5), JobCancel)
    assert of_type(rig.beat(A, job, 1.0), JobCancel) == []


def test_a_restarted_worker_loses_its_old_lease(rig: Rig) -> None:
    rig.enqueue(1, [1])
    old = only_assign(rig.ready(A, 0.0), A)
    restarted = b"w01/cccc"  # same worker id, new process
    rig.d.sessions.connected = lambda identity: identity != A  # the old process is gone
    new = only_assign(rig.ready(restarted, 1.0), restarted)
    # the old attempt went back to the queue with a retry and was handed out afresh
    assert (new.job_id, new.attempt) == (old.job_id, old.attempt + 1)
    row = rig.row(old.job_id)
    assert (row["stage"], row["retry_count"], row["lease_owner"]) == ("downloading", 1, "w01/cccc")
    assert "restarted" in row["error_message"]
    assert of_type(rig.beat(A, old, 1.5), JobCancel)
    assert of_type(rig.finished(A, old, 1.6), JobCommit) == []
    assert of_type(rig.finished(restarted, new, 1.7), JobCommit)


# --- dispatcher restart --------------------------------------------------------

def test_a_restarted_dispatcher_readopts_leases_kept_by_heartbeats(rig: Rig) -> None:
    rig.enqueue(1, [1, 2])
    job = only_assign(rig.ready(A, 0.0), A)
    rig.d.store.close()
    d2 = rig.new_dispatcher(3.0)
    assert set(d2.leases) == {job.job_id}
    assert d2.leases[job.job_id].owner == A
    # the worker keeps beating across the restart; the lease never runs out
    for t in (4.0, 8.0, 12.0, 16.0):
        assert of_type(rig.beat(A, job, t), JobCancel) == []
        rig.tick(t + 1)
    assert rig.row(1)["stage"] == "downloading" and rig.row(1)["retry_count"] == 0
    commit = of_type(rig.finished(A, job, 17.0), JobCommit)
    assert len(commit) == 1
    path = rig.land_file(job)
    rig.landed(A, job, str(path), 18.0)
    row = rig.row(1)
    assert (row["stage"], row["retry_count"], row["attempt"]) == ("downloaded", 0, 1)
    # job 2 was never handed out twice
    assert rig.row(2)["attempt"] == 0


def test_a_readopted_lease_without_heartbeats_expires_with_a_retry(rig: Rig) -> None:
    rig.enqueue(1, [1])
    only_assign(rig.ready(A, 0.0), A)
    rig.d.store.close()
    rig.new_dispatcher(3.0)
    rig.tick(3.0 + LEASE - 0.5)
    assert rig.row(1)["stage"] == "downloading"
    rig.tick(3.0 + LEASE + 0.5)
    assert (rig.row(1)["stage"], rig.row(1)["retry_count"]) == ("queued", 1)


def test_a_heartbeat_readopts_a_job_requeued_while_the_dispatcher_was_away(rig: Rig) -> None:
    rig.enqueue(1, [1])
    job = only_assign(rig.ready(A, 0.0), A)
    rig.tick(LEASE + 1)  # expired (e.g. the dispatcher was down longer than the lease)
    assert rig.row(1)["stage"] == "queued"
    assert of_type(rig.beat(A, job, LEASE + 2), JobCancel) == []
    row = rig.row(1)
    assert (row["stage"], row["attempt"], row["lease_owner"]) == ("downloading", 1, A.decode())
    assert assigns(rig.ready(B, LEASE + 3)) == []  # not handed out twice


def test_a_file_already_at_its_final_path_is_settled_at_start(rig: Rig) -> None:
    rig.enqueue(1, [1, 2])
    job = only_assign(rig.ready(A, 0.0), A)
    # the worker renamed the file into place; the dispatcher died before recording it
    path = rig.land_file(job, size=4321)
    private = layout.job_dir(rig.config.storage_dir, job.job_id)
    (private / "dl").mkdir(parents=True)
    rig.d.store.close()
    d2 = rig.new_dispatcher(5.0)
    assert not private.exists()  # nobody held its lock: removed
    row = rig.row(1)
    assert (row["stage"], row["video_path"], row["video_size_bytes"]) == ("downloaded", str(path), 4321)
    assert row["retry_count"] == 0 and not d2.leases
    # the worker's late report is acked, its heartbeat refused; nothing is re-downloaded
    assert of_type(rig.landed(A, job, str(path), 6.0), JobAck)
    assert of_type(rig.beat(A, job, 6.0), JobCancel)
    nxt = only_assign(rig.ready(B, 7.0), B)
    assert nxt.job_id == 2
    assert rig.row(1)["attempt"] == 1


def test_a_landed_report_after_the_lease_ran_out_settles_the_job(rig: Rig) -> None:
    rig.enqueue(1, [1])
    job = only_assign(rig.ready(A, 0.0), A)
    assert of_type(rig.finished(A, job, 1.0), JobCommit)
    private = layout.job_dir(rig.config.storage_dir, job.job_id)
    private.mkdir(parents=True)
    fd = os.open(private / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the worker still holds its private directory
    rig.tick(1.0 + LEASE + 1)  # no JobLanded in time: requeued
    assert rig.row(1)["stage"] == "queued"
    os.close(fd)
    path = rig.land_file(job)
    # a path that is not this job's episode is not believed
    assert of_type(rig.landed(A, job, str(rig.config.path), 8.0), JobAck)
    assert rig.row(1)["stage"] == "queued"
    assert of_type(rig.landed(A, job, str(path), 9.0), JobAck)
    row = rig.row(1)
    assert (row["stage"], row["video_path"]) == ("downloaded", str(path))
    assert assigns(rig.ready(B, 10.0)) == []


def test_a_late_landed_report_takes_the_job_from_a_newer_attempt(rig: Rig) -> None:
    rig.enqueue(1, [1])
    old = only_assign(rig.ready(A, 0.0), A)
    assert of_type(rig.finished(A, old, 1.0), JobCommit)
    rig.tick(1.0 + LEASE + 1)
    new = only_assign(rig.ready(B, 9.0), B)
    path = rig.land_file(old)  # A renamed it before it lost the lease
    assert of_type(rig.landed(A, old, str(path), 9.5), JobAck)
    assert rig.row(1)["stage"] == "downloaded"
    assert not rig.d.leases and not rig.d.admission.reservations
    assert of_type(rig.beat(B, new, 10.0), JobCancel)
    assert of_type(rig.finished(B, new, 10.5), JobCommit) == []


def test_a_queued_job_whose_file_exists_is_settled_not_downloaded(rig: Rig) -> None:
    rig.enqueue(7, [3])
    path = layout.episode_path(rig.config.storage_dir, 7, 3, ".mkv")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x" * 10)
    assert assigns(rig.ready(A, 0.0)) == []
    assert (rig.row(1)["stage"], rig.row(1)["video_path"]) == ("downloaded", str(path))
    # its worker stopped between the link and metadata.json: the dispatcher lists it
    listed = json.loads(layout.metadata_path(rig.config.storage_dir, 7).read_text())
    assert listed["episodes"]["3"]["file"] == "ep003.mkv", listed


# --- invalid rows --------------------------------------------------------------

def test_invalid_rows_fail_with_a_clear_message_and_the_others_run(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    config.db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(config.db_path)
    # an upstream database without the NOT NULL constraints
    conn.execute(CONTRACT_DDL[0])
    conn.execute("""CREATE TABLE jobs (id INTEGER PRIMARY KEY, anime_id INTEGER NOT NULL,
        anime_title TEXT, episode INTEGER, stage TEXT NOT NULL DEFAULT 'queued',
        retry_count INTEGER DEFAULT 0, max_retries INTEGER DEFAULT 3, error_message TEXT,
        video_path TEXT, video_size_bytes INTEGER)""")
    conn.executemany("INSERT INTO anime_selection_cache VALUES (?, ?, ?, 'high')",
                     [(1, 1, "One"), (2, 1, "Two"), (3, 0, "Three")])
    conn.executemany("INSERT INTO jobs (id, anime_id, anime_title, episode) VALUES (?, ?, ?, ?)",
                     [(1, 1, None, 1), (2, 2, "Two", -4), (3, 3, "Three", 1), (4, 1, "One", 2)])
    conn.commit()
    conn.close()
    r = Rig.__new__(Rig)
    r.config, r.seq, r.sessions = config, 0, {}
    r.new_dispatcher(0.0)
    job = only_assign(r.ready(A, 0.0), A)
    assert job.job_id == 4
    errors = {i: (r.row(i)["stage"], r.row(i)["error_message"]) for i in (1, 2, 3)}
    assert errors[1] == ("failed", "Invalid job: anime_title is empty")
    assert errors[2] == ("failed", "Invalid job: episode must be 1 or more, got -4")
    assert errors[3][0] == "failed" and "selected_index must be 1 or more" in errors[3][1]
    r.d.store.close()
