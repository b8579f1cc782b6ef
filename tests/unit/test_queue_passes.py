"""The stage counts off the loop (issue 16): a pass over the queue on a thread of its
own, over a real SQLite file, while the dispatcher's own writes and a neighbour's go on.

The counts the status shows are the pass's plus the dispatcher's own moves since the
pass's snapshot: a write committed between the pin and the pass must be counted once,
not twice and not never; a neighbour's commit is seen by the next pass.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from pathlib import Path
from typing import Iterator

from services.dispatcher.counts import QueueCounts, ThreadPasses
from services.dispatcher.db_health import Database
from services.dispatcher.store import QueueReader, QueueTally, SqlJobStore, by_anime
from services.enqueue import enqueue

NOW = 1_000_000.0


class HeldReader(QueueReader):
    """A reader whose pass waits for ``go`` after its snapshot was pinned."""

    def __init__(self, db_path: Path) -> None:
        super().__init__(db_path)
        self.go = threading.Event()

    def tally(self, now: float, with_without: bool) -> QueueTally:
        assert self.go.wait(10), "the test never let the pass run"
        return super().tally(now, with_without)


def database(tmp_path: Path, jobs: int) -> Path:
    path = tmp_path / "jobs.db"
    enqueue(path, 5114, "Show", list(range(1, jobs + 1)), 3, (1, "Show (site)", "high"))
    enqueue(path, 9999, "No Selection", [1, 2], 3, None)
    return path


def truth(path: Path) -> dict[str, int]:
    conn = sqlite3.connect(path)
    try:
        return dict(conn.execute("SELECT stage, COUNT(*) FROM jobs GROUP BY stage").fetchall())
    finally:
        conn.close()


@contextlib.contextmanager
def passes_over(path: Path) -> Iterator[tuple[SqlJobStore, HeldReader, QueueCounts, Database]]:
    """The loop's store, a held reader for the passes, the counts over both."""
    store = SqlJobStore(path)
    store.open()
    reader = HeldReader(path)
    counts = QueueCounts(passes=ThreadPasses(reader))
    try:
        yield store, reader, counts, Database(store)
    finally:
        counts.passes.close()
        store.close()


def first_pass(reader: HeldReader, counts: QueueCounts, db: Database) -> None:
    """Let a pass run now and wait until it is collected."""
    reader.go.set()
    counts.refresh(db, NOW, force=True)
    wait_collected(counts, db, NOW)


def wait_collected(counts: QueueCounts, db: Database, now: float) -> None:
    done = threading.Event()
    for _ in range(1000):
        counts.refresh(db, now)
        if not counts.passes.running:
            done.set()
            break
        done.wait(0.01)  # the pass runs on its thread; looked at again until it is in
    assert done.is_set(), "the pass never finished"


def test_own_writes_between_the_snapshot_and_the_pass_are_counted_once(tmp_path: Path) -> None:
    path = database(tmp_path, 20)
    with passes_over(path) as (store, reader, counts, db):
        first_pass(reader, counts, db)
        assert counts.stage_counts() == truth(path) == {"queued": 22}
        assert counts.queue_detail()["runnable"] == 20
        reader.go.clear()
        store.changed_elsewhere()
        counts.refresh(db, NOW + 10, force=True)  # pinned: the pass waits for go
        assert counts.passes.running
        claimed = [store.claim_next("w1/s", NOW + 60, NOW + 10) for _ in range(3)]
        assert store.mark_downloaded(claimed[0].id, claimed[0].attempt, "/x.mkv", 5, None,
                                     NOW + 10)
        assert store.mark_failed(claimed[1].id, claimed[1].attempt, "bad", NOW + 10)
        # Before the pass is in: the old pass and every move since its snapshot.
        assert counts.stage_counts() == truth(path) == {
            "queued": 19, "downloading": 1, "downloaded": 1, "failed": 1}
        reader.go.set()
        wait_collected(counts, db, NOW + 10)
        # The pass saw none of the three claims (they came after its snapshot): its
        # counts and the moves since the snapshot, each once.
        assert counts.base == {"queued": 22}
        assert counts.stage_counts() == truth(path)
        assert counts.queue_detail()["runnable"] == 17


def test_a_neighbours_commit_is_counted_by_the_next_pass(tmp_path: Path) -> None:
    path = database(tmp_path, 5)
    with passes_over(path) as (store, reader, counts, db):
        first_pass(reader, counts, db)
        job = store.claim_next("w1/s", NOW + 60, NOW)
        neighbour = sqlite3.connect(path, isolation_level=None)
        neighbour.execute("INSERT INTO jobs (anime_id, anime_title, episode) VALUES (5114, 'Show', 99)")
        neighbour.execute("UPDATE jobs SET stage = 'transcribed' WHERE id = ?", (job.id + 1,))
        neighbour.close()
        assert counts.current(db, NOW + 1) is False  # the commit is seen: a pass is due
        wait_collected(counts, db, NOW + 1)
        assert counts.current(db, NOW + 1)
        assert counts.stage_counts() == truth(path) == {
            "queued": 6, "downloading": 1, "transcribed": 1}


def test_a_pass_runs_off_the_calling_thread(tmp_path: Path) -> None:
    """While the pass waits (as a long one would), the loop's own connection goes on."""
    path = database(tmp_path, 3)
    with passes_over(path) as (store, reader, counts, db):
        assert counts.refresh(db, NOW, force=True)  # returns at once, the pass held
        assert counts.passes.running and counts.counted_at < 0
        assert store.claim_next("w1/s", NOW + 60, NOW) is not None
        assert counts.stage_counts() == {}  # not counted yet (the status says so)
        reader.go.set()
        wait_collected(counts, db, NOW)
        assert counts.stage_counts() == truth(path)


def test_our_own_failure_is_in_the_recent_failures_at_once_and_after_the_pass(tmp_path: Path) -> None:
    path = database(tmp_path, 3)
    with passes_over(path) as (store, reader, counts, db):
        first_pass(reader, counts, db)
        reader.go.clear()
        store.changed_elsewhere()
        counts.refresh(db, NOW + 10, force=True)  # a pass pinned before the failure
        job = store.claim_next("w1/s", NOW + 60, NOW + 10)
        assert store.mark_failed(job.id, job.attempt, "no valid sources", NOW + 11)
        counts.failed({"id": job.id, "anime_id": job.anime_id, "anime_title": job.anime_title,
                       "episode": job.episode, "error": "no valid sources", "at": NOW + 11})
        assert [f["id"] for f in counts.failures] == [job.id]
        reader.go.set()
        wait_collected(counts, db, NOW + 11)  # the pass did not see it: still shown, once
        assert [f["id"] for f in counts.failures] == [job.id]
        assert counts.stage_counts() == truth(path)
        counts.refresh(db, NOW + 20, force=True)
        wait_collected(counts, db, NOW + 20)  # this pass saw it: the database's row
        assert [(f["id"], f["error"]) for f in counts.failures] == [(job.id, "no valid sources")]


def test_the_queue_by_anime_counts_each_series_busiest_first(tmp_path: Path) -> None:
    """queue.by_anime (the web page's table): per series its jobs by stage and the highest
    priority of what is left; a series with nothing left (all downloaded) is not listed;
    downloading first, then priority, then failures."""
    path = database(tmp_path, 4)  # 5114: 4 queued; 9999: 2 queued (no selection)
    enqueue(path, 30, "Done Show", [1, 2], 1, (1, "Done Show", "high"))
    enqueue(path, 40, "Failing Show", [1, 2, 3], 1, (1, "Failing Show", "high"))
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("UPDATE jobs SET stage = 'downloaded' WHERE anime_id = 30")
        conn.execute("UPDATE jobs SET stage = 'failed' WHERE anime_id = 40 AND episode = 1")
        conn.execute("UPDATE jobs SET stage = 'downloading' WHERE anime_id = 5114 AND episode = 1")
        conn.execute("UPDATE jobs SET stage = 'downloaded' WHERE anime_id = 5114 AND episode = 2")
    store = SqlJobStore(path)
    store.open()  # the dispatcher's columns (priority) and indexes
    with store.db.atomic():
        store.db.execute_sql("UPDATE jobs SET priority = 10 WHERE anime_id = 9999")
        store.db.execute_sql("UPDATE jobs SET unreleased_since = 1, next_attempt_at = 2e9 "
                             "WHERE anime_id = 40 AND episode = 3")
    rows = by_anime(conn.execute, NOW)
    assert [r["anime_id"] for r in rows] == [5114, 9999, 40]
    assert rows[0] == {"anime_id": 5114, "anime_title": "Show", "queued": 2, "downloading": 1,
                       "downloaded": 1, "failed": 0, "waiting_release": 0, "priority": 0}
    assert rows[1]["priority"] == 10 and rows[1]["queued"] == 2
    assert (rows[2]["failed"], rows[2]["queued"], rows[2]["waiting_release"],
            rows[2]["anime_title"]) == (1, 2, 1, "Failing Show")
    assert [r["anime_id"] for r in by_anime(conn.execute, NOW, anime_id=40)] == [40]
    assert len(by_anime(conn.execute, NOW, limit=1)) == 1
    conn.close()
