"""The disk as one worker sees it: the disk-watcher's latest state, and whether the
storage it names is there on this machine too.

A worker asks for work only while the state is fresh (``DISK_STALE_SECONDS``), not
``hard_limit``, and the storage is there here: the disk-watcher may see the storage
while this worker cannot (another machine whose NFS mount is gone).
"""

from __future__ import annotations

import logging
import math
from typing import Callable

from shared.logfmt import kv
from shared.protocol import DiskStateMsg

log = logging.getLogger(__name__)
DISK_STALE_SECONDS = 5.0


class DiskView:
    def __init__(self, storage_problem: Callable[[str], str | None]) -> None:
        self._look = storage_problem  # storage_id -> why it cannot be written here, or None
        self.state: DiskStateMsg | None = None
        self.heard_at = -math.inf
        self.storage_problem: str | None = None  # the storage is not there on this machine

    def ok(self, now: float) -> bool:
        """Whether a download may start (or the worker ask for one)."""
        fresh = now - self.heard_at <= DISK_STALE_SECONDS
        return (fresh and self.state is not None and self.state.state != "hard_limit"
                and self.storage_problem is None)

    def heard(self, msg: DiskStateMsg, now: float, context: dict) -> None:
        if self.state is None or msg.state != self.state.state:
            log.info(kv("disk state", state=msg.state, reason=msg.reason or None, **context))
        self.state, self.heard_at = msg, now
        self._check_own_storage(msg, context)

    @property
    def unavailable(self) -> bool:
        """The storage is not there, by the disk-watcher's word or by this machine's."""
        return (self.state is not None and self.state.state == "unavailable") \
            or self.storage_problem is not None

    def why_unavailable(self) -> str:
        disk = self.state
        return (disk.reason if disk is not None and disk.state == "unavailable" else "") \
            or self.storage_problem or "the storage is not there"

    def _check_own_storage(self, msg: DiskStateMsg, context: dict) -> None:
        """Where the disk-watcher sees the storage, look for it here too (its marker)."""
        problem = None
        if msg.state != "unavailable" and msg.storage_id:
            problem = self._look(msg.storage_id)
        if problem != self.storage_problem:
            if problem is not None:
                log.warning(kv("storage unavailable on this machine; asking for no work",
                               reason=problem, **context))
            else:
                log.info(kv("storage available on this machine again", **context))
            self.storage_problem = problem
