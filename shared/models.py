"""The SQLite schema (peewee models) and opening the database.

The upstream tools (anime-selector, anime-enqueue) create ``jobs`` and
``anime_selection_cache`` with the contract's columns; the dispatcher adds the
columns and indexes it needs with ``upgrade_schema`` (ALTER TABLE ADD COLUMN
only: rows are never dropped or rewritten). Only the dispatcher writes while
the system runs; WAL mode lets ``sqlite3 data/jobs.db`` read beside it.

Workers never import this module (it pulls in peewee; a worker must stay small).
"""

from __future__ import annotations

from pathlib import Path

import peewee

STAGE_QUEUED = "queued"
STAGE_DOWNLOADING = "downloading"
STAGE_DOWNLOADED = "downloaded"
STAGE_FAILED = "failed"
OWN_STAGES = (STAGE_QUEUED, STAGE_DOWNLOADING, STAGE_DOWNLOADED, STAGE_FAILED)

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
}

INDEXES = (
    "CREATE INDEX IF NOT EXISTS idx_jobs_stage_id ON jobs(stage, id)",
    "CREATE INDEX IF NOT EXISTS idx_jobs_anime_episode ON jobs(anime_id, episode)",
)


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

    class Meta:
        table_name = "jobs"


def open_db(path: Path, readonly: bool = False) -> peewee.SqliteDatabase:
    """Open (and bind the models to) the job database.

    synchronous=NORMAL in WAL mode survives a process crash with every commit;
    a power cut may lose the last commits, which start-up recovery settles.
    """
    if readonly:
        db = peewee.SqliteDatabase(f"file:{path}?mode=ro", uri=True,
                                   pragmas={"busy_timeout": 5000, "query_only": 1})
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = peewee.SqliteDatabase(str(path), pragmas={
            "journal_mode": "wal", "synchronous": "normal", "busy_timeout": 5000,
            "foreign_keys": 0})
    db.connect(reuse_if_open=True)
    database_proxy.initialize(db)
    return db


def upgrade_schema(db: peewee.SqliteDatabase) -> list[str]:
    """Create the contract tables if absent, add our columns and indexes.

    Returns the names of the columns added, for the log.
    """
    added = []
    with db.atomic():
        for ddl in CONTRACT_DDL:
            db.execute_sql(ddl)
        existing = {c.name for c in db.get_columns("jobs")}
        for name, sql_type in ADDED_COLUMNS.items():
            if name not in existing:
                db.execute_sql(f"ALTER TABLE jobs ADD COLUMN {name} {sql_type}")
                added.append(name)
        for ddl in INDEXES:
            db.execute_sql(ddl)
    return added


def existing_columns(db: peewee.SqliteDatabase) -> set[str]:
    return {c.name for c in db.get_columns("jobs")}
