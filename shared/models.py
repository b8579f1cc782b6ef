"""The SQLite schema (peewee models) and opening the database.

The upstream tools (anime-selector, anime-enqueue) create ``jobs`` and
``anime_selection_cache`` with the contract's columns; the dispatcher adds the
columns and indexes it needs with ``upgrade_schema`` (ALTER TABLE ADD COLUMN
only: rows are never dropped or rewritten). The database is shared: the
neighbours (anime-selector, anime-enqueue, the transcriber) write to it while
the system runs, so every transaction waits for the write lock at its start and
a locked database is an ordinary condition (see services/dispatcher/store.py).
WAL mode lets ``sqlite3 data/jobs.db`` read beside it.

Workers never import this module (it pulls in peewee; a worker must stay small).
"""

from __future__ import annotations

from pathlib import Path

import peewee

STAGE_QUEUED = "queued"
STAGE_DOWNLOADING = "downloading"
STAGE_DOWNLOADED = "downloaded"
STAGE_FAILED = "failed"
STAGE_CANCELLED = "cancelled"  # an operator's cancel (anime-ctl cancel): terminal, never handed out
OWN_STAGES = (STAGE_QUEUED, STAGE_DOWNLOADING, STAGE_DOWNLOADED, STAGE_FAILED, STAGE_CANCELLED)


# The contract's DDL, verbatim, so a database we create is one the neighbours expect.
CONTRACT_DDL = (
    """CREATE TABLE IF NOT EXISTS anime_selection_cache (
  mal_id INTEGER PRIMARY KEY, selected_index INTEGER NOT NULL,
  selected_title TEXT NOT NULL, confidence TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS jobs (
  id INTEGER PRIMARY KEY, anime_id INTEGER NOT NULL,
  anime_title TEXT NOT NULL, episode INTEGER NOT NULL,
  stage TEXT NOT NULL DEFAULT 'queued',
  retry_count INTEGER DEFAULT 0, max_retries INTEGER DEFAULT 3, error_message TEXT,
  video_path TEXT, video_size_bytes INTEGER)""",
)

# Columns this project adds to jobs: name -> SQL type.
ADDED_COLUMNS = {
    "attempt": "INTEGER NOT NULL DEFAULT 0",  # lease generation, the fencing token
    "lease_owner": "TEXT",  # "<worker_id>/<session>" while downloading
    "lease_deadline": "REAL",  # unix time; past it the job goes back to the queue
    "next_attempt_at": "REAL",  # retry backoff: not handed out before this time
    "started_at": "REAL",
    "finished_at": "REAL",
    "video_duration_seconds": "REAL",
    # Failures that know what they are (shared/failures.py, docs/failures.md):
    "unreleased_since": "REAL",  # first "not released" of the episode; waits for a re-check
    "failure_class": "TEXT",  # the class of the last failed attempt
    # Higher first (anime-ctl priority; upstream tools may set it too): see the claim in
    # services/dispatcher/store.py and its indexes below.
    "priority": "INTEGER NOT NULL DEFAULT 0",
}

# Tables this project adds: the dispatcher's own state that must survive its restart
# (key -> JSON text; e.g. "manual_pause", services/dispatcher/controls.py).
ADDED_TABLES = {
    "downloader_state": """CREATE TABLE IF NOT EXISTS downloader_state (
  key TEXT PRIMARY KEY, value TEXT NOT NULL, updated_at REAL)""",
}

INDEXES = {
    "idx_jobs_stage_id": "CREATE INDEX IF NOT EXISTS idx_jobs_stage_id ON jobs(stage, id)",
    "idx_jobs_anime_episode":
        "CREATE INDEX IF NOT EXISTS idx_jobs_anime_episode ON jobs(anime_id, episode)",
    # Failures that know what they are: partial, so they hold only the few rows concerned
    # and the counts pass reads those without another walk over the queue.
    "idx_jobs_unreleased": "CREATE INDEX IF NOT EXISTS idx_jobs_unreleased "
                           "ON jobs(stage, next_attempt_at) WHERE unreleased_since IS NOT NULL",
    "idx_jobs_selection": "CREATE INDEX IF NOT EXISTS idx_jobs_selection "
                          "ON jobs(stage, anime_id) WHERE failure_class = 'selection'",
    # The claim: the head of the queue (highest priority, then oldest), then that anime's
    # lowest episode of the same priority; both walk an index from its start.
    "idx_jobs_claim":
        "CREATE INDEX IF NOT EXISTS idx_jobs_claim ON jobs(stage, priority DESC, id)",
    "idx_jobs_anime_claim":
        "CREATE INDEX IF NOT EXISTS idx_jobs_anime_claim ON jobs(anime_id, stage, priority, episode)",
}


class _Base(peewee.Model):
    class Meta:
        database = peewee.DatabaseProxy()


database_proxy: peewee.DatabaseProxy = _Base._meta.database


class AnimeSelection(_Base):
    mal_id = peewee.IntegerField(primary_key=True)
    selected_index = peewee.IntegerField()
    selected_title = peewee.TextField()
    confidence = peewee.TextField()

    class Meta:
        table_name = "anime_selection_cache"


class Job(_Base):
    id = peewee.AutoField()
    anime_id = peewee.IntegerField()
    anime_title = peewee.TextField(null=True)
    episode = peewee.IntegerField(null=True)
    stage = peewee.TextField(default=STAGE_QUEUED)
    retry_count = peewee.IntegerField(default=0, null=True)
    max_retries = peewee.IntegerField(default=3, null=True)
    error_message = peewee.TextField(null=True)
    video_path = peewee.TextField(null=True)
    video_size_bytes = peewee.IntegerField(null=True)
    attempt = peewee.IntegerField(default=0)
    lease_owner = peewee.TextField(null=True)
    lease_deadline = peewee.FloatField(null=True)
    next_attempt_at = peewee.FloatField(null=True)
    started_at = peewee.FloatField(null=True)
    finished_at = peewee.FloatField(null=True)
    video_duration_seconds = peewee.FloatField(null=True)
    unreleased_since = peewee.FloatField(null=True)
    failure_class = peewee.TextField(null=True)
    priority = peewee.IntegerField(default=0)

    class Meta:
        table_name = "jobs"


def open_db(path: Path, readonly: bool = False,
            busy_timeout_ms: int = 5000) -> peewee.SqliteDatabase:
    """Open (and bind the models to) the job database. Needs no lock: the connection's
    busy timeout is set first of all, and the journal mode is left to ``ensure_wal``.

    synchronous=NORMAL in WAL mode survives a process crash with every commit;
    a power cut may lose the last commits, which start-up recovery settles.
    Every transaction is BEGIN IMMEDIATE: it waits (up to the busy timeout) for the
    write lock at its start, and never fails half-way on a snapshot a neighbour's
    commit made stale.
    """
    seconds = busy_timeout_ms / 1000
    if readonly:
        db = peewee.SqliteDatabase(f"file:{path}?mode=ro", uri=True, timeout=seconds,
                                   pragmas=[("busy_timeout", busy_timeout_ms), ("query_only", 1)])
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = peewee.SqliteDatabase(str(path), timeout=seconds, lock_type="IMMEDIATE", pragmas=[
            ("busy_timeout", busy_timeout_ms), ("synchronous", "normal"), ("foreign_keys", 0)])
    db.connect(reuse_if_open=True)
    database_proxy.initialize(db)
    return db


def ensure_wal(db: peewee.SqliteDatabase) -> None:
    """Switch the database to WAL mode (it stays so), so that readers such as
    ``sqlite3 data/jobs.db`` and our own reads never wait for a writer.

    On a rollback-journal database (as the upstream tools create it) the switch needs
    the database to itself, and SQLite refuses it at once, without waiting, while
    another program holds a write lock: that surfaces as OperationalError
    "database is locked", and the caller tries again later.
    """
    (mode,) = db.execute_sql("PRAGMA journal_mode").fetchone()
    if str(mode).lower() == "wal":
        return
    (mode,) = db.execute_sql("PRAGMA journal_mode=wal").fetchone()
    if str(mode).lower() != "wal":
        raise peewee.OperationalError(f"database is locked (journal mode stays {mode})")


def missing_schema(db: peewee.SqliteDatabase) -> tuple[list[str], list[str], list[str]]:
    """(tables, columns, indexes) that ``upgrade_schema`` would add; reads only."""
    cursor = db.execute_sql("SELECT type, name FROM sqlite_master WHERE type IN ('table', 'index')")
    present = {(kind, name) for kind, name in cursor.fetchall()}
    tables = [t for t in ("anime_selection_cache", "jobs", *ADDED_TABLES)
              if ("table", t) not in present]
    columns = list(ADDED_COLUMNS) if "jobs" in tables else [
        name for name in ADDED_COLUMNS if name not in existing_columns(db)]
    indexes = [name for name in INDEXES if ("index", name) not in present]
    return tables, columns, indexes


def upgrade_schema(db: peewee.SqliteDatabase) -> list[str]:
    """Create the contract tables if absent, add our columns and indexes.

    Looks first and writes only if something is missing, so a start on an
    up-to-date database takes no write lock. Returns the names of the columns
    added, for the log.
    """
    tables, columns, indexes = missing_schema(db)
    if not (tables or columns or indexes):
        return []
    added = []
    with db.atomic():  # BEGIN IMMEDIATE: look again under the lock
        for ddl in (*CONTRACT_DDL, *ADDED_TABLES.values()):
            db.execute_sql(ddl)
        existing = existing_columns(db)
        for name, sql_type in ADDED_COLUMNS.items():
            if name not in existing:
                db.execute_sql(f"ALTER TABLE jobs ADD COLUMN {name} {sql_type}")
                added.append(name)
        for ddl in INDEXES.values():
            db.execute_sql(ddl)
    return added


def existing_columns(db: peewee.SqliteDatabase) -> set[str]:
    return {c.name for c in db.get_columns("jobs")}
