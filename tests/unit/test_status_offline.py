"""anime-status with no dispatcher: the queue read from jobs.db (services/status_offline.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from services.dispatcher.store import SqlJobStore
from services.enqueue import enqueue
from services.status_offline import read_queue

NOW = 1_000_000.0


def test_the_read_only_queue_counts_cancelled_jobs_and_no_release_wait_as_a_backoff(
        tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    enqueue(db, 5114, "Show", [1, 2, 3, 4], 3, (1, "Show (site)", "high"))
    store = SqlJobStore(db)
    store.open()  # the dispatcher's columns: next_attempt_at, unreleased_since...
    store.close()
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE jobs SET stage = 'cancelled' WHERE episode = 1")
        conn.execute("UPDATE jobs SET next_attempt_at = ?, error_message = 'x' WHERE episode = 2",
                     (NOW + 60,))
        conn.execute("UPDATE jobs SET next_attempt_at = ?, unreleased_since = ?, "
                     "error_message = 'Invalid episode!' WHERE episode = 3", (NOW + 600, NOW))
    conn.close()
    queue = read_queue(db, NOW)
    assert (queue["queued"], queue["cancelled"], queue["other_stages"]) == (3, 1, {})
    assert (queue["backing_off"], queue["next_retry_at"]) == (1, NOW + 60)
    assert [r["count"] for r in queue["backoff_reasons"]] == [1]
