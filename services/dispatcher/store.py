"""The job queue in SQLite: every write the system makes to the database.

The database is shared with neighbours (anime-selector, anime-enqueue, the
transcriber) that take the write lock for seconds at a time. For this store a
locked or busy database (or a failing disk) is weather, not a bug: every method
turns such an error into ``StoreUnavailable`` after a short busy timeout, having
changed nothing; the caller keeps its memory as it was and calls again later.

Every write of a job the dispatcher owns is guarded by the row's id, attempt and
expected stage, so a row a neighbour changed meanwhile is never overwritten: the
method then reports it (False, None, or the ids) and writes nothing. Hot paths
(claim, land) are single SQL statements; everything else goes through the peewee
models; what they return are plain rows (``ClaimedJob``, ``LeaseRow``, ``JobRow``),
never model instances. ``DryRunStore`` (store_dry_run.py) has the same interface.
"""

from __future__ import annotations

import functools
import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import peewee

from shared import models
from shared.logfmt import kv
from shared.models import (OWN_STAGES, STAGE_CANCELLED, STAGE_DOWNLOADED, STAGE_DOWNLOADING,
                           STAGE_FAILED, STAGE_QUEUED, Job)
from shared.reasons import top_reasons

log = logging.getLogger(__name__)
# How long one statement may wait for a neighbour's write lock while the loop runs: the
# loop serves heartbeats and status requests meanwhile, so no call may block it for long.
LOOP_BUSY_TIMEOUT_MS = 100
# OperationalError texts that are the surroundings, not our SQL: locks held by other
# programs, a disk that fails or is full or read-only. Anything else is a bug and raises.
_WEATHER = ("locked", "busy", "disk i/o error", "unable to open", "disk is full",
            "readonly database", "interrupted", "journal mode stays")

T = TypeVar("T")


class StoreUnavailable(Exception):
    """The database could not be read or written just now; nothing was changed."""


def is_weather(exc: BaseException) -> bool:
    return isinstance(exc, (peewee.OperationalError, sqlite3.OperationalError)) and any(
        text in str(exc).lower() for text in _WEATHER)


def weather(method: Callable[..., T]) -> Callable[..., T]:
    """Turn a locked, busy or failing database into StoreUnavailable (the transaction,
    if any, was rolled back by peewee)."""

    @functools.wraps(method)
    def guarded(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except (peewee.OperationalError, sqlite3.OperationalError) as exc:
            if is_weather(exc):
                raise StoreUnavailable(str(exc)) from exc
            raise

    return guarded


@dataclass
class ClaimedJob:
    id: int
    anime_id: int
    anime_title: str | None
    episode: int | None
    attempt: int
    retry_count: int
    max_retries: int
    selected_index: int | None
    selected_title: str | None
    confidence: str | None


@dataclass
class JobRow:
    """A job as the dispatcher reads it back (to settle or judge a row it does not hold)."""
    id: int
    anime_id: int
    anime_title: str | None
    episode: int | None
    stage: str
    attempt: int
    retry_count: int | None
    max_retries: int | None
    video_path: str | None


@dataclass(frozen=True)
class ReleaseWait:
    """What becomes of a job whose episode is not released yet (retries.py decides)."""
    stage: str  # queued (waits for a re-check) or failed (waited long enough)
    next_attempt_at: float | None
    error: str
    since: float  # unreleased_since: the first "not released"


@dataclass
class LeaseRow:
    id: int
    anime_id: int
    episode: int | None
    attempt: int
    owner: str | None
    deadline: float | None


# The claim, in one statement. The head of the queue is the runnable job of the highest
# priority, oldest first (idx_jobs_claim); the job handed out is that anime's lowest
# runnable episode of the same priority (idx_jobs_anime_claim, whose rows of one episode
# are in id order), so a series enqueued out
# of order still downloads in order. Both walk an index from its start and stop at the
# first runnable row: cheap at 100,000 queued jobs (bench/queue_scale.py --priorities).
_RUNNABLE = "j.stage = 'queued' AND (j.next_attempt_at IS NULL OR j.next_attempt_at <= ?)"
_CLAIM_SQL = f"""
UPDATE jobs SET stage = 'downloading', attempt = attempt + 1, lease_owner = ?,
       lease_deadline = ?, started_at = ?
WHERE id = (
    WITH head AS (
        SELECT j.anime_id, j.priority FROM jobs j
        JOIN anime_selection_cache s ON s.mal_id = j.anime_id
        WHERE {_RUNNABLE} {{anime_filter}}
        ORDER BY j.priority DESC, j.id LIMIT 1)
    SELECT j.id FROM jobs j
    WHERE j.anime_id = (SELECT anime_id FROM head) AND j.stage = 'queued'
      AND j.priority = (SELECT priority FROM head)
      AND (j.next_attempt_at IS NULL OR j.next_attempt_at <= ?)
    ORDER BY j.episode LIMIT 1)
RETURNING id, anime_id, anime_title, episode, attempt, retry_count, max_retries
"""
STATE_MANUAL_PAUSE = "manual_pause"  # downloader_state key: the operator's pause (JSON)


class SqlJobStore:
    """The real queue. Only the dispatcher constructs one; ``open`` before anything else."""

    writes = True  # DryRunStore: False (its writes change nothing)

    def __init__(self, db_path: Path, anime_id: int | None = None,
                 busy_timeout_ms: int = LOOP_BUSY_TIMEOUT_MS) -> None:
        self.db_path = db_path
        self.db: peewee.SqliteDatabase | None = None
        self.busy_timeout_ms = busy_timeout_ms
        self.anime_id = anime_id
        self._claim_sql = _CLAIM_SQL.format(
            anime_filter="AND j.anime_id = ?" if anime_id is not None else "")
        # The stage changes of our own committed writes since open, net per stage (counts.py
        # adds those since a pass over the queue to that pass's counts: exact, no scan).
        self.moves: dict[str, int] = dict.fromkeys(OWN_STAGES, 0)

    def _moved(self, old: str, new: str) -> None:
        """A committed write moved one row from stage ``old`` to ``new``."""
        self.moves[old] = self.moves.get(old, 0) - 1
        self.moves[new] = self.moves.get(new, 0) + 1

    @weather
    def open(self) -> None:
        """Connect, switch to WAL, add our columns. Raises StoreUnavailable while a
        neighbour holds the lock; calling again goes on from where it stopped."""
        if self.db is None:
            self.db = models.open_db(self.db_path, busy_timeout_ms=self.busy_timeout_ms)
        models.ensure_wal(self.db)
        added = models.upgrade_schema(self.db)
        if added:
            log.info(kv("database upgraded", path=self.db_path, added_columns=",".join(added)))

    def close(self) -> None:
        if self.db is not None:
            self.db.close()

    # --- handing out --------------------------------------------------------

    @weather
    def claim_next(self, owner: str, deadline: float, now: float) -> ClaimedJob | None:
        params: list = [owner, deadline, now, now]
        if self.anime_id is not None:
            params.append(self.anime_id)
        params.append(now)
        with self.db.atomic():  # the selection is read under the same lock: all or nothing
            row = self.db.execute_sql(self._claim_sql, params).fetchone()
            job = self._with_selection(row) if row is not None else None
        if job is not None:
            self._moved(STAGE_QUEUED, STAGE_DOWNLOADING)
        return job

    def _with_selection(self, row: tuple) -> ClaimedJob:
        job_id, anime_id, title, episode, attempt, retry_count, max_retries = row
        # Plain SQL on the hot path (per job): the query builder costs ~0.2 ms a call.
        sel = self.db.execute_sql(
            "SELECT selected_index, selected_title, confidence FROM anime_selection_cache "
            "WHERE mal_id = ?", [anime_id]).fetchone() or (None, None, None)
        return ClaimedJob(job_id, anime_id, title, episode, attempt, retry_count or 0,
                          3 if max_retries is None else max_retries, *sel)

    @weather
    def readopt(self, job_id: int, attempt: int, owner: str, deadline: float) -> ClaimedJob | None:
        """Give a queued job back to the worker still downloading its last attempt."""
        with self.db.atomic():
            row = self.db.execute_sql(
                "UPDATE jobs SET stage = 'downloading', lease_owner = ?, lease_deadline = ?, "
                "next_attempt_at = NULL WHERE id = ? AND stage = 'queued' AND attempt = ? "
                "RETURNING id, anime_id, anime_title, episode, attempt, retry_count, max_retries",
                [owner, deadline, job_id, attempt]).fetchone()
            job = self._with_selection(row) if row else None
        if job is not None:
            self._moved(STAGE_QUEUED, STAGE_DOWNLOADING)
        return job

    @weather
    def extend_leases(self, leases: list[tuple[int, int, float]]) -> list[int]:
        """Write the lease deadlines ``(job_id, attempt, deadline)`` in one short
        transaction; returns the ids whose row is no longer ours (left untouched)."""
        lost = []
        with self.db.atomic():
            for job_id, attempt, deadline in leases:
                if self.db.execute_sql(
                        "UPDATE jobs SET lease_deadline = ? WHERE id = ? AND attempt = ? "
                        "AND stage = ? RETURNING id",
                        [deadline, job_id, attempt, STAGE_DOWNLOADING]).fetchone() is None:
                    lost.append(job_id)
        return lost

    # --- endings ------------------------------------------------------------

    @weather
    def mark_downloaded(self, job_id: int, attempt: int, video_path: str, size: int,
                        duration: float | None, now: float,
                        stages: tuple[str, ...] = (STAGE_DOWNLOADING,)) -> bool:
        """Record the landing of ``attempt``; False if the row is not that attempt in
        one of ``stages`` any more (a neighbour changed it: nothing is written). One
        guarded update per stage, in one transaction: the stage it left is known."""
        came_from = None
        with self.db.atomic():
            for stage in stages:
                if self.db.execute_sql(
                        "UPDATE jobs SET stage = ?, video_path = ?, video_size_bytes = ?, "
                        "video_duration_seconds = ?, error_message = NULL, lease_owner = NULL, "
                        "lease_deadline = NULL, next_attempt_at = NULL, finished_at = ?, "
                        "unreleased_since = NULL, failure_class = NULL "
                        "WHERE id = ? AND attempt = ? AND stage = ? RETURNING id",
                        [STAGE_DOWNLOADED, video_path, size, duration, now, job_id, attempt,
                         stage]).fetchone() is not None:
                    came_from = stage
                    break
        if came_from is not None:
            self._moved(came_from, STAGE_DOWNLOADED)
        return came_from is not None

    @weather
    def requeue(self, job_id: int, attempt: int, count_retry: bool, error: str | None,
                backoff: Callable[[int], float | None], now: float | None = None,
                not_before: float | None = None, failure_class: str | None = None) -> str | None:
        """Hand a job back; returns its new stage (queued or failed), None if the row is
        not this attempt downloading any more (then nothing is written).

        ``backoff(retry_count)`` gives the time before which a counted retry is not
        handed out again, ``not_before`` the same for one not counted; ``now`` is
        recorded as ``finished_at`` when the job fails for good. The read and the
        guarded update are one transaction: nobody writes in between. ``failure_class``
        (shared/failures.py) is recorded when given; a classified failure ends a wait for
        the episode's release (``unreleased_since``): the site lists it now.
        """
        with self.db.atomic():
            row = self.db.execute_sql(
                "SELECT retry_count, max_retries FROM jobs WHERE id = ? AND attempt = ? "
                "AND stage = ?", [job_id, attempt, STAGE_DOWNLOADING]).fetchone()
            if row is None:
                return None
            retry_count = row[0] or 0
            max_retries = 3 if row[1] is None else row[1]
            stage, next_attempt_at = STAGE_QUEUED, not_before
            if count_retry:
                if retry_count < max_retries:  # the spec's rule
                    retry_count += 1
                    next_attempt_at = backoff(retry_count)
                else:
                    stage, next_attempt_at = STAGE_FAILED, None
            self.db.execute_sql(
                "UPDATE jobs SET stage = ?, retry_count = ?, "
                "error_message = COALESCE(?, error_message), lease_owner = NULL, "
                "lease_deadline = NULL, next_attempt_at = ?, finished_at = ?, "
                "failure_class = COALESCE(?, failure_class), "
                # a counted failure of any kind got past the site's listing: the wait for
                # the episode's release is over (an uncounted stop leaves it as it was)
                "unreleased_since = CASE WHEN ? IS NULL AND NOT ? THEN unreleased_since END "
                "WHERE id = ? AND attempt = ? AND stage = ?",
                [stage, retry_count, error, next_attempt_at,
                 now if stage == STAGE_FAILED else None, failure_class, failure_class,
                 count_retry, job_id, attempt, STAGE_DOWNLOADING])
        self._moved(STAGE_DOWNLOADING, stage)
        return stage

    @weather
    def await_release(self, job_id: int, attempt: int,
                      decide: Callable[[float | None], ReleaseWait], now: float,
                      failure_class: str) -> str | None:
        """Hand back a job whose episode the site does not list yet, counting no retry:
        ``decide(unreleased_since)`` (retries.py) says until when it waits (stage queued)
        or that it has waited long enough (stage failed). Returns the new stage, None if
        the row is not this attempt downloading any more (nothing is written)."""
        with self.db.atomic():
            row = self.db.execute_sql(
                "SELECT unreleased_since FROM jobs WHERE id = ? AND attempt = ? AND stage = ?",
                [job_id, attempt, STAGE_DOWNLOADING]).fetchone()
            if row is None:
                return None
            wait = decide(row[0])
            self.db.execute_sql(
                "UPDATE jobs SET stage = ?, error_message = ?, lease_owner = NULL, "
                "lease_deadline = NULL, next_attempt_at = ?, finished_at = ?, "
                "unreleased_since = ?, failure_class = ? "
                "WHERE id = ? AND attempt = ? AND stage = ?",
                [wait.stage, wait.error, wait.next_attempt_at,
                 now if wait.stage == STAGE_FAILED else None, wait.since, failure_class,
                 job_id, attempt, STAGE_DOWNLOADING])
        self._moved(STAGE_DOWNLOADING, wait.stage)
        return wait.stage

    @weather
    def mark_failed(self, job_id: int, attempt: int, error: str, now: float,
                    failure_class: str | None = None) -> bool:
        """Fail ``attempt`` for good; False if the row is not that attempt downloading."""
        with self.db.atomic():
            row = self.db.execute_sql(
                "UPDATE jobs SET stage = ?, error_message = ?, lease_owner = NULL, "
                "lease_deadline = NULL, next_attempt_at = NULL, finished_at = ?, "
                "failure_class = COALESCE(?, failure_class) "
                "WHERE id = ? AND attempt = ? AND stage = ? RETURNING id",
                [STAGE_FAILED, error, now, failure_class, job_id, attempt,
                 STAGE_DOWNLOADING]).fetchone()
        if row is not None:
            self._moved(STAGE_DOWNLOADING, STAGE_FAILED)
        return row is not None

    # --- reading ------------------------------------------------------------

    @weather
    def get(self, job_id: int) -> JobRow | None:
        j = Job.get_or_none(Job.id == job_id)
        if j is None:
            return None
        return JobRow(j.id, j.anime_id, j.anime_title, j.episode, j.stage, j.attempt,
                      j.retry_count, j.max_retries, j.video_path)

    @weather
    def leases(self) -> list[LeaseRow]:
        query = Job.select(Job.id, Job.anime_id, Job.episode, Job.attempt, Job.lease_owner,
                           Job.lease_deadline).where(Job.stage == STAGE_DOWNLOADING)
        return [LeaseRow(j.id, j.anime_id, j.episode, j.attempt, j.lease_owner,
                         j.lease_deadline) for j in query]

    @weather
    def changed_elsewhere(self) -> bool:
        """Whether another connection (anime-enqueue, the selector) committed since the last
        call: PRAGMA data_version reads no table. Our own commits do not count."""
        (version,) = self.db.execute_sql("PRAGMA data_version").fetchone()
        changed = version != getattr(self, "_data_version", None)
        self._data_version = version
        return changed

    @weather
    def stage_counts(self) -> dict[str, int]:
        return stage_counts(self.db.execute_sql)

    @weather
    def queue_detail(self, now: float) -> dict:
        """Counts that need the selection table or the clock; one indexed pass."""
        return queue_detail(self.db.execute_sql, now, self.anime_id)

    @weather
    def landings_since(self, since: float) -> list[tuple[float, int]]:
        """``(finished_at, size)`` of the episodes downloaded since ``since``, oldest first:
        the status's last hour starts from these, whoever's run landed them (the stage may
        have moved on: a transcriber's)."""
        cursor = self.db.execute_sql(
            "SELECT finished_at, video_size_bytes FROM jobs WHERE finished_at >= ? "
            "AND video_size_bytes IS NOT NULL AND video_path IS NOT NULL "
            "ORDER BY finished_at", [since])
        return [(float(at), int(size or 0)) for at, size in cursor.fetchall()]

    @weather
    def animes_without_selection(self) -> list[int]:
        return animes_without_selection(self.db.execute_sql)

    @weather
    def live_job_ids_among(self, job_ids: Iterable[int]) -> set[int]:
        """Which of ``job_ids`` are queued or downloading: a read per id, not of the whole
        queue (at a million jobs the set of every live id was 0.7 M ints in memory)."""
        live = set()
        for job_id in job_ids:
            if self.db.execute_sql("SELECT 1 FROM jobs WHERE id = ? AND stage IN (?, ?)",
                                   [job_id, STAGE_QUEUED, STAGE_DOWNLOADING]).fetchone():
                live.add(job_id)
        return live

    @weather
    def recent_sizes(self, limit: int = 500) -> list[tuple[int, int]]:
        cursor = self.db.execute_sql(
            "SELECT anime_id, video_size_bytes FROM jobs WHERE video_size_bytes > 0 "
            "ORDER BY finished_at DESC, id DESC LIMIT ?", [limit])
        return [(a, s) for a, s in cursor.fetchall()]

    @weather
    def recent_failures(self, limit: int = 5) -> list[dict]:
        return recent_failures(self.db.execute_sql, limit)

    @weather
    def selection_review(self, limit: int = 20) -> list[dict]:
        return selection_review(self.db.execute_sql, limit)

    @weather
    def downloaded_since(self, since: float) -> tuple[int, int]:
        count, total = self.db.execute_sql(
            "SELECT COUNT(*), COALESCE(SUM(video_size_bytes), 0) FROM jobs "
            "WHERE finished_at >= ? AND video_size_bytes IS NOT NULL", [since]).fetchone()
        return count, total

    # --- operator controls (services/dispatcher/controls.py) -------------------

    @weather
    def get_state(self, key: str) -> str | None:
        """A value of the dispatcher's own ``downloader_state`` table (None: not set)."""
        row = self.db.execute_sql("SELECT value FROM downloader_state WHERE key = ?",
                                  [key]).fetchone()
        return row[0] if row else None

    @weather
    def set_state(self, key: str, value: str | None, now: float) -> None:
        """Write (or with None delete) one ``downloader_state`` value."""
        with self.db.atomic():
            if value is None:
                self.db.execute_sql("DELETE FROM downloader_state WHERE key = ?", [key])
            else:
                self.db.execute_sql(
                    "INSERT INTO downloader_state (key, value, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
                    "updated_at = excluded.updated_at", [key, value, now])

    @weather
    def retry_jobs(self, now: float, failed: bool = False, job_ids: list[int] | None = None,
                   anime_id: int | None = None) -> tuple[list[tuple[int, int, int | None, str | None]],
                                                      list[int]]:
        """Failed jobs back to ``queued`` (retry_count 0, error_message cleared) and queued jobs
        that back off made runnable now, in one transaction; which: every job (``failed``),
        ``job_ids``, or one anime's. Returns (the failed ones requeued as (id, anime_id,
        episode, their error_message), the ids no longer backing off)."""
        if job_ids:
            where, params = f"id IN ({', '.join('?' for _ in job_ids)})", list(job_ids)
        elif anime_id is not None:
            where, params = "anime_id = ?", [anime_id]
        else:
            assert failed
            where, params = "1", []
        with self.db.atomic():
            revived = self.db.execute_sql(
                "SELECT id, anime_id, episode, error_message FROM jobs "
                f"WHERE stage = ? AND {where} ORDER BY id", [STAGE_FAILED, *params]).fetchall()
            self.db.execute_sql(
                "UPDATE jobs SET stage = ?, retry_count = 0, error_message = NULL, "
                "next_attempt_at = NULL, finished_at = NULL, lease_owner = NULL, "
                # a wait for the episode's release starts afresh (docs/failures.md)
                "unreleased_since = NULL, failure_class = NULL, "
                f"lease_deadline = NULL WHERE stage = ? AND {where}",
                [STAGE_QUEUED, STAGE_FAILED, *params])
            hurried = [row[0] for row in self.db.execute_sql(
                f"UPDATE jobs SET next_attempt_at = NULL WHERE stage = ? AND {where} "
                "AND next_attempt_at > ? RETURNING id", [STAGE_QUEUED, *params, now])]
        for _ in revived:
            self._moved(STAGE_FAILED, STAGE_QUEUED)
        return [tuple(row) for row in revived], sorted(hurried)

    @weather
    def cancel_queued(self, job_id: int, stage: str, now: float) -> bool:
        """A job not running (``stage``: queued or failed) becomes ``cancelled``, a terminal
        stage; False if it is not in that stage any more (nothing written)."""
        with self.db.atomic():
            row = self.db.execute_sql(
                "UPDATE jobs SET stage = ?, next_attempt_at = NULL, finished_at = ? "
                "WHERE id = ? AND stage = ? RETURNING id",
                [STAGE_CANCELLED, now, job_id, stage]).fetchone()
        if row is not None:
            self._moved(stage, STAGE_CANCELLED)
        return row is not None

    @weather
    def mark_cancelled(self, job_id: int, attempt: int, now: float) -> bool:
        """Cancel ``attempt`` of a downloading job; False if the row is not that attempt
        downloading any more (nothing written)."""
        with self.db.atomic():
            row = self.db.execute_sql(
                "UPDATE jobs SET stage = ?, lease_owner = NULL, lease_deadline = NULL, "
                "next_attempt_at = NULL, finished_at = ? WHERE id = ? AND attempt = ? "
                "AND stage = ? RETURNING id",
                [STAGE_CANCELLED, now, job_id, attempt, STAGE_DOWNLOADING]).fetchone()
        if row is not None:
            self._moved(STAGE_DOWNLOADING, STAGE_CANCELLED)
        return row is not None

    @weather
    def set_priority(self, priority: int, anime_id: int | None = None,
                     job_id: int | None = None) -> int:
        """Set the priority of one anime's jobs or of one job; how many rows it changed
        (rows at that priority already count: the operator's word holds)."""
        column, value = ("anime_id", anime_id) if anime_id is not None else ("id", job_id)
        with self.db.atomic():
            cursor = self.db.execute_sql(
                f"UPDATE jobs SET priority = ? WHERE {column} = ?", [priority, value])
            return cursor.rowcount

    @weather
    def priorities(self, limit: int = 50) -> list[dict]:
        """The animes with jobs to do at a priority that is not 0: (anime, priority) with
        how many are queued or downloading. Two range scans of idx_jobs_claim: only the rows
        that are not at priority 0 are read."""
        cursor = self.db.execute_sql(
            "SELECT anime_id, MAX(anime_title), priority, COUNT(*) FROM ("
            "  SELECT anime_id, anime_title, priority FROM jobs WHERE stage = ? AND priority > 0"
            "  UNION ALL SELECT anime_id, anime_title, priority FROM jobs WHERE stage = ? AND priority < 0"
            "  UNION ALL SELECT anime_id, anime_title, priority FROM jobs WHERE stage = ? AND priority > 0"
            "  UNION ALL SELECT anime_id, anime_title, priority FROM jobs WHERE stage = ? AND priority < 0"
            ") GROUP BY anime_id, priority ORDER BY priority DESC, anime_id LIMIT ?",
            [STAGE_QUEUED, STAGE_QUEUED, STAGE_DOWNLOADING, STAGE_DOWNLOADING, limit])
        return [{"anime_id": a, "anime_title": t, "priority": p, "jobs": n}
                for a, t, p, n in cursor.fetchall()]

    @weather
    def job_stages(self, job_ids: list[int]) -> dict[int, str]:
        """The stage of each of these jobs that exists."""
        if not job_ids:
            return {}
        cursor = self.db.execute_sql(
            f"SELECT id, stage FROM jobs WHERE id IN ({', '.join('?' for _ in job_ids)})",
            list(job_ids))
        return dict(cursor.fetchall())

# --- passes over the whole queue ------------------------------------------------------
# Each reads every queued (or failed) row: 80-150 ms at a million jobs. The dispatcher runs
# them off its loop on a connection of their own (QueueReader, counts.py); ``execute`` is
# a connection's execute, so the loop's store and the reader share the SQL.

Execute = Callable[[str, list], Any]


def stage_counts(execute: Execute) -> dict[str, int]:
    return {stage: n for stage, n in
            execute("SELECT stage, COUNT(*) FROM jobs GROUP BY stage", []).fetchall()}


def queue_detail(execute: Execute, now: float, anime_id: int | None = None) -> dict:
    """Counts that need the selection table or the clock; one indexed pass."""
    anime_filter = "AND j.anime_id = ?" if anime_id is not None else ""
    params: list = [now] + ([anime_id] if anime_id is not None else [])
    # The soonest retry among those still backing off: a backoff that ran out (its job
    # not handed out yet) must not hide the next one.
    row = execute(
        "SELECT SUM(s.mal_id IS NULL), "
        "SUM(s.mal_id IS NOT NULL AND j.next_attempt_at > ?), "
        "MIN(CASE WHEN s.mal_id IS NOT NULL AND j.next_attempt_at > ? THEN j.next_attempt_at END), "
        "COUNT(*) "
        "FROM jobs j LEFT JOIN anime_selection_cache s ON s.mal_id = j.anime_id "
        f"WHERE j.stage = 'queued' {anime_filter}", [now, *params]).fetchone()
    waiting, backing_off, soonest, queued = row
    # Jobs waiting for their episode's release (unreleased_since: few, in a partial
    # index) are counted apart: not backing off, not runnable before their re-check.
    unreleased, recheck = execute(
        "SELECT SUM(s.mal_id IS NOT NULL AND j.next_attempt_at > ?), "
        "MIN(CASE WHEN s.mal_id IS NOT NULL AND j.next_attempt_at > ? "
        "    THEN j.next_attempt_at END) "
        "FROM jobs j LEFT JOIN anime_selection_cache s ON s.mal_id = j.anime_id "
        f"WHERE j.stage = 'queued' AND j.unreleased_since IS NOT NULL {anime_filter}",
        [now, *params]).fetchone()
    unreleased = unreleased or 0
    backing_off = (backing_off or 0) - unreleased
    if not backing_off:
        soonest = None
    elif unreleased and soonest == recheck:  # a re-check comes first: the next retry?
        (soonest,) = execute(
            "SELECT MIN(j.next_attempt_at) FROM jobs j JOIN anime_selection_cache s "
            "ON s.mal_id = j.anime_id WHERE j.stage = 'queued' AND j.next_attempt_at > ? "
            f"AND j.unreleased_since IS NULL {anime_filter}", params).fetchone()
    return {"waiting_for_selection": waiting or 0, "backing_off": backing_off,
            "next_retry_at": soonest,
            "runnable": (queued or 0) - (waiting or 0) - unreleased,
            "backoff_reasons": backoff_reasons(execute, now, anime_id) if backing_off else [],
            "waiting_for_release": unreleased, "next_recheck_at": recheck,
            "by_anime": by_anime(execute, now, anime_id)}


def backoff_reasons(execute: Execute, now: float, anime_id: int | None = None) -> list[dict]:
    """Why the jobs backing off failed last, grouped (shared/reasons.py); run only when
    some are. It costs the pass about 15 ms at 1,000 of 100,000 jobs backing off, 60 ms
    when all are (bench/backoff_reasons.py); the pass runs off the loop (counts.py)."""
    anime_filter = "AND j.anime_id = ?" if anime_id is not None else ""
    params: list = [now] + ([anime_id] if anime_id is not None else [])
    cursor = execute(
        "SELECT j.error_message, COUNT(*), MIN(j.next_attempt_at) FROM jobs j "
        "JOIN anime_selection_cache s ON s.mal_id = j.anime_id "
        f"WHERE j.stage = 'queued' AND j.next_attempt_at > ? {anime_filter} "
        "AND j.unreleased_since IS NULL "  # a release wait is not a backoff
        "GROUP BY j.error_message", params)
    return top_reasons(cursor.fetchall())


BY_ANIME_KEPT = 50  # rows of queue.by_anime: the busiest series


def by_anime(execute: Execute, now: float, anime_id: int | None = None,
             limit: int = BY_ANIME_KEPT) -> list[dict]:
    """The series with work left or failures, busiest first (downloading, then the
    highest priority of what is left, then failed, then queued): their jobs by stage and
    that priority, and how many of its queued jobs wait for their episode's release (a
    re-check still ahead, as queue.waiting_for_release counts them).
    One walk of idx_jobs_anime_claim (anime_id, stage, priority: it covers the query, no
    table row is read), then per row shown its title and its queued rows' release waits."""
    where, params = ("WHERE anime_id = ?", [anime_id]) if anime_id is not None else ("", [])
    rows = execute(
        "SELECT anime_id, SUM(stage = 'queued') AS q, SUM(stage = 'downloading') AS d, "
        "SUM(stage = 'downloaded'), SUM(stage = 'failed') AS f, "
        "MAX(CASE WHEN stage IN ('queued', 'downloading') THEN priority END) AS p "
        f"FROM jobs {where} GROUP BY anime_id HAVING q + d + f > 0 "
        "ORDER BY d DESC, COALESCE(p, 0) DESC, f DESC, q DESC, anime_id LIMIT ?",
        [*params, limit]).fetchall()
    out = []
    for mal_id, queued, downloading, downloaded, failed, priority in rows:
        title = execute("SELECT anime_title FROM jobs WHERE anime_id = ? LIMIT 1",
                        [mal_id]).fetchone()
        (waiting,) = execute(  # that series' queued rows only (the index's anime_id, stage)
            "SELECT COUNT(*) FROM jobs WHERE anime_id = ? AND stage = 'queued' "
            "AND unreleased_since IS NOT NULL AND next_attempt_at > ?", [mal_id, now]).fetchone()
        out.append({"anime_id": mal_id, "anime_title": title[0] if title else None,
                    "queued": queued, "downloading": downloading, "downloaded": downloaded,
                    "failed": failed, "waiting_release": waiting, "priority": priority or 0})
    return out


def animes_without_selection(execute: Execute) -> list[int]:
    return [r[0] for r in execute(
        "SELECT DISTINCT j.anime_id FROM jobs j LEFT JOIN anime_selection_cache s "
        "ON s.mal_id = j.anime_id WHERE j.stage = 'queued' AND s.mal_id IS NULL", []).fetchall()]


def recent_failures(execute: Execute, limit: int = 5) -> list[dict]:
    rows = execute(
        "SELECT id, anime_id, anime_title, episode, error_message, finished_at, failure_class "
        "FROM jobs WHERE stage = ? ORDER BY finished_at IS NULL, finished_at DESC, id DESC "
        "LIMIT ?", [STAGE_FAILED, limit]).fetchall()
    return [{"id": i, "anime_id": a, "anime_title": t, "episode": e, "error": err, "at": at,
             "failure_class": c} for i, a, t, e, err, at, c in rows]


def selection_review(execute: Execute, limit: int = 20) -> list[dict]:
    """The anime whose jobs failed for good with a ``selection`` failure (the search or
    the -S index found nothing), the last failure first: their selection wants a look.
    A partial index (models.py) holds just the rows of that class."""
    cursor = execute(
        "SELECT anime_id, MAX(anime_title), COUNT(*), MAX(finished_at), "
        "MAX(error_message) FROM jobs WHERE stage = 'failed' AND failure_class = 'selection' "
        "GROUP BY anime_id ORDER BY MAX(finished_at) DESC, anime_id LIMIT ?", [limit])
    return [{"anime_id": a, "anime_title": t, "failed": n, "at": at, "error": e}
            for a, t, n, at, e in cursor.fetchall()]


@dataclass
class QueueTally:
    """One pass over the queue, all of it as of one moment (one read transaction)."""
    counts: dict[str, int]
    detail: dict
    failures: list[dict]
    without_selection: list[int] | None  # None: not asked for
    selection_review: list[dict] = field(default_factory=list)


def tally(execute: Execute, now: float, anime_id: int | None, with_without: bool) -> QueueTally:
    return QueueTally(stage_counts(execute), queue_detail(execute, now, anime_id),
                      recent_failures(execute),
                      animes_without_selection(execute) if with_without else None,
                      selection_review(execute))


class QueueReader:
    """A read-only connection of its own for the passes over the whole queue, which a
    thread runs while the loop goes on. ``pin`` (on the loop, microseconds) opens a read
    transaction: in WAL mode the pass then sees the database as it was at that moment,
    whatever is committed while it runs, so the loop knows which of its own writes the
    pass has seen (those before the pin). ``tally`` (on the thread) runs the pass and
    ends the transaction. Never used by two threads at once."""

    def __init__(self, db_path: Path, anime_id: int | None = None) -> None:
        self.db_path = db_path
        self.anime_id = anime_id
        self.conn: sqlite3.Connection | None = None

    @weather
    def pin(self) -> None:
        if self.conn is None:
            self.conn = sqlite3.connect(str(self.db_path), isolation_level=None,
                                        check_same_thread=False,
                                        timeout=LOOP_BUSY_TIMEOUT_MS / 1000)
            self.conn.execute("PRAGMA query_only = 1")
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        self.conn.execute("BEGIN")
        try:  # the first read takes the snapshot
            self.conn.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise

    @weather
    def tally(self, now: float, with_without: bool) -> QueueTally:
        assert self.conn is not None and self.conn.in_transaction, "pin() first"
        try:
            return tally(self.conn.execute, now, self.anime_id, with_without)
        finally:
            self.conn.execute("ROLLBACK")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
