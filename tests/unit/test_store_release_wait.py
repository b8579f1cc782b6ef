"""A job that waited for its episode's release and then fails otherwise (store.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from services.dispatcher.store import SqlJobStore, queue_detail
from services.enqueue import enqueue

NOW = 1_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlJobStore]:
    """One queued episode with a selection, in the dispatcher's schema."""
    db = tmp_path / "jobs.db"
    enqueue(db, 5114, "Show", [1], 3, (1, "Show (site)", "high"))
    s = SqlJobStore(db)
    s.open()
    yield s
    s.close()


def test_a_counted_failure_after_a_release_wait_ends_the_wait(store: SqlJobStore) -> None:
    with store.db.atomic():  # it waited for its release (its re-check is due now)
        store.db.execute_sql("UPDATE jobs SET unreleased_since = ?, failure_class = "
                             "'not_released' WHERE id = 1", [NOW - 3600])
    job = store.claim_next("w1/s", NOW + 60, NOW)
    # the site lists it now; the attempt fails on something else, counted, unclassified
    assert store.requeue(job.id, job.attempt, True, "Downloaded file is not a playable video",
                         lambda n: NOW + 60, NOW) == "queued"
    (since,) = store.db.execute_sql("SELECT unreleased_since FROM jobs WHERE id = 1").fetchone()
    assert since is None
    detail = queue_detail(store.db.execute_sql, NOW + 1)
    assert (detail["backing_off"], detail["waiting_for_release"]) == (1, 0)


def test_an_uncounted_stop_during_a_recheck_keeps_the_wait(store: SqlJobStore) -> None:
    with store.db.atomic():
        store.db.execute_sql("UPDATE jobs SET unreleased_since = ? WHERE id = 1", [NOW - 60])
    job = store.claim_next("w1/s", NOW + 60, NOW)
    assert store.requeue(job.id, job.attempt, False, None, lambda n: None, NOW,
                         not_before=NOW + 30) == "queued"
    (since,) = store.db.execute_sql("SELECT unreleased_since FROM jobs WHERE id = 1").fetchone()
    assert since == NOW - 60
