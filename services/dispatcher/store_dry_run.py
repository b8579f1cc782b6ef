"""``--dry-run``'s queue: the jobs as they are, read once through a read-only
connection and handed out in memory; the database file is never written.

The same interface as ``SqlJobStore`` (store.py): every write is accepted and
changes nothing; reads that need our added columns fall back to nothing on an
upstream database that lacks them.
"""

from __future__ import annotations

from pathlib import Path

import peewee

from shared import models
from services.dispatcher.store import (LOOP_BUSY_TIMEOUT_MS, ClaimedJob, LeaseRow, SqlJobStore,
                                       weather)


class DryRunStore(SqlJobStore):
    """The queue as it is, read once, handed out in memory; the file is never written."""

    writes = False

    def __init__(self, db_path: Path, anime_id: int | None = None,
                 busy_timeout_ms: int = LOOP_BUSY_TIMEOUT_MS) -> None:
        if not db_path.exists():
            raise FileNotFoundError(f"no database at {db_path}")
        super().__init__(db_path, anime_id, busy_timeout_ms)
        self._pending: list[ClaimedJob] | None = None
        self._done: set[int] = set()

    @weather
    def open(self) -> None:
        if self.db is None:
            self.db = models.open_db(self.db_path, readonly=True,
                                     busy_timeout_ms=self.busy_timeout_ms)
        if self._pending is None:
            self._pending = self._snapshot()

    def _snapshot(self) -> list[ClaimedJob]:
        anime_filter = "AND j.anime_id = ?" if self.anime_id is not None else ""
        params = [self.anime_id] if self.anime_id is not None else []
        cursor = self.db.execute_sql(
            "SELECT j.id, j.anime_id, j.anime_title, j.episode, 0, j.retry_count, "
            "j.max_retries, s.selected_index, s.selected_title, s.confidence "
            "FROM jobs j JOIN anime_selection_cache s ON s.mal_id = j.anime_id "
            f"WHERE j.stage = 'queued' {anime_filter} ORDER BY j.id", params)
        return [ClaimedJob(*row) for row in cursor.fetchall()]

    def claim_next(self, owner: str, deadline: float, now: float) -> ClaimedJob | None:
        return self._pending.pop(0) if self._pending else None

    def readopt(self, *args: object) -> None:
        return None

    def extend_leases(self, leases: list[tuple[int, int, float]]) -> list[int]:
        return []

    def mark_downloaded(self, *args: object, **kwargs: object) -> bool:
        return True

    def requeue(self, job_id: int, *args: object, **kwargs: object) -> str:
        self._done.add(job_id)
        return "dry_run"

    def mark_failed(self, job_id: int, *args: object, **kwargs: object) -> bool:
        self._done.add(job_id)
        return True

    def await_release(self, job_id: int, *args: object, **kwargs: object) -> str:
        self._done.add(job_id)
        return "dry_run"

    def leases(self) -> list[LeaseRow]:
        return []

    @weather
    def queue_detail(self, now: float) -> dict:
        """Only the contract's columns: an upstream database is read as it is."""
        (waiting,) = self.db.execute_sql(
            "SELECT COUNT(*) FROM jobs j LEFT JOIN anime_selection_cache s ON s.mal_id = j.anime_id "
            "WHERE j.stage = 'queued' AND s.mal_id IS NULL").fetchone()
        return {"waiting_for_selection": waiting, "backing_off": 0, "next_retry_at": None,
                "runnable": len(self._pending or ()), "backoff_reasons": []}

    def recent_sizes(self, limit: int = 500) -> list[tuple[int, int]]:
        try:
            return super().recent_sizes(limit)
        except peewee.OperationalError:  # an upstream database without our columns
            return []

    def landings_since(self, since: float) -> list[tuple[float, int]]:
        try:
            return super().landings_since(since)
        except peewee.OperationalError:  # an upstream database without our columns
            return []

    def recent_failures(self, limit: int = 5) -> list[dict]:
        return []

    def selection_review(self, limit: int = 20) -> list[dict]:
        return []

    def downloaded_since(self, since: float) -> tuple[int, int]:
        return 0, 0

    def get_state(self, key: str) -> str | None:
        return None  # an upstream database has no downloader_state; the controls write nothing

    def priorities(self, limit: int = 50) -> list[dict]:
        return []
