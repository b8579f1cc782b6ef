"""The operator's controls in the dispatcher's core (services/dispatcher/controls.py),
driven with an injected clock over a real SQLite file: what each request changes in
the database and in memory, in that order, and what the workers are told.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from services.dispatcher.controls import RESTART_HOLD_SECONDS, ManualPause
from services.dispatcher.core import Dispatcher
from services.enqueue import enqueue
from shared.protocol import (ControlBandwidth, ControlCancel, ControlPause, ControlPriority,
                             ControlReply, ControlResume, ControlRetry, JobAssign, JobCancel,
                             JobHeartbeat, JobLanded)
from tests.unit.test_dispatcher_core import A, B, Rig, assigns, of_type, only_assign, status
from tests.unit.test_dispatcher_shared_db import SharedRig

SRC = "anime-ctl"


@pytest.fixture
def rig(tmp_path: Path) -> SharedRig:
    r = SharedRig(tmp_path)
    yield r
    r.store.close()


def control(rig: Rig, msg, now: float) -> tuple[ControlReply, list]:
    rig.disk(now)
    return rig.d.control(msg, now)


def running(rig: Rig, identity: bytes, now: float) -> JobAssign:
    job = only_assign(rig.ready(identity, now), identity)
    rig.beat(identity, job, now + 0.1)
    return job


def test_a_pause_holds_the_queue_survives_a_restart_and_ends_at_its_time(rig: SharedRig) -> None:
    rig.enqueue(5114, [1, 2])
    reply, out = control(rig, ControlPause(source=SRC, duration_seconds=60.0), 10.0)
    assert reply.ok and reply.message.startswith("paused until ") and out == []
    assert assigns(rig.ready(A, 11.0)) == []
    doc = status(rig.d, 11.0)
    assert doc["pause"] == {"paused": True, "at": 10.0, "until": 70.0, "by": SRC, "interrupted": False}
    assert doc["disk"]["refusal"].startswith("paused by the operator until ")
    assert doc["workers"][0]["state"] == "paused"

    rig.new_dispatcher(20.0)  # a restart (or a kill -9): the pause is the database's
    assert rig.d.controls.pause == ManualPause(since=10.0, by=SRC, until=70.0)
    assert assigns(rig.ready(A, 21.0)) == [] and assigns(rig.tick(69.0)) == []
    assert assigns(rig.ready(A, 69.9)) == []
    assert only_assign(rig.tick(70.0), A).episode == 1  # its time is over: the credit is used
    assert not rig.d.controls.paused and status(rig.d, 70.0)["pause"]["paused"] is False


def test_a_pause_or_resume_the_database_refuses_changes_nothing(rig: SharedRig) -> None:
    rig.enqueue(5114, [1])
    rig.store.fail.add("set_state")
    reply, _ = control(rig, ControlPause(source=SRC), 1.0)
    assert not reply.ok and reply.result["error"] == "unavailable"
    assert "database busy" in reply.message and "nothing changed" in reply.message
    assert not rig.d.controls.paused
    rig.store.fail.clear()
    assert control(rig, ControlPause(source=SRC), 2.0)[0].ok
    rig.store.fail.add("set_state")
    assert not control(rig, ControlResume(source=SRC), 3.0)[0].ok
    assert rig.d.controls.paused and assigns(rig.ready(A, 3.0)) == []
    rig.store.fail.clear()
    reply, out = control(rig, ControlResume(source=SRC), 4.0)
    assert reply.ok and only_assign(out, A).episode == 1  # the waiting credit, at once


def test_a_pause_that_is_over_waits_for_its_row_to_go(rig: SharedRig) -> None:
    rig.enqueue(5114, [1])
    control(rig, ControlPause(source=SRC, duration_seconds=5.0), 0.0)
    rig.ready(A, 1.0)
    rig.store.fail.add("set_state")
    assert assigns(rig.tick(6.0)) == [] and rig.d.controls.paused  # still the database's word
    rig.store.fail.clear()
    assert only_assign(rig.tick(7.0), A)


def test_pause_now_requeues_running_downloads_without_a_retry_once_written(rig: SharedRig) -> None:
    rig.enqueue(5114, [1, 2])
    a, b = running(rig, A, 1.0), running(rig, B, 1.0)
    rig.store.fail.add("requeue")
    reply, out = control(rig, ControlPause(source=SRC, now=True), 2.0)
    assert reply.ok and "2 running downloads interrupted" in reply.message
    assert of_type(out, JobCancel) == []  # nothing is said before it is written
    assert rig.row(a.job_id)["stage"] == "downloading"
    rig.store.fail.clear()
    out = rig.tick(3.0)
    cancels = {m.job_id: m for m in of_type(out, JobCancel)}
    assert set(cancels) == {a.job_id, b.job_id}
    assert all(m.keep_partials and "pause --now" in m.reason for m in cancels.values())
    for job in (a, b):
        r = rig.row(job.job_id)
        assert (r["stage"], r["retry_count"], r["attempt"], r["next_attempt_at"]) == ("queued", 0, 1, None)
    assert assigns(rig.ready(A, 4.0)) == []  # paused
    # A heartbeat of a stopped attempt, sent before the worker heard: no re-adoption.
    out = rig.beat(B, b, 4.5)
    assert [m.reason for m in of_type(out, JobCancel)] == ["lease lost"]
    assert rig.row(b.job_id)["stage"] == "queued" and b.job_id not in rig.d.leases


def test_a_cancelled_job_never_comes_back(rig: SharedRig) -> None:
    rig.enqueue(5114, [1, 2])
    job = running(rig, A, 1.0)
    reply, out = control(rig, ControlCancel(source=SRC, job_id=job.job_id), 2.0)
    assert reply.ok and reply.result["stage"] == "cancelled"
    (cancel,) = of_type(out, JobCancel)
    assert (cancel.job_id, cancel.attempt, cancel.keep_partials) == (job.job_id, 1, False)
    assert rig.row(job.job_id)["stage"] == "cancelled" and job.job_id not in rig.d.leases
    # The old attempt's heartbeat and its late landing: refused, the row stays cancelled.
    out = rig.beat(A, job, 3.0)
    assert [m.reason for m in of_type(out, JobCancel)] == ["lease lost"]
    rig.send(A, JobLanded(worker_id="w01", session="aaaa", job_id=job.job_id, attempt=1,
                          video_path="/nowhere/ep001.mp4", size_bytes=9), 3.5)
    # A queued job is cancelled at once; neither is handed out, retried, nor found at a restart.
    other = job.job_id % 2 + 1
    assert control(rig, ControlCancel(source=SRC, job_id=other), 4.0)[0].ok
    reply, _ = control(rig, ControlRetry(source=SRC, job_ids=[job.job_id, other]), 5.0)
    assert not reply.ok and reply.result["error"] == "conflict"
    assert reply.message.startswith(f"not retried: job {min(job.job_id, other)} is cancelled")
    rig.new_dispatcher(6.0)
    assert assigns(rig.ready(B, 7.0)) == [] and assigns(rig.tick(8.0)) == []
    assert {rig.row(i)["stage"] for i in (1, 2)} == {"cancelled"}
    assert status(rig.d, 8.0)["queue"]["cancelled"] == 2


def test_a_cancel_of_a_landing_or_missing_job_is_refused(rig: SharedRig) -> None:
    rig.enqueue(5114, [1])
    job = running(rig, A, 1.0)
    rig.finished(A, job, 2.0)  # JobCommit sent: the landing is not undone
    reply, out = control(rig, ControlCancel(source=SRC, job_id=job.job_id), 3.0)
    assert (reply.ok, reply.result["error"], out) == (False, "conflict", [])
    reply, _ = control(rig, ControlCancel(source=SRC, job_id=99), 3.0)
    assert reply.result["error"] == "not_found" and "no job 99" in reply.message


def test_retry_brings_failed_jobs_back_and_ends_backoffs(tmp_path: Path) -> None:
    rig = Rig(tmp_path, retry_backoff_seconds=600)
    rig.enqueue(1, [1], max_retries=0)
    rig.enqueue(2, [1], max_retries=3)
    first = running(rig, A, 1.0)
    second = running(rig, B, 1.0)
    rig.failed(A, first, "error", 2.0)
    rig.failed(B, second, "error", 2.0)
    assert rig.row(first.job_id)["stage"] == "failed"
    assert rig.row(second.job_id)["next_attempt_at"] > 2.0 + 400  # backing off
    assert assigns(rig.ready(A, 2.5) + rig.ready(B, 2.5)) == []  # idle: nothing runnable
    reply, out = rig.d.control(ControlRetry(source=SRC, failed=True), 3.0)
    assert reply.ok and reply.message == "1 failed job back in the queue, 1 backing off retried now"
    assert reply.result == {"requeued": [first.job_id], "hurried": [second.job_id]}
    handed = {m.job_id: m for m in assigns(out)}  # both workers' credits are used at once
    assert set(handed) == {first.job_id, second.job_id}
    assert handed[first.job_id].retry_count == 0 and handed[first.job_id].attempt == 2
    r = rig.row(first.job_id)
    assert (r["stage"], r["retry_count"], r["error_message"]) == ("downloading", 0, None)
    rig.d.store.close()


def test_the_queue_hands_out_priorities_then_episodes_in_order_then_older(rig: SharedRig) -> None:
    rig.enqueue(10, [5, 1])   # jobs 1, 2
    rig.enqueue(20, [1])      # job 3
    rig.enqueue(10, [3])      # job 4
    reply, _ = control(rig, ControlPriority(source=SRC, priority=10, anime_id=20), 1.0)
    assert reply.ok and reply.message == "MAL ID 20: 1 job at priority high (10)"
    assert control(rig, ControlPriority(source=SRC, priority=-10, job_id=1), 1.0)[0].ok
    assert status(rig.d, 1.0)["queue"]["priorities"][0]["anime_id"] == 20
    order = []
    for t in range(2, 6):
        job = running(rig, A, float(t))
        order.append((job.anime_id, job.episode))
        rig.landed(A, job, str(rig.config.storage_dir / f"x{t}"), t + 0.5)  # refused: not there
        rig.d.leases.pop(job.job_id)  # the worker moves on (its lease is not this test's point)
        rig.d.sessions.idle.pop(A, None)
    assert order == [(20, 1), (10, 1), (10, 3), (10, 5)]


def test_a_new_bandwidth_restarts_running_downloads_at_the_new_rate(rig: SharedRig) -> None:
    rig.enqueue(5114, [1])
    job = running(rig, A, 1.0)
    assert job.rate_limit_bps == 0
    reply, out = control(rig, ControlBandwidth(source=SRC, mbps=8.0), 2.0)
    assert reply.ok and reply.result["restarted"] == [job.job_id]
    assert reply.result["per_download_bps"] == 1_000_000
    (cancel,) = of_type(out, JobCancel)
    assert cancel.keep_partials and "bandwidth" in cancel.reason
    r = rig.row(job.job_id)
    assert (r["stage"], r["retry_count"]) == ("queued", 0)
    assert assigns(rig.ready(A, 2.1, seq=5)) == []  # held while the old attempt lets go
    again = only_assign(rig.tick(2.0 + RESTART_HOLD_SECONDS + 1.5), A)
    assert (again.job_id, again.attempt, again.rate_limit_bps) == (job.job_id, 2, 1_000_000)
    doc = status(rig.d, 5.0)
    assert doc["bandwidth"]["total_mbps"] == 8.0 and doc["bandwidth"]["changed"]
    # The same rate again restarts nothing.
    reply, out = control(rig, ControlBandwidth(source=SRC, mbps=8.0), 6.0)
    assert reply.result["restarted"] == [] and of_type(out, JobCancel) == []


def test_a_verifying_download_is_not_restarted_for_a_new_rate(rig: SharedRig) -> None:
    rig.enqueue(5114, [1])
    job = only_assign(rig.ready(A, 1.0), A)
    rig.send(A, JobHeartbeat(worker_id="w01", session="aaaa", job_id=job.job_id, attempt=1,
                             bytes=100, state="verifying"), 1.5)
    reply, out = control(rig, ControlBandwidth(source=SRC, mbps=8.0), 2.0)
    assert reply.result["restarted"] == [] and of_type(out, JobCancel) == []


def test_a_retry_of_too_many_ids_at_once_is_refused(rig: SharedRig) -> None:
    reply, _ = control(rig, ControlRetry(source=SRC, job_ids=list(range(1, 40_002))), 1.0)
    assert not reply.ok and reply.result["error"] == "bad_argument" and "at most 1000" in reply.message


def test_an_unreadable_stored_pause_still_pauses() -> None:
    assert ManualPause.from_json(None) is None
    assert ManualPause.from_json("not json").by == "unreadable downloader_state value"
    pause = ManualPause(since=1.0, by="anime-web 127.0.0.1", until=None, now=True)
    assert ManualPause.from_json(pause.to_json()) == pause
    assert not pause.over(1e12) and ManualPause(0.0, "x", until=5.0).over(5.0)


def test_controls_in_a_dry_run_or_before_start_change_nothing(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    d = Dispatcher(rig.d.store, rig.d.effects, rig.config)  # not started
    reply, out = d.control(ControlPause(source=SRC), 1.0)
    assert (reply.ok, reply.result, out) == (False, {"error": "unavailable"}, [])
    rig.d.controls.dry_run = True
    reply, _ = rig.d.control(ControlResume(source=SRC), 1.0)
    assert not reply.ok and reply.message.startswith("dry run")
    rig.d.store.close()


def test_cancelling_a_job_that_was_never_runnable_does_not_end_the_run_early(
        rig: SharedRig) -> None:
    """--exit-when-done: a job backing off still counts as work left after the operator
    cancels another that could never run (no selection); ``runnable`` is a pass's to
    tell, not a sum of our own moves."""
    rig.enqueue(5114, [1])
    enqueue(rig.config.db_path, 9999, "No Selection", [1], 3, None)  # job 2: never runnable
    conn = sqlite3.connect(rig.config.db_path)
    with conn:  # job 1 backs off (a neighbour's view: the next pass sees it)
        conn.execute("UPDATE jobs SET next_attempt_at = 1000.0, retry_count = 1 WHERE id = 1")
    conn.close()
    rig.tick(1.0)  # the pass that sees it
    assert rig.d.counts.current(rig.d.db, 1.1) and not rig.d.done(1.1)
    # within the second that passes are rate-limited to
    assert control(rig, ControlCancel(source=SRC, job_id=2), 1.3)[0].ok
    assert not rig.d.done(1.5), "done while job 1 still waits for its retry"
    assert status(rig.d, 1.6)["queue"]["backing_off"] == 1


def test_a_priority_set_by_the_operator_shows_in_the_queue_by_anime_at_the_next_pass(
        rig: SharedRig) -> None:
    rig.enqueue(5114, [1, 2])
    rig.tick(1.0)
    assert [(r["anime_id"], r["priority"]) for r in status(rig.d, 2.0)["queue"]["by_anime"]] == \
        [(5114, 0)]
    assert control(rig, ControlPriority(source=SRC, anime_id=5114, priority=10), 3.0)[0].ok
    rig.tick(5.0)  # a pass after the operator's write (rate-limited to one a second)
    assert [(r["anime_id"], r["priority"]) for r in status(rig.d, 6.0)["queue"]["by_anime"]] == \
        [(5114, 10)]
