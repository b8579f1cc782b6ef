"""What the dispatcher does with each class of failure (retries.py, endings.py, holds.py,
store.py), driven with an injected clock over a real SQLite file, no sockets.

- not released yet: waits for a re-check without using up a retry, across a dispatcher
  restart, up to max_unreleased_days; then fails with the message and a word on
  anidb.app's per-season numbering; lands once the site lists it;
- selection: normal retries, the stable message on the final failure, the anime listed
  for a selection review;
- Cloudflare: the job backs off at least as long as the hold, and no worker on that host
  gets a job meanwhile (workers on another host do);
- the class is taken from the error when the worker sends none (an older worker) or one
  the dispatcher does not know.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from shared.failures import CLOUDFLARE, NOT_RELEASED, SELECTION, TRANSIENT
from shared.protocol import REASON_ERROR, JobAck, JobFailed, WorkerReady
from services.status_text import render_text
from tests.unit.test_dispatcher_core import A, B, Rig, assigns, of_type, only_assign, status

HOUR, DAY = 3600.0, 86400.0
NOT_LISTED = "ani-cli returned non-zero exit code: 1\nInvalid episode!"
C = b"w03/cccc"


def fail(rig: Rig, identity: bytes, job, error: str, now: float, failure_class: str = "",
         reason: str = REASON_ERROR) -> list:
    worker_id, session = identity.decode().split("/")
    return rig.send(identity, JobFailed(worker_id=worker_id, session=session, job_id=job.job_id,
                                        attempt=job.attempt, reason=reason, error=error,
                                        failure_class=failure_class), now)


def ready(rig: Rig, identity: bytes, now: float, host: str) -> list:
    worker_id, session = identity.decode().split("/")
    seq = rig.sessions[identity] = rig.sessions.get(identity, -1) + 1
    return rig.send(identity, WorkerReady(worker_id=worker_id, session=session, seq=seq,
                                          host=host), now)


def counted(rig: Rig, now: float) -> dict:
    """The status document after a tick (the counts are refreshed on ticks)."""
    rig.tick(now)
    return status(rig.d, now)


def land(rig: Rig, identity: bytes, job, now: float) -> None:
    rig.finished(identity, job, now)
    rig.landed(identity, job, str(rig.land_file(job)), now)


@pytest.fixture
def airing(tmp_path: Path):
    r = Rig(tmp_path, recheck_unreleased_hours=6, max_unreleased_days=2)
    yield r
    r.d.store.close()


# --- not released yet ----------------------------------------------------------------

def test_an_unreleased_episode_waits_for_a_recheck_without_using_up_a_retry(airing: Rig) -> None:
    r = airing
    r.enqueue(1, [5], max_retries=0)  # no retry at all: a counted failure would fail it
    job = only_assign(r.ready(A, 0.0), A)
    assert of_type(fail(r, A, job, NOT_LISTED + "\n", 10.0, NOT_RELEASED), JobAck)
    row = r.row(1)
    assert (row["stage"], row["retry_count"], row["unreleased_since"]) == ("queued", 0, 10.0)
    assert row["next_attempt_at"] == pytest.approx(10.0 + 6 * HOUR)
    assert (row["error_message"], row["failure_class"]) == (NOT_LISTED, NOT_RELEASED)
    doc = counted(r, 20.0)
    assert doc["queue"]["waiting_for_release"] == 1 and doc["queue"]["backing_off"] == 0
    assert doc["queue"]["next_recheck_at"] == pytest.approx(10.0 + 6 * HOUR)
    assert doc["failure_classes"]["last_hour"][NOT_RELEASED] == 1
    assert "1 waits for a release (next re-check" in render_text(doc)
    assert r.d.done(20.0)  # --exit-when-done does not wait days for it

    assert assigns(r.ready(A, 6 * HOUR) + r.tick(6 * HOUR)) == []  # not before the re-check
    again = only_assign(r.tick(6 * HOUR + 11), A)
    assert (again.job_id, again.attempt, again.retry_count) == (1, 2, 0)
    fail(r, A, again, NOT_LISTED, 6 * HOUR + 20, NOT_RELEASED)
    row = r.row(1)  # the first "not released" is kept: the wait is counted from there
    assert (row["stage"], row["retry_count"], row["unreleased_since"]) == ("queued", 0, 10.0)
    assert row["next_attempt_at"] == pytest.approx(12 * HOUR + 20)


def test_the_wait_survives_a_dispatcher_restart(airing: Rig) -> None:
    r = airing
    r.enqueue(1, [5])
    fail(r, A, only_assign(r.ready(A, 0.0), A), NOT_LISTED, 1.0, NOT_RELEASED)
    r.d.store.close()
    r.new_dispatcher(100.0)
    assert counted(r, 100.0)["queue"]["waiting_for_release"] == 1
    assert assigns(r.ready(A, 200.0) + r.tick(300.0)) == []
    assert only_assign(r.ready(A, 6 * HOUR + 2), A).attempt == 2


def test_it_lands_once_the_site_lists_it_and_the_wait_is_forgotten(airing: Rig) -> None:
    r = airing
    r.enqueue(1, [5], max_retries=0)
    fail(r, A, only_assign(r.ready(A, 0.0), A), NOT_LISTED, 1.0, NOT_RELEASED)
    job = only_assign(r.ready(A, 6 * HOUR + 2), A)
    land(r, A, job, 6 * HOUR + 3)
    row = r.row(1)
    assert (row["stage"], row["retry_count"], row["unreleased_since"], row["failure_class"]) == \
        ("downloaded", 0, None, None)
    assert status(r.d, 6 * HOUR + 4)["queue"]["waiting_for_release"] == 0


def test_a_listed_episode_that_then_fails_otherwise_counts_retries_again(airing: Rig) -> None:
    r = airing
    r.enqueue(1, [5], max_retries=1)
    fail(r, A, only_assign(r.ready(A, 0.0), A), NOT_LISTED, 1.0, NOT_RELEASED)
    job = only_assign(r.ready(A, 6 * HOUR + 2), A)
    fail(r, A, job, "ani-cli returned non-zero exit code: 1\nNo sources found for sub!",
         6 * HOUR + 3, TRANSIENT)
    row = r.row(1)
    assert (row["stage"], row["retry_count"], row["unreleased_since"], row["failure_class"]) == \
        ("queued", 1, None, TRANSIENT)


def test_after_max_unreleased_days_it_fails_with_the_message_and_the_numbering_hint(
        airing: Rig) -> None:
    r = airing
    r.enqueue(1, [5])
    now, rechecks = 0.0, []
    while True:
        job = only_assign(r.tick(now) + r.ready(A, now), A)  # as soon as its re-check is due
        fail(r, A, job, NOT_LISTED, now + 1, NOT_RELEASED)  # the first at 1.0: since then
        row = r.row(1)
        if row["stage"] == "failed":
            break
        assert assigns(r.ready(A, row["next_attempt_at"] - 1) + r.tick(row["next_attempt_at"] - 1)) == []
        now = row["next_attempt_at"]
        rechecks.append(now)
        assert len(rechecks) < 20, "never gave up"
    # a re-check every 6 h (after each failure) for 2 days since the first; the last one
    # exactly at 2 days, not later
    assert rechecks[:2] == [pytest.approx(1 + 6 * HOUR), pytest.approx(2 + 12 * HOUR)]
    assert len(rechecks) == 8 and rechecks[-1] == pytest.approx(1 + 2 * DAY)
    assert row["retry_count"] == 0 and row["finished_at"] == pytest.approx(2 + 2 * DAY)
    first, said, hint = row["error_message"].split("\n")
    assert (first, said) == ("ani-cli returned non-zero exit code: 1", "Invalid episode!")
    assert hint.startswith("not released after 2 days of re-checks (max_unreleased_days); "
                           "anidb.app numbers episodes per season")
    assert "numbering mismatch" in hint
    doc = counted(r, now + 2)
    assert doc["recent_failures"][0]["failure_class"] == NOT_RELEASED
    assert doc["queue"]["waiting_for_release"] == 0


def test_max_unreleased_days_zero_fails_at_the_first_not_released(tmp_path: Path) -> None:
    r = Rig(tmp_path, max_unreleased_days=0)
    r.enqueue(1, [5], max_retries=3)
    fail(r, A, only_assign(r.ready(A, 0.0), A), NOT_LISTED, 1.0, NOT_RELEASED)
    row = r.row(1)
    assert (row["stage"], row["retry_count"]) == ("failed", 0)
    assert row["error_message"].startswith(NOT_LISTED + "\nnot released after 0 days")
    r.d.store.close()


def test_an_older_worker_or_an_unknown_class_is_classified_by_the_dispatcher(airing: Rig) -> None:
    r = airing
    r.enqueue(1, [5, 6])
    one, two = assigns(r.ready(A, 0.0) + r.ready(B, 0.0))
    fail(r, A, one, NOT_LISTED, 1.0)  # an older worker: no class
    fail(r, B, two, "ani-cli returned non-zero exit code: 1\nEpisode not released!", 1.0,
         "some_class_of_a_newer_worker")
    for job_id in (1, 2):
        row = r.row(job_id)
        assert (row["stage"], row["retry_count"], row["failure_class"]) == ("queued", 0, NOT_RELEASED)
    assert counted(r, 2.0)["queue"]["waiting_for_release"] == 2


# --- selection ---------------------------------------------------------------------

def test_a_selection_failure_retries_then_fails_with_the_stable_message(tmp_path: Path) -> None:
    r = Rig(tmp_path, retry_backoff_seconds=10)
    r.enqueue(7, [1, 2], max_retries=1)
    noisy = ("ani-cli returned non-zero exit code: 1\ntput: No value for $TERM and no -T "
             "specified\n{}No results found!")
    now = 0.0
    for attempt in range(2):
        jobs = assigns(r.ready(A, now) + r.ready(B, now))
        assert len(jobs) == 2, (attempt, jobs)
        for i, (identity, job) in enumerate(zip((A, B), jobs)):
            fail(r, identity, job, noisy.format(f"curl: attempt {attempt} {i}\n"), now + 1, SELECTION)
        now += 100.0
    rows = [r.row(1), r.row(2)]
    assert [(x["stage"], x["retry_count"], x["failure_class"]) for x in rows] == \
        [("failed", 1, SELECTION)] * 2
    # the same text for both: GROUP BY error_message groups them
    assert {x["error_message"] for x in rows} == {
        "ani-cli returned non-zero exit code: 1\nNo results found!"}
    doc = counted(r, now)
    assert doc["selection_review"] == [{"anime_id": 7, "anime_title": "Anime 7", "failed": 2,
                                        "at": pytest.approx(101.0),
                                        "error": "ani-cli returned non-zero exit code: 1\n"
                                                 "No results found!"}]
    assert doc["failure_classes"]["last_hour"][SELECTION] == 4
    text = render_text(doc)
    assert "review     needs a selection review" in text
    assert "Anime 7 (MAL ID 7, 2 failed jobs)" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    r.d.store.close()


# --- Cloudflare -----------------------------------------------------------------------

CLOUDFLARE_ERROR = ("ani-cli returned non-zero exit code: 1\n"
                    "Blocked by cloudflare. Try installing curl-impersonate")


def test_a_cloudflare_block_holds_back_the_blocked_host_and_backs_off_longer(
        tmp_path: Path) -> None:
    r = Rig(tmp_path, cloudflare_pause_seconds=600, retry_backoff_seconds=10)
    r.enqueue(1, list(range(1, 10)), max_retries=5)
    a_job = only_assign(ready(r, A, 0.0, "nas"), A)
    fail(r, A, a_job, CLOUDFLARE_ERROR, 5.0, CLOUDFLARE)
    row = r.row(a_job.job_id)
    assert (row["stage"], row["retry_count"], row["failure_class"]) == ("queued", 1, CLOUDFLARE)
    assert row["next_attempt_at"] >= 5.0 + 600  # not the 10 s of an ordinary retry
    # nothing for the workers of that host, A or B; C on another machine goes on
    assert assigns(ready(r, A, 6.0, "nas") + ready(r, B, 6.0, "nas") + r.tick(7.0)) == []
    c_job = only_assign(ready(r, C, 8.0, "other-box"), C)
    doc = status(r.d, 9.0)
    assert doc["failure_classes"]["cloudflare_holds"] == [
        {"host": "nas", "until": pytest.approx(605.0), "blocks": 1}]
    states = {w["id"]: w["state"] for w in doc["workers"]}
    assert (states["w01"], states["w02"], states["w03"]) == ("paused", "paused", "downloading")
    assert "held       host nas: Cloudflare block, no start before" in render_text(doc)
    land(r, C, c_job, 9.5)
    # the idle workers ask again with every heartbeat; only the end of the hold lets them in
    assert assigns(ready(r, A, 604.0, "nas") + ready(r, B, 604.0, "nas") + r.tick(604.0)) == []
    after = {r.d.leases[j.job_id].owner: j for j in assigns(r.tick(605.5))}
    assert set(after) == {A, B}
    # blocked again right away: the hold doubles
    fail(r, A, after[A], CLOUDFLARE_ERROR, 606.0, CLOUDFLARE)
    holds = counted(r, 607.0)["failure_classes"]["cloudflare_holds"]
    assert holds == [{"host": "nas", "until": pytest.approx(606.0 + 1200), "blocks": 2}]
    # a landing from that host ends the row of blocks (the hold running stays)
    land(r, B, after[B], 608.0)
    assert r.d.retries.holds.active(609.0) == [
        {"host": "nas", "until": pytest.approx(606.0 + 1200), "blocks": 0}]
    assert counted(r, 610.0)["failure_classes"]["last_hour"][CLOUDFLARE] == 2
    r.d.store.close()


def test_cloudflare_pause_zero_holds_nothing(tmp_path: Path) -> None:
    r = Rig(tmp_path, cloudflare_pause_seconds=0, retry_backoff_seconds=0)
    r.enqueue(1, [1, 2])
    job = only_assign(ready(r, A, 0.0, "nas"), A)
    fail(r, A, job, CLOUDFLARE_ERROR, 1.0, CLOUDFLARE)
    assert only_assign(ready(r, A, 2.0, "nas"), A)
    assert status(r.d, 3.0)["failure_classes"]["cloudflare_holds"] == []
    r.d.store.close()


def test_the_columns_are_added_to_an_existing_database(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    conn = sqlite3.connect(r.config.db_path)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
    conn.close()
    assert {"unreleased_since", "failure_class"} <= columns
    r.d.store.close()


def test_release_waits_and_backoffs_are_counted_apart_whichever_comes_first(
        tmp_path: Path) -> None:
    r = Rig(tmp_path, recheck_unreleased_hours=0.01, retry_backoff_seconds=1000,
            retry_backoff_max_seconds=1000)
    r.enqueue(1, [5, 6], max_retries=3)
    one, two = assigns(r.ready(A, 0.0) + r.ready(B, 0.0))
    fail(r, A, one, NOT_LISTED, 1.0, NOT_RELEASED)  # re-check at 37 s
    fail(r, B, two, "ani-cli returned non-zero exit code: 1\nNo sources found for sub!", 1.0,
         TRANSIENT)  # retry in 750..1250 s
    queue = counted(r, 2.0)["queue"]
    backoff = r.row(2)["next_attempt_at"]
    assert 751.0 <= backoff <= 1251.0
    assert (queue["backing_off"], queue["waiting_for_release"]) == (1, 1)
    assert queue["next_recheck_at"] == pytest.approx(37.0)
    assert queue["next_retry_at"] == pytest.approx(backoff)  # not the sooner re-check
    r.d.store.close()


def test_an_operator_retry_of_a_never_released_episode_waits_afresh(tmp_path: Path) -> None:
    """anime-ctl retry --failed: the wait for the release starts again from the retry, it
    does not fail at once for the days waited before."""
    from shared.protocol import ControlRetry

    r = Rig(tmp_path, recheck_unreleased_hours=1, max_unreleased_days=0.1)  # 2.4 h
    r.enqueue(1, [5])
    now = 0.0
    while r.row(1)["stage"] != "failed":
        for job in assigns(r.tick(now) + r.ready(A, now), A):
            fail(r, A, job, NOT_LISTED, now + 1, NOT_RELEASED)
        now += HOUR / 2
    assert r.row(1)["failure_class"] == NOT_RELEASED
    reply, _ = r.d.control(ControlRetry(source="anime-ctl", failed=True), now)
    assert reply.ok
    row = r.row(1)
    assert (row["stage"], row["unreleased_since"], row["failure_class"]) == ("queued", None, None)
    job = only_assign(r.tick(now + 1) + r.ready(A, now + 1), A)
    fail(r, A, job, NOT_LISTED, now + 2, NOT_RELEASED)
    row = r.row(1)
    assert (row["stage"], row["retry_count"], row["unreleased_since"]) == ("queued", 0, now + 2)
    r.d.store.close()
