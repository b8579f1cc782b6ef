"""``anime-status`` when no dispatcher answers: the queue as ``jobs.db`` has it.

Read-only, and meant to stay so: the file is opened with a ``mode=ro`` URI and
``PRAGMA query_only``, so no statement can write, and nothing is created (a missing
database is reported, not made). A database another program holds locked is waited
for at most ``BUSY_SECONDS``; then it says so. The figures are what the dispatcher
counts (queue.* of the status document) minus what only a running system knows
(workers, disk, last hour).
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from shared.reasons import top_reasons
from services.status_text import render_queue_from_database

BUSY_SECONDS = 1.0
OWN_STAGES = ("queued", "downloading", "downloaded", "failed", "cancelled")  # shared.models'


class Unreadable(Exception):
    """The database could not be read (missing, locked, not a database): the reason."""


def _columns(conn: sqlite3.Connection) -> set[str]:
    return {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}


def read_queue(db_path: Path, now: float, busy_seconds: float = BUSY_SECONDS) -> dict:
    """The ``queue`` part of the status document, read from ``db_path``; Unreadable if not."""
    if not db_path.is_file():
        raise Unreadable(f"no database at {db_path} (nothing queued yet: anime-enqueue or "
                         "anime-selector creates it)")
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=busy_seconds)
    except sqlite3.Error as exc:
        raise Unreadable(f"cannot open {db_path}: {exc}") from None
    try:
        conn.execute("PRAGMA query_only = 1")
        stages = dict(conn.execute("SELECT stage, COUNT(*) FROM jobs GROUP BY stage").fetchall())
        (waiting,) = conn.execute(
            "SELECT COUNT(*) FROM jobs j LEFT JOIN anime_selection_cache s ON s.mal_id = j.anime_id "
            "WHERE j.stage = 'queued' AND s.mal_id IS NULL").fetchone()
        backing_off, soonest, reasons = 0, None, []
        columns = _columns(conn)
        if "next_attempt_at" in columns:  # an upstream database may not have it yet
            # a wait for an episode's release is not a backoff (docs/failures.md)
            release = " AND j.unreleased_since IS NULL" if "unreleased_since" in columns else ""
            backing = ("FROM jobs j JOIN anime_selection_cache s ON s.mal_id = j.anime_id "
                       f"WHERE j.stage = 'queued' AND j.next_attempt_at > ?{release}")
            backing_off, soonest = conn.execute(
                f"SELECT COUNT(*), MIN(j.next_attempt_at) {backing}", (now,)).fetchone()
            if backing_off:
                reasons = top_reasons(conn.execute(
                    f"SELECT j.error_message, COUNT(*), MIN(j.next_attempt_at) {backing} "
                    "GROUP BY j.error_message", (now,)).fetchall())
    except sqlite3.OperationalError as exc:
        why = "locked by another program" if "locked" in str(exc) or "busy" in str(exc) else str(exc)
        raise Unreadable(f"cannot read {db_path}: {why}") from None
    except sqlite3.DatabaseError as exc:
        raise Unreadable(f"cannot read {db_path}: {exc}") from None
    finally:
        conn.close()
    return {"queued": stages.get("queued", 0), "downloading": stages.get("downloading", 0),
            "downloaded": stages.get("downloaded", 0), "failed": stages.get("failed", 0),
            "cancelled": stages.get("cancelled", 0),
            "waiting_for_selection": waiting or 0, "backing_off": backing_off or 0,
            "next_retry_at": soonest, "backoff_reasons": reasons,
            "other_stages": {k: v for k, v in stages.items() if k not in OWN_STAGES},
            "counted_at": now}


def report(db_path: Path, as_json: bool, now: float | None = None) -> str:
    """What anime-status prints (stdout) under its "no answer" line: the queue from the
    database, marked as read from it; or the one line saying why it could not be read."""
    now = time.time() if now is None else now
    try:
        queue = read_queue(db_path, now)
        error = None
    except Unreadable as exc:
        queue, error = None, str(exc)
    if as_json:
        return json.dumps({"generated_at": now, "dispatcher": None,
                           "source": {"database": str(db_path), "read_only": True, "error": error},
                           "queue": queue}, sort_keys=True)
    if queue is None:
        return f"from the database (read-only): {error}"
    return render_queue_from_database(queue, str(db_path), now)
