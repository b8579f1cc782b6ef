"""The dispatcher's rooms one by one, over an injected clock and the fake effects: no
disk, no socket, no database but where a room reads one (a counting double).

leases (fencing, expiry, deadlines, what a stop waits for), stopping (the grace),
sessions (credits, one live session per id), settlement (landed files, private
directories), counts (the rate-limited refresh, an empty queue), retries (backoff).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from services.dispatcher import retries as retries_module
from services.dispatcher.counts import REFRESH_SECONDS, QueueCounts
from services.dispatcher.db_health import Database
from services.dispatcher.leases import (DISPATCHER, FAIL, LAND, REQUEUE, Ending, Lease,
                                        LeaseTable)
from services.dispatcher.retries import INTERRUPTED_CAP, RetryPolicy
from services.dispatcher.sessions import Sessions
from services.dispatcher.settlement import Settlement
from services.dispatcher.stopping import STOP_GRACE_SECONDS, Stopping
from services.dispatcher.store import ClaimedJob, StoreUnavailable
from shared.config import DownloaderConfig
from shared.protocol import (REASON_ERROR, REASON_INTERRUPTED, REASON_INVALID, REASON_NO_SPACE,
                             JobFailed, JobLanded, WorkerReady)
from tests.unit.dispatcher_fakes import STORAGE, CountingStore, FakeEffects

A, B = b"w01/aaaa", b"w02/bbbb"


def job(job_id: int = 1, attempt: int = 1, anime_id: int = 7, episode: int = 3) -> ClaimedJob:
    return ClaimedJob(job_id, anime_id, "Show", episode, attempt, 0, 3, 1, "Show (site)", "high")


def table(*leases: Lease) -> LeaseTable:
    t = LeaseTable()
    for lease in leases:
        t[lease.job.id] = lease
    return t


# --- leases ----------------------------------------------------------------------

def test_only_the_holder_with_its_attempt_speaks_for_a_lease() -> None:
    t = table(Lease(job(1, attempt=2), A, deadline=10.0, started_at=0.0))
    assert t.held(A, 1, 2) is t[1]
    assert t.held(A, 1, 1) is None and t.held(B, 1, 2) is None  # older attempt, another worker
    assert t.held(A, 9, 2) is None  # no such lease
    t[1].ending = Ending(REQUEUE)  # taken back: its write waits for the database
    assert t.held(A, 1, 2) is None
    t[1].ending = Ending(LAND)  # a landing on its way is still the holder's
    assert t.held(A, 1, 2) is t[1]


def test_a_lease_readopted_without_an_owner_goes_to_its_first_claimant() -> None:
    t = table(Lease(job(1), b"unknown", deadline=10.0, started_at=0.0))
    assert t.held(B, 1, 1) is t[1] and t[1].owner == B
    assert t.held(A, 1, 1) is None  # from then on it is fenced like any other


def test_expiry_deadlines_and_a_stalled_loop() -> None:
    first = Lease(job(1), A, deadline=10.0, started_at=0.0)
    second = Lease(job(2), B, deadline=20.0, started_at=0.0)
    t = table(first, second)
    assert t.expired(10.5) == [first]
    first.ending = Ending(REQUEUE)
    assert t.expired(10.5) == []  # ending already: not lost twice
    assert t.pending_writes() == 1
    t.alive(second, 15.0, lease_seconds=6.0)
    assert second.deadline == 21.0 and t.dirty() == [second] and t.pending_writes() == 2
    t.stalled(30.0)  # the loop was blocked: no lease runs out for that time
    assert second.deadline == 51.0 and t.expired(50.0) == []


@pytest.mark.parametrize("everyone_stops", [False, True])
def test_what_a_stop_waits_for(everyone_stops: bool) -> None:
    downloading = Lease(job(1), A, 10.0, 0.0)
    stopping = Lease(job(2), B, 10.0, 0.0, state="stopping")
    gone = Lease(job(3), b"w03/cccc", 10.0, 0.0)
    writing = Lease(job(4), DISPATCHER, float("inf"), 0.0, ending=Ending(FAIL))
    t = table(downloading, stopping, gone, writing)
    awaited = t.awaited_at_stop(lambda identity: identity != gone.owner, everyone_stops)
    # an ending not yet written always; a worker that stops too; a worker that goes on
    # downloading only when the whole tree stops; a worker that is gone never
    expected = [downloading, stopping, writing] if everyone_stops else [stopping, writing]
    assert sorted(l.job.id for l in awaited) == sorted(l.job.id for l in expected)


# --- stopping ---------------------------------------------------------------------

def test_a_stop_waits_for_hand_backs_until_its_grace_runs_out() -> None:
    lease = Lease(job(1), A, 10.0, 0.0)
    t = table(lease)
    stop = Stopping(t, Sessions(lease_seconds=6.0))
    stop.begin(100.0, everyone_stops=True)
    assert stop.requested
    assert not stop.may_exit(100.0 + STOP_GRACE_SECONDS - 0.1)
    assert stop.may_exit(100.0 + STOP_GRACE_SECONDS)  # the lease is left for the next start
    del t[1]  # handed back and written
    assert stop.may_exit(100.1)


def test_a_stop_does_not_wait_for_a_worker_that_has_gone() -> None:
    t = table(Lease(job(1), A, 10.0, 0.0))
    sessions = Sessions(lease_seconds=6.0)
    stop = Stopping(t, sessions)
    stop.begin(100.0, everyone_stops=True)
    assert not stop.may_exit(100.5)
    sessions.connected = lambda identity: False  # it exited without a word (killed)
    assert stop.may_exit(101.0)


def test_a_stop_with_nothing_to_wait_for_ends_at_once() -> None:
    t = table(Lease(job(1), A, 10.0, 0.0))  # a worker that goes on downloading
    stop = Stopping(t, Sessions(lease_seconds=6.0))
    stop.begin(100.0, everyone_stops=False)  # the dispatcher alone is stopped (a restart)
    assert stop.may_exit(100.0)


# --- sessions -------------------------------------------------------------------

def ready(identity: bytes, seq: int) -> WorkerReady:
    worker_id, session = identity.decode().split("/")
    return WorkerReady(worker_id=worker_id, session=session, seq=seq)


def test_each_idle_period_is_one_credit() -> None:
    s = Sessions(lease_seconds=6.0)
    assert s.admit(A, "", ready(A, 0), 0.0, lambda: []) == (None, [])
    assert s.credit(A, ready(A, 0), 0.0)
    assert s.credit(A, ready(A, 0), 0.5)  # re-sent while still idle: the same credit
    assert list(s.idle) == [A]
    s.used(A, 0)
    assert not s.credit(A, ready(A, 0), 1.0), "a credit already spent came back"
    assert s.credit(A, ready(A, 1), 2.0)  # the next idle period
    s.busy(A, "downloading")  # a heartbeat: it holds a job, not a credit
    assert A not in s.idle and s.workers[A].state == "downloading"


def test_a_second_live_session_of_an_id_is_refused_a_gone_one_replaced() -> None:
    live = {A}
    s = Sessions(lease_seconds=6.0, connected=lambda identity: identity in live)
    s.admit(A, "", ready(A, 0), 0.0, lambda: [])
    twin = b"w01/cccc"
    refusal, gone = s.admit(twin, "", ready(twin, 0), 1.0, lambda: [A])
    assert "another worker with id w01 is running" in refusal and gone == []
    live.clear()  # the first process is gone for real
    refusal, gone = s.admit(twin, "", ready(twin, 0), 2.0, lambda: [A])
    assert refusal is None and gone == [A]
    s.forget(A, [])
    assert set(s.workers) == {twin} and s.keys == {"w01": ""}
    assert s.silent(2.0 + 6.0 + 0.1) == [twin]


def test_a_worker_id_belongs_to_the_key_that_used_it_first() -> None:
    s = Sessions(lease_seconds=6.0)
    s.admit(A, "KEY-A", ready(A, 0), 0.0, lambda: [])
    refusal, _ = s.admit(b"w01/eeee", "KEY-E", ready(b"w01/eeee", 0), 1.0, lambda: [])
    assert "another CURVE key" in refusal
    s.forget(A, [])  # its last session and lease gone: the id is free again
    assert s.admit(b"w01/eeee", "KEY-E", ready(b"w01/eeee", 0), 2.0, lambda: [])[0] is None


# --- settlement -------------------------------------------------------------------

def landed(identity: bytes, path: Path, attempt: int = 1) -> JobLanded:
    worker_id, session = identity.decode().split("/")
    return JobLanded(worker_id=worker_id, session=session, job_id=1, attempt=attempt,
                     video_path=str(path), size_bytes=2048)


def test_a_file_in_place_settles_its_job_and_a_vanished_one_counts_a_retry() -> None:
    fx = FakeEffects()
    settlement = Settlement(fx, STORAGE)
    path = fx.land(7, 3, size=4321)
    assert settlement.landed(job()) == path
    ending = settlement.ending_for_file(path, "found at start")
    assert (ending.kind, ending.size, ending.video_path, ending.settled) == (
        LAND, 4321, str(path), "found at start")
    del fx.files[path]  # a transcriber moved it meanwhile
    ending = settlement.ending_for_file(path, "no heartbeat for 6s")
    assert (ending.kind, ending.count_retry) == (REQUEUE, True)
    assert ending.error == "Lease lost: no heartbeat for 6s"


def test_a_landing_is_believed_from_the_holder_at_its_path_only() -> None:
    fx = FakeEffects()
    settlement = Settlement(fx, STORAGE)
    lease = Lease(job(), A, 10.0, 0.0)
    path = settlement.target(lease.job, ".mkv")
    assert settlement.landing_refusal(lease, B, landed(B, path)) == "sender does not hold the lease"
    # no commit (the dispatcher restarted): the file must be at the job's episode path
    assert settlement.landing_refusal(lease, A, landed(A, path)) == "no such file at the job's episode path"
    fx.land(7, 3, ext=".mkv")
    assert settlement.landing_refusal(lease, A, landed(A, path)) is None
    lease.committed_path = str(path)
    assert settlement.landing_refusal(lease, A, landed(A, STORAGE / "elsewhere.mkv")).startswith(
        "not the path of its commit")


def test_the_sweep_removes_stale_private_dirs_and_keeps_live_ones() -> None:
    fx = FakeEffects()
    live, stale, odd = fx.private_dir("job-1"), fx.private_dir("job-2"), fx.private_dir("junk")
    settlement = Settlement(fx, STORAGE)
    dirs = settlement.private_dirs()
    fx.problem = "storage_dir belongs to another installation"
    settlement.sweep(dirs, live={1})
    assert fx.removed == []  # another installation's directories are not stale
    fx.problem = None
    settlement.sweep(dirs, live={1})
    assert sorted(fx.removed) == sorted([stale, odd]) and list(fx.private) == [live]


def test_a_private_dir_still_locked_by_an_attempt_is_left_to_it() -> None:
    fx = FakeEffects()
    settlement = Settlement(fx, STORAGE)
    fx.locked.add(5)
    settlement.cleanup_if_free(5)
    assert fx.removed == []
    settlement.cleanup(5)  # a failed job's directory goes regardless
    assert len(fx.removed) == 1 and fx.removed[0].name == "job-5"


# --- counts -----------------------------------------------------------------------

def counts_over(store: CountingStore) -> tuple[QueueCounts, Database]:
    return QueueCounts(perf_clock=lambda: 0.0), Database(store)


def test_counts_are_read_again_only_when_something_changed_and_at_most_once_a_second() -> None:
    store = CountingStore()
    counts, db = counts_over(store)
    assert counts.refresh(db, 0.0, force=True) and store.passes == 1
    assert counts.refresh(db, 5.0) and store.passes == 1  # nothing changed: no pass
    counts.changed()
    counts.refresh(db, 5.5)
    assert store.passes == 2 and counts.counted_at == 5.5
    counts.changed()
    counts.refresh(db, 6.0)  # inside the rate limit
    assert store.passes == 2
    store.external = True  # another program committed: seen now, remembered for later
    counts.refresh(db, 6.2)
    assert store.passes == 2
    counts.refresh(db, 6.6)
    assert store.passes == 3
    counts.refresh(db, 6.6 + REFRESH_SECONDS)  # the safety net
    assert store.passes == 4


def test_an_empty_queue_is_not_asked_again_until_a_backoff_runs_out() -> None:
    store = CountingStore()
    store.next_retry_at = 50.0
    counts, db = counts_over(store)
    counts.refresh(db, 0.0, force=True)
    counts.queue_empty = True  # the last claim found nothing
    assert counts.nothing_to_claim(49.0)
    assert not counts.nothing_to_claim(50.0) and not counts.queue_empty
    counts.queue_empty = True
    counts.changed(requeued=True)  # a job handed back may be runnable
    assert not counts.nothing_to_claim(51.0)


def test_counts_that_cannot_be_read_stay_as_they_were() -> None:
    class Locked(CountingStore):
        def stage_counts(self) -> dict[str, int]:
            raise StoreUnavailable("database is locked")

    store = CountingStore()
    counts, db = counts_over(store)
    counts.refresh(db, 0.0, force=True)
    db.store = Locked()
    assert not counts.refresh(db, 2.0, force=True)
    assert counts.counts == {"queued": 1} and counts.counted_at == 0.0
    assert db.health.busy_since == 2.0


def test_series_without_a_selection_are_logged_once_while_they_last() -> None:
    store = CountingStore()
    counts, db = counts_over(store)
    store.without = [100, 101]
    counts.refresh(db, 0.0, force=True)
    assert counts.no_selection_logged == {100, 101}
    store.without = [101]
    counts.refresh(db, 10.0, force=True)
    assert counts.no_selection_logged == {101}


# --- retries ----------------------------------------------------------------------

def failed(reason: str) -> JobFailed:
    return JobFailed(worker_id="w01", session="aaaa", job_id=1, attempt=1, reason=reason,
                     error=f"{reason} happened")


def policy(base: float = 10.0, cap: float = 35.0, seed: int = 3) -> RetryPolicy:
    return RetryPolicy(DownloaderConfig(retry_backoff_seconds=base, retry_backoff_max_seconds=cap),
                       random.Random(seed))


def test_counted_retries_back_off_doubling_with_jitter_under_the_cap() -> None:
    at = policy().backoff_at(100.0)
    for retry, nominal in ((1, 10.0), (2, 20.0), (3, 35.0), (9, 35.0)):
        delay = at(retry) - 100.0
        assert 0.75 * nominal <= delay <= min(35.0, 1.25 * nominal), (retry, delay)
    assert policy(base=0).backoff_at(100.0)(1) is None


def test_interruptions_in_a_row_hold_the_job_then_count_a_retry() -> None:
    p = policy()
    holds = []
    for n in range(1, INTERRUPTED_CAP + 1):
        ending = p.failure_ending(1, failed(REASON_INTERRUPTED))
        holds.append(p.not_before(1, ending, 0.0))
        if n < INTERRUPTED_CAP:
            assert not ending.count_retry
        p.requeued(1, ending, "queued")
    assert ending.count_retry and "interrupted 5 times in a row" in ending.error
    assert holds[0] is None and 0.75 <= holds[1] <= 1.25 and 1.5 <= holds[2] <= 2.5
    p.requeued(1, p.failure_ending(1, failed(REASON_ERROR)), "queued")  # a counted one ends the streak
    assert p.not_before(1, p.failure_ending(1, failed(REASON_NO_SPACE)), 0.0) is None


def test_an_invalid_job_fails_for_good() -> None:
    ending = policy().failure_ending(1, failed(REASON_INVALID))
    assert (ending.kind, ending.error) == (FAIL, "invalid happened")


def test_streaks_kept_are_bounded(monkeypatch) -> None:
    monkeypatch.setattr(retries_module, "STREAKS_KEPT", 3)
    p = policy()
    for job_id in range(10):
        p.requeued(job_id, p.failure_ending(job_id, failed(REASON_INTERRUPTED)), "queued")
    assert [p.not_before(j, Ending(REQUEUE, reason=REASON_INTERRUPTED), 0.0) is not None
            for j in range(10)] == [False] * 7 + [True] * 3


# --- the core over the fake effects: its decisions need no disk -------------------------

def test_the_core_settles_and_sweeps_through_its_effects_alone(tmp_path: Path) -> None:
    from services.dispatcher.core import Dispatcher
    from services.dispatcher.store import SqlJobStore
    from services.enqueue import enqueue
    from tests.unit.test_dispatcher_core import make_config
    from tests.system import running_state

    config = make_config(tmp_path)
    enqueue(config.db_path, 7, "Show", [1, 2, 3], 3, (1, "Show (site)", "high"))
    fx = FakeEffects(config.storage_dir)
    stale = fx.private_dir("job-99")
    on_disk = fx.land(7, 1, size=777)  # episode 1 is there already
    d = Dispatcher(SqlJobStore(config.db_path), fx, config, rng=random.Random(1))
    d.start(0.0)
    assert fx.removed == [stale] and fx.polled == [0.0]
    d.on_disk_state(running_state(), 0.0)
    out = d.handle(A, ready(A, 0), 0.0)
    assert [(m.job_id, m.storage_id) for _, m in out] == [(2, "fake-storage-id")]
    assert d.store.get(1).stage == "downloaded" and d.store.get(1).video_path == str(on_disk)
    fx.land(7, 2, size=888)  # the worker linked it, then went silent
    d.tick(0.0 + config.queue.lease_seconds + 1)
    row = d.store.get(2)
    assert (row.stage, row.retry_count) == ("downloaded", 0)
    assert not config.storage_dir.exists()  # nothing at all was done on the disk
    d.store.close()


def test_a_stopping_core_hands_out_nothing_and_records_the_hand_backs(tmp_path: Path) -> None:
    from services.dispatcher.core import Dispatcher
    from services.dispatcher.store import SqlJobStore
    from services.enqueue import enqueue
    from shared.protocol import JobAck, JobAssign
    from tests.unit.test_dispatcher_core import make_config
    from tests.system import running_state

    config = make_config(tmp_path)
    enqueue(config.db_path, 7, "Show", [1, 2], 3, (1, "Show (site)", "high"))
    d = Dispatcher(SqlJobStore(config.db_path), FakeEffects(config.storage_dir), config)
    d.start(0.0)
    d.on_disk_state(running_state(), 0.0)
    [(_, first)] = d.handle(A, ready(A, 0), 0.0)
    d.begin_stop(1.0, everyone_stops=True)  # supervisord is gone: A stops too
    assert d.handle(B, ready(B, 0), 1.0) == [] and d.tick(1.1) == []  # nothing more handed out
    assert not d.may_exit(1.2)
    out = d.handle(A, JobFailed(worker_id="w01", session="aaaa", job_id=first.job_id,
                                attempt=first.attempt, reason=REASON_INTERRUPTED,
                                error="interrupted by a stop request"), 1.3)
    assert [type(m) for _, m in out] == [JobAck] and isinstance(first, JobAssign)
    row = d.store.get(first.job_id)
    assert (row.stage, row.retry_count) == ("queued", 0)
    assert d.may_exit(1.4)
    d.store.close()
