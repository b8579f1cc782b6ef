"""The dispatcher's side of the disk: the state it follows, the re-measures it asks for,
and the one log line per change of whether it hands out work.

The decision itself (does a job fit the budget?) is admission.py's; this module
feeds it the disk-watcher's states, collects ``disk.measure`` requests for the loop
to send (after a landing, a full disk, a storage a worker could not see, an
admission judged on an old measurement), and says once when the disk state goes
stale or admission changes its mind.
"""

from __future__ import annotations

import logging

from shared.logfmt import kv
from shared.protocol import DiskMeasure, DiskStateMsg
from services.dispatcher.admission import Admission

log = logging.getLogger(__name__)
MEASURE_AGAIN_SECONDS = 1.0  # at most one request a second for an old measurement


class DiskHooks:
    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.requests: list[DiskMeasure] = []
        self._requested_at = -1e18
        self._stale = False
        self._last_refusal: str | None = None

    def on_state(self, msg: DiskStateMsg, now: float) -> None:
        previous = self.admission.state.state if self.admission.state else None
        self.admission.on_disk_state(msg, now)
        if msg.state != previous:
            log.info(kv("disk state", state=msg.state, reason=msg.reason or None,
                        usage=msg.usage_bytes, free=msg.free_bytes, seq=msg.seq))

    def request_measure(self, reason: str, now: float) -> None:
        self.requests.append(DiskMeasure(reason=reason, requested_at=now))
        self._requested_at = now

    def no_space(self, now: float) -> None:
        """A worker ran out of space: hand out nothing until a measurement shows room."""
        self.admission.no_space_at = now
        self.request_measure("no space left on device", now)

    def storage_failed(self, now: float) -> None:
        """A worker found the storage unavailable: hand out nothing until the disk-watcher
        has looked again."""
        self.admission.storage_failed_at = now
        self.request_measure("a worker found the storage unavailable", now)

    def take_requests(self) -> list[DiskMeasure]:
        requests, self.requests = self.requests, []
        return requests

    def watch_staleness(self, now: float) -> None:
        """Say it once when the disk state goes stale (workers stop asking too) or is fresh again."""
        stale = self.admission.state is not None and not self.admission.fresh(now)
        if stale == self._stale:
            return
        self._stale = stale
        if stale:
            log.warning(kv("disk state is stale: handing out nothing until the disk-watcher "
                           "is back", age=round(now - self.admission.received_at, 1)))
        else:
            log.info(kv("disk state is fresh again"))

    def refusal(self, now: float) -> str | None:
        """Why no job may start now (logged when it changes), or None. A refusal judged on
        an old measurement asks for a new one."""
        refusal = self.admission.refusal(now)
        if refusal != self._last_refusal:
            if refusal:
                figures = self.admission.explain(now)
                log.info(kv("not handing out work", why=refusal,
                            figures=figures if figures != refusal else None))
            elif self._last_refusal:
                log.info(kv("handing out work again"))
            self._last_refusal = refusal
        if refusal and self.admission.measurement_too_old(now) and \
                now - self._requested_at > MEASURE_AGAIN_SECONDS:
            self.request_measure("admission against an old measurement", now)
        return refusal
