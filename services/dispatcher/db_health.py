"""Whether jobs.db takes the dispatcher's writes now, and since when it has not.

A neighbour holding the write lock makes a write fail after the store's short busy
timeout. After such a failure writes are not tried again for DB_RETRY_SECONDS: a
burst of messages must not each wait out a busy timeout while the loop has
heartbeats and status requests to serve. Every read and write of the dispatcher
goes through ``Database``, which keeps that account.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, TypeVar

from shared.logfmt import kv
from services.dispatcher.store import SqlJobStore, StoreUnavailable

log = logging.getLogger(__name__)
DB_RETRY_SECONDS = 0.5
T = TypeVar("T")


@dataclass
class DbHealth:
    busy_since: float | None = None
    error: str | None = None
    retry_at: float = -1e18

    def usable(self, now: float) -> bool:
        return now >= self.retry_at

    def failed(self, exc: Exception, now: float, quiet: bool = False) -> None:
        if self.busy_since is None:
            self.busy_since = now
            if not quiet:
                log.warning(kv("database busy: writes wait and are retried", error=exc))
        self.error = str(exc)
        self.retry_at = now + DB_RETRY_SECONDS

    def succeeded(self, now: float) -> None:
        if self.busy_since is not None:
            log.info(kv("database writable again", seconds=round(now - self.busy_since, 1)))
        self.busy_since, self.error, self.retry_at = None, None, -1e18


class Database:
    """The store (SqlJobStore, DryRunStore or a test's double) behind the health account."""

    def __init__(self, store: SqlJobStore) -> None:
        self.store = store
        self.health = DbHealth()

    def write(self, now: float, call: Callable[..., T], *args: object) -> T:
        """One store write; while the database refuses writes they are not even tried."""
        if not self.health.usable(now):
            raise StoreUnavailable(self.health.error or "database busy")
        try:
            result = call(*args)
        except StoreUnavailable as exc:
            self.health.failed(exc, now)
            raise
        self.health.succeeded(now)
        return result

    def read(self, now: float, call: Callable[..., T], *args: object) -> T:
        """One store read (in WAL mode reads do not wait for writers; a failure is rare)."""
        try:
            return call(*args)
        except StoreUnavailable as exc:
            self.health.failed(exc, now)
            raise

    def unavailable(self) -> StoreUnavailable:
        return StoreUnavailable(self.health.error or "database busy")
