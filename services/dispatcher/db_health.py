"""Whether jobs.db takes the dispatcher's writes now, and since when it has not.

A neighbour holding the write lock makes a write fail after the store's short busy
timeout. After such a failure writes are not tried again for DB_RETRY_SECONDS: a
burst of messages must not each wait out a busy timeout while the loop has
heartbeats and status requests to serve.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from shared.lifecycle import kv

log = logging.getLogger(__name__)
DB_RETRY_SECONDS = 0.5


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
