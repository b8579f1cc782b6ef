"""The dispatcher's core when jobs.db is shared with neighbours (issue 21 §1, §4, §5).

A real SQLite file behind a store double that raises ``StoreUnavailable`` (what a
locked database becomes) on the calls a test chooses: memory must not change
before the write it mirrors has committed, no answer goes out for a write not
done, and everything is retried until it is done. A neighbour's own writes go
through a second sqlite3 connection, as anime-selector's or a transcriber's would.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path

import pytest

from services.dispatcher import retries
from services.dispatcher.core import Dispatcher
from services.dispatcher.db_health import DB_RETRY_SECONDS
from services.dispatcher.effects import FileEffects
from services.dispatcher.store import SqlJobStore, StoreUnavailable
from shared.protocol import (REASON_ERROR, REASON_INTERRUPTED, JobAck, JobCancel, JobCommit,
                             JobFailed, JobHeartbeat, WorkerReady, WorkerRefused)
from tests.unit.test_dispatcher_core import LEASE, A, B, Rig, assigns, of_type, only_assign, status

LOCKED = "database is locked"
RETRY = DB_RETRY_SECONDS


class FlakyStore:
    """The real store; the methods named in ``fail`` raise StoreUnavailable instead."""

    def __init__(self, store: SqlJobStore) -> None:
        self._store = store
        self.fail: set[str] = set()
        self.calls: Counter = Counter()

    def __getattr__(self, name: str):
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.calls[name] += 1
            if name in self.fail:
                raise StoreUnavailable(LOCKED)
            return attr(*args, **kwargs)

        return call


class SharedRig(Rig):
    def new_dispatcher(self, now: float, seed: int = 1) -> Dispatcher:
        self.store = FlakyStore(SqlJobStore(self.config.db_path))
        d = Dispatcher(self.store, FileEffects(self.config), self.config)
        d.start(now)
        self.d = d
        return d

    def neighbour(self, sql: str, params: tuple = ()) -> None:
        conn = sqlite3.connect(self.config.db_path)
        try:
            with conn:
                conn.execute(sql, params)
        finally:
            conn.close()


@pytest.fixture
def rig(tmp_path: Path) -> SharedRig:
    r = SharedRig(tmp_path)
    yield r
    r.store.close()


def memory(d: Dispatcher) -> tuple:
    """What must not change while a write waits (the counts are read from the database)."""
    return (sorted((i, l.owner, l.attempt) for i, l in d.leases.items()),
            sorted(d.admission.reservations), len(d.recent.landed), d.recent.dry_run_done)


# --- writes that wait: nothing is answered, memory stays, retried until done ---------------

def test_a_landing_the_database_refuses_is_acked_only_once_it_is_recorded(rig: SharedRig) -> None:
    rig.enqueue(1, [1])
    job = only_assign(rig.ready(A, 0.0), A)
    assert of_type(rig.finished(A, job, 1.0), JobCommit)
    path = rig.land_file(job)
    rig.store.fail = {"mark_downloaded"}
    before = memory(rig.d)
    t = 2.0
    while t < 2.0 + 3 * LEASE:  # the worker re-sends its landing every second, for long
        assert rig.landed(A, job, str(path), t) == [], "acked a landing that was not recorded"
        rig.tick(t + 0.5)
        assert memory(rig.d) == before
        assert rig.row(1)["stage"] == "downloading"
        t += 1.0
    assert status(rig.d, t)["database"]["busy_since"] == pytest.approx(2.0)
    assert status(rig.d, t)["queue"]["downloaded"] == 0
    assert not rig.d.done(t)
    rig.store.fail = set()
    rig.tick(t)  # the retry of the landing
    row = rig.row(1)
    assert (row["stage"], row["video_path"], row["retry_count"]) == ("downloaded", str(path), 0)
    assert not rig.d.leases and not rig.d.admission.reservations
    assert status(rig.d, t)["database"]["busy_since"] is None
    assert of_type(rig.landed(A, job, str(path), t + 1), JobAck)  # the next re-send


def test_a_failure_is_acked_only_after_its_requeue_commits(rig: SharedRig) -> None:
    rig.enqueue(1, [1])
    job = only_assign(rig.ready(A, 0.0), A)
    rig.store.fail = {"requeue"}
    before = memory(rig.d)
    for t in (1.0, 2.0, 3.0 + LEASE, 4.0 + 2 * LEASE):  # re-sent; never expires meanwhile
        assert rig.failed(A, job, REASON_ERROR, t) == []
        rig.tick(t + 0.5)
        assert memory(rig.d) == before and rig.row(1)["stage"] == "downloading"
    rig.store.fail = set()
    assert of_type(rig.failed(A, job, REASON_ERROR, 20.0), JobAck)
    row = rig.row(1)
    assert (row["stage"], row["retry_count"], row["error_message"]) == ("queued", 1, "error happened")
    assert "Lease lost" not in row["error_message"]
    assert not rig.d.leases and not rig.d.admission.reservations


def test_an_expired_lease_stays_owned_until_its_requeue_commits(rig: SharedRig) -> None:
    rig.enqueue(1, [1])
    only_assign(rig.ready(A, 0.0), A)
    rig.store.fail = {"requeue"}
    rig.tick(LEASE + 1)
    assert set(rig.d.leases) == {1} and set(rig.d.admission.reservations) == {1}
    assert rig.row(1)["stage"] == "downloading"
    assert not rig.d.done(LEASE + 1)  # --exit-when-done must not believe all is done
    rig.store.fail = set()
    rig.tick(LEASE + 2)
    row = rig.row(1)
    assert (row["stage"], row["retry_count"]) == ("queued", 1)
    assert not rig.d.leases


def test_heartbeats_are_heard_while_deadlines_wait_and_are_written_in_batches(rig: SharedRig) -> None:
    rig.enqueue(1, [1, 2])
    a = only_assign(rig.ready(A, 0.0), A)
    b = only_assign(rig.ready(B, 0.0), B)
    rig.store.fail = {"extend_leases"}
    for t in (2.0, 4.0, 6.0, 8.0, 10.0, 12.0):
        assert rig.beat(A, a, t) == [] and rig.beat(B, b, t) == []
        rig.tick(t + 0.5)
    assert set(rig.d.leases) == {1, 2}, "a lease expired because the database was busy"
    assert rig.row(1)["lease_deadline"] == pytest.approx(LEASE)  # as the claim wrote it
    rig.store.fail = set()
    calls = rig.store.calls["extend_leases"]
    rig.beat(A, a, 13.0)
    rig.beat(B, b, 13.0)
    rig.tick(13.5)
    assert rig.store.calls["extend_leases"] == calls + 1  # both deadlines in one write
    assert rig.row(1)["lease_deadline"] == pytest.approx(13.0 + LEASE)
    assert rig.row(2)["lease_deadline"] == pytest.approx(13.0 + LEASE)
    rig.tick(14.0)
    assert rig.store.calls["extend_leases"] == calls + 1  # nothing new: nothing written


def test_a_claim_the_database_refuses_keeps_the_workers_credit(rig: SharedRig) -> None:
    rig.enqueue(1, [1])
    rig.store.fail = {"claim_next"}
    assert assigns(rig.ready(A, 0.0)) == []
    assert A in rig.d.sessions.idle and rig.row(1)["stage"] == "queued"
    rig.store.fail = set()
    assert only_assign(rig.tick(1.0), A).job_id == 1


def test_while_the_database_refuses_writes_they_are_not_tried_again_at_once(rig: SharedRig) -> None:
    rig.enqueue(1, [1])
    job = only_assign(rig.ready(A, 0.0), A)
    path = rig.land_file(job)
    rig.finished(A, job, 0.5)
    rig.store.fail = {"mark_downloaded"}
    rig.landed(A, job, str(path), 1.0)
    tried = rig.store.calls["mark_downloaded"]
    for i in range(1, 5):  # messages and ticks within DB_RETRY_SECONDS cost no busy timeout
        rig.landed(A, job, str(path), 1.0 + i * RETRY / 10)
        rig.tick(1.0 + i * RETRY / 10)
    assert rig.store.calls["mark_downloaded"] == tried
    rig.tick(1.0 + RETRY)
    assert rig.store.calls["mark_downloaded"] == tried + 1


def test_an_invalid_row_is_held_by_the_dispatcher_until_its_failure_is_written(rig: SharedRig) -> None:
    rig.enqueue(1, [1], index=0)  # an invalid selection: the job fails at its claim
    rig.enqueue(2, [1])
    rig.store.fail = {"mark_failed"}
    assert assigns(rig.ready(A, 0.0)) == []  # the database is busy: no claim either
    assert rig.row(1)["stage"] == "downloading" and 1 in rig.d.leases
    assert status(rig.d, 0.0)["workers"][0]["job"] is None
    assert not rig.d.done(0.0)
    rig.store.fail = set()
    assert only_assign(rig.tick(1.0), A).job_id == 2
    row = rig.row(1)
    assert row["stage"] == "failed" and "selected_index must be 1 or more" in row["error_message"]
    assert set(rig.d.leases) == {2}


def test_a_job_whose_worker_is_gone_goes_back_only_when_written(rig: SharedRig) -> None:
    rig.enqueue(1, [1])
    job = only_assign(rig.ready(A, 0.0), A)
    rig.store.fail = {"requeue"}
    rig.d.undeliverable(A, job, 0.1)
    assert set(rig.d.leases) == {1} and rig.row(1)["stage"] == "downloading"
    rig.store.fail = set()
    rig.tick(1.0)
    row = rig.row(1)
    assert (row["stage"], row["retry_count"]) == ("queued", 0)
    assert not rig.d.leases


def test_a_stalled_loop_lets_no_lease_run_out(rig: SharedRig) -> None:
    rig.enqueue(1, [1])
    job = only_assign(rig.ready(A, 0.0), A)
    rig.d.stalled(20.0, 21.0)  # blocked for 20 s: the heartbeats of that time wait in the socket
    rig.tick(21.0)
    assert set(rig.d.leases) == {1}
    rig.beat(A, job, 21.1)
    assert rig.row(1)["stage"] == "downloading" and rig.row(1)["retry_count"] == 0


def test_start_on_a_locked_database_changes_nothing_and_can_be_tried_again(rig: SharedRig) -> None:
    rig.enqueue(1, [1])
    only_assign(rig.ready(A, 0.0), A)
    rig.store.close()
    store = FlakyStore(SqlJobStore(rig.config.db_path))
    d = Dispatcher(store, FileEffects(rig.config), rig.config)
    store.fail = {"leases"}
    with pytest.raises(StoreUnavailable):
        d.start(1.0)
    assert not d.started and not d.leases and not d.admission.reservations
    assert status(d, 1.0)["database"]["busy_since"] == 1.0
    store.fail = set()
    d.start(1.5)
    assert d.started and set(d.leases) == {1}
    rig.store, rig.d = store, d


# --- a neighbour changes a row the dispatcher holds: left to it, never overwritten -------

def test_a_job_a_neighbour_takes_while_it_downloads_is_left_to_it(rig: SharedRig) -> None:
    rig.enqueue(1, [1, 2])
    job = only_assign(rig.ready(A, 0.0), A)
    rig.neighbour("UPDATE jobs SET stage = 'skipped' WHERE id = 1")
    rig.beat(A, job, 1.0)
    out = rig.tick(1.5)  # the deadline write finds the row changed
    cancels = of_type(out, JobCancel)
    assert [(c.job_id, c.attempt) for c in cancels] == [(1, job.attempt)]
    assert "another program" in cancels[0].reason
    assert not rig.d.leases and not rig.d.admission.reservations
    assert of_type(rig.finished(A, job, 2.0), JobCancel)  # never a commit
    row = rig.row(1)
    assert (row["stage"], row["video_path"]) == ("skipped", None)


def test_a_landing_or_failure_of_a_row_a_neighbour_changed_does_not_overwrite_it(rig: SharedRig) -> None:
    rig.enqueue(1, [1, 2])
    first = only_assign(rig.ready(A, 0.0), A)
    second = only_assign(rig.ready(B, 0.0), B)
    path = rig.land_file(first)
    rig.finished(A, first, 0.5)
    rig.neighbour("UPDATE jobs SET stage = 'failed', error_message = 'cancelled by the user'")
    assert of_type(rig.landed(A, first, str(path), 1.0), JobAck)
    assert of_type(rig.failed(B, second, REASON_ERROR, 1.0), JobAck)
    for job_id in (1, 2):
        row = rig.row(job_id)
        assert (row["stage"], row["error_message"], row["retry_count"], row["video_path"]) == (
            "failed", "cancelled by the user", 0, None)
    assert not rig.d.leases


# --- landings: only the holder, only at the path it was given ----------------------------

def test_a_landing_from_anyone_but_the_holder_or_at_another_path_is_not_recorded(rig: SharedRig) -> None:
    rig.enqueue(1, [1])
    job = only_assign(rig.ready(A, 0.0), A)
    commit = of_type(rig.finished(A, job, 0.5), JobCommit)[0]
    path = rig.land_file(job)
    rig.ready(B, 0.6)
    assert of_type(rig.landed(B, job, str(path), 1.0), JobAck)  # B does not hold it
    assert of_type(rig.landed(A, job, str(rig.config.path), 1.1), JobAck)  # not its path
    assert rig.row(1)["stage"] == "downloading" and set(rig.d.leases) == {1}
    assert of_type(rig.landed(A, job, commit.video_path, 1.2), JobAck)
    assert (rig.row(1)["stage"], rig.row(1)["video_path"]) == ("downloaded", str(path))


# --- one live session per worker id; the id bound to its CURVE key ------------------------

def test_a_second_live_worker_with_the_same_id_is_refused_and_takes_nothing(rig: SharedRig) -> None:
    rig.enqueue(1, [1, 2])
    job = only_assign(rig.ready(A, 0.0), A)
    twin = b"w01/cccc"
    for t in (1.0, 2.0, 3.0, 4.0):  # both keep talking: no lease goes back and forth
        out = rig.ready(twin, t)
        assert of_type(out, WorkerRefused) and assigns(out) == []
        assert "another worker with id w01 is running" in of_type(out, WorkerRefused)[0].reason
        assert rig.beat(A, job, t) == []
    row = rig.row(1)
    assert (row["stage"], row["lease_owner"], row["retry_count"]) == ("downloading", A.decode(), 0)
    assert twin not in rig.d.sessions.workers
    # the first one is gone for real (no longer connected): the twin is taken at once
    rig.d.sessions.connected = lambda identity: identity != A
    new = only_assign(rig.ready(twin, 5.0), twin)
    assert (new.job_id, new.attempt) == (1, 2)
    assert rig.row(1)["retry_count"] == 1 and "restarted" in rig.row(1)["error_message"]
    # and when the old one speaks again, it is the one refused
    rig.d.sessions.connected = lambda identity: True
    out = rig.beat(A, job, 6.0)
    assert of_type(out, WorkerRefused) and of_type(out, JobCancel)
    assert rig.row(1)["lease_owner"] == twin.decode()


def test_a_worker_id_used_by_one_key_is_refused_for_another(rig: SharedRig) -> None:
    rig.enqueue(1, [1, 2])
    rig.disk(0.0)
    out = rig.d.handle(A, WorkerReady(worker_id="w01", session="aaaa", seq=0), 0.0, key="KEY-A")
    job = only_assign(out, A)
    rig.d.sessions.connected = lambda identity: False  # even with A apparently gone
    thief = b"w01/eeee"
    out = rig.d.handle(thief, WorkerReady(worker_id="w01", session="eeee", seq=0), 1.0, key="KEY-E")
    assert of_type(out, WorkerRefused) and assigns(out) == []
    assert "another CURVE key" in of_type(out, WorkerRefused)[0].reason
    # A's own routing id from another key: refused too, the lease is not touched
    for msg in (JobHeartbeat(worker_id="w01", session="aaaa", job_id=1, attempt=1, bytes=1),
                JobFailed(worker_id="w01", session="aaaa", job_id=1, attempt=1,
                          reason=REASON_ERROR, error="x")):
        out = rig.d.handle(A, msg, 2.0, key="KEY-E")
        assert of_type(out, WorkerRefused)
    row = rig.row(1)
    assert (row["stage"], row["retry_count"], row["lease_owner"]) == ("downloading", 0, A.decode())
    assert rig.d.handle(A, JobHeartbeat(worker_id="w01", session="aaaa", job_id=1, attempt=1,
                                        bytes=1), 3.0, key="KEY-A") == []
    assert job.job_id in rig.d.leases


def test_a_message_naming_another_worker_id_than_its_identity_is_refused(rig: SharedRig) -> None:
    rig.enqueue(1, [1])
    rig.disk(0.0)
    out = rig.d.handle(A, WorkerReady(worker_id="w02", session="aaaa", seq=0), 0.0)
    assert of_type(out, WorkerRefused) and assigns(out) == []


# --- uncounted requeues: back off, then count ----------------------------------------------

def test_a_job_interrupted_again_and_again_backs_off_then_counts(rig: SharedRig) -> None:
    """E.g. its private directory is still locked by a live attempt: every idle worker
    would claim it (claims are by id), fail and requeue it in a tight loop."""
    rig.enqueue(1, [1, 2, 3])
    now, holds = 0.0, []
    for n in range(1, retries.INTERRUPTED_CAP + 1):
        job = only_assign(rig.ready(A, now), A)
        assert job.job_id == 1, f"job 1 not handed out again after its hold ({n})"
        rig.failed(A, job, REASON_INTERRUPTED, now)
        row = rig.row(1)
        holds.append(None if row["next_attempt_at"] is None else row["next_attempt_at"] - now)
        if n < retries.INTERRUPTED_CAP:
            assert row["retry_count"] == 0
        if row["next_attempt_at"] is not None:
            # meanwhile the others are handed out
            other = only_assign(rig.ready(B, now + 0.1), B)
            assert other.job_id != 1
            rig.failed(B, other, REASON_INTERRUPTED, now + 0.1)
        now = (row["next_attempt_at"] or now) + 0.1
    assert holds[0] is None  # the first interruption (an operator stop) is handed out at once
    assert 0.75 <= holds[1] <= 1.25 and 1.5 <= holds[2] <= 2.5 and 3.0 <= holds[3] <= 5.0
    row = rig.row(1)
    assert row["retry_count"] == 1 and "interrupted 5 times in a row" in row["error_message"]


# --- long runs: what memory keeps stays bounded ---------------------------------------------

def test_sessions_that_come_and_go_leave_nothing_behind(rig: SharedRig) -> None:
    rig.enqueue(1, list(range(1, 41)))
    now = 0.0
    for n in range(40):
        identity = f"w{n % 3:02d}/{n:04x}".encode()
        rig.d.sessions.connected = lambda i, me=identity: i == me
        job = only_assign(rig.ready(identity, now), identity)
        rig.finished(identity, job, now)
        rig.landed(identity, job, str(rig.land_file(job)), now)
        worker_id, session = identity.decode().split("/")
        now += 1
    rig.tick(now + LEASE + 1)
    assert len(rig.d.sessions.consumed_seq) <= 1 and len(rig.d.sessions.workers) <= 1 and len(rig.d.sessions.idle) <= 1
    assert len(rig.d.sessions.keys) <= 1


def test_the_no_selection_log_keeps_only_series_still_without_a_selection(rig: SharedRig) -> None:
    from services.enqueue import enqueue

    for mal_id in range(100, 110):
        enqueue(rig.config.db_path, mal_id, "No Selection", [1], 3, None)
    rig.tick(10.0)
    assert rig.d.counts.no_selection_logged == set(range(100, 110))
    for mal_id in range(100, 110):
        enqueue(rig.config.db_path, mal_id, "No Selection", [1], 3, (1, "Found", "high"))
    rig.tick(20.0)
    assert rig.d.counts.no_selection_logged == set()


# --- opening a database a neighbour holds --------------------------------------------------

def _hold_lock(db_path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(db_path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_an_up_to_date_database_opens_while_a_neighbour_holds_the_write_lock(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    SqlJobStore(db).open()  # WAL, our columns
    neighbour = _hold_lock(db)
    try:
        store = SqlJobStore(db)
        store.open()  # reads only: no lock needed
        assert store.stage_counts() == {}
        with pytest.raises(StoreUnavailable):
            store.claim_next("w01/a", 1.0, 0.0)  # a write waits 0.1 s, then gives up
        store.close()
    finally:
        neighbour.close()


def test_a_rollback_journal_database_locked_by_a_neighbour_is_switched_when_it_lets_go(
        tmp_path: Path) -> None:
    from shared.models import CONTRACT_DDL

    db = tmp_path / "jobs.db"
    conn = sqlite3.connect(db)
    for ddl in CONTRACT_DDL:
        conn.execute(ddl)
    conn.commit()
    conn.close()
    neighbour = _hold_lock(db)
    store = SqlJobStore(db)
    with pytest.raises(StoreUnavailable):
        store.open()  # SQLite refuses the switch to WAL at once while the lock is held
    neighbour.close()
    store.open()
    assert store.db.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert "attempt" in {c.name for c in store.db.get_columns("jobs")}
    store.close()
